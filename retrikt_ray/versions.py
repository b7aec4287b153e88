"""Versions of a run's served model: a student and the store whose keys it made, with their lineage.

The run's own student stage is version v0 (`student/model`, `student/store`; what it trained on is the `store`
stage's store). `retrikt grow` adds v1, v2, ... under `<run>/versions/`, each a folder with `model/`, `store/`
(keys of that model), `train_store/` (the rows with keys of the untrained encoder: what a later retraining reads),
`predictions.parquet` (its dev predictions) and `version.json` (parent, source texts, counts, evaluation).
`<run>/versions/CURRENT` names the version that `retrikt serve` loads (v0 when absent).

A version is built in a staging folder and appears under its name by one rename, its version.json inside: a folder
without one, or a staging folder, is never listed or served. CURRENT is replaced atomically.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from .artifacts import read_manifest, staged
from .config import JobSpec, SpecError, load_spec

VERSIONS = "versions"
CURRENT = "CURRENT"
RECORD = "version.json"
ORIGINAL = "v0"
NAME = re.compile(r"^v(\d+)$")


@dataclass(frozen=True)
class Version:
    """A servable student + store and what is known about it."""

    name: str
    model_dir: Path
    store_dir: Path
    train_store_dir: Path
    predictions: Path
    record: dict

    @property
    def number(self) -> int:
        return int(NAME.match(self.name).group(1))


def load_run_spec(run_dir) -> JobSpec:
    """The job spec of a run whose student stage has finished (there is a model to serve or grow)."""
    run_dir = Path(run_dir)
    if not (run_dir / "job.yaml").is_file():
        raise SpecError(f"{run_dir}: not a run directory (no job.yaml)")
    manifest = read_manifest(run_dir / "student")
    if not manifest or manifest.get("status") != "done":
        raise SpecError(f"{run_dir}: the student stage has not finished, there is nothing to serve")
    return load_spec(run_dir / "job.yaml")


def versions_dir(run_dir) -> Path:
    return Path(run_dir) / VERSIONS


def original(run_dir) -> Version:
    """v0: the run's student stage, evaluated by its evaluate stage."""
    run_dir = Path(run_dir)
    student = read_manifest(run_dir / "student") or {}
    evaluation = read_manifest(run_dir / "evaluate") or {}
    store = read_manifest(run_dir / "store") or {}
    return Version(
        name=ORIGINAL,
        model_dir=run_dir / "student" / "model",
        store_dir=run_dir / "student" / "store",
        train_store_dir=run_dir / "store",
        predictions=run_dir / "evaluate" / "predictions.parquet",
        record={
            "version": ORIGINAL,
            "parent": None,
            "created_at": student.get("finished_at"),
            "source": {"kind": "pipeline"},
            "retrained": True,
            "counts": {"store_rows": (store.get("counts") or {}).get("rows")},
            "evaluation": _evaluation_of(evaluation.get("metrics") or {}),
        },
    )


def _evaluation_of(metrics: dict) -> dict:
    keys = {
        "accuracy_student_store": "accuracy_student_store",
        "accuracy_student_head": "accuracy_student_head",
        "accuracy_retrieval_only": "accuracy_retrieval_only",
        "agreement_student_teacher": "agreement_student_teacher",
        "dev_examples": "dev_examples",
    }
    return {name: metrics.get(key) for name, key in keys.items() if metrics.get(key) is not None}


def grown(run_dir) -> list[Version]:
    """The versions `retrikt grow` finished, oldest first (staging folders and half-written ones are not)."""
    folder = versions_dir(run_dir)
    found = []
    if folder.is_dir():
        for path in folder.iterdir():
            if path.is_dir() and NAME.match(path.name) and (path / RECORD).is_file():
                found.append(
                    Version(
                        name=path.name,
                        model_dir=path / "model",
                        store_dir=path / "store",
                        train_store_dir=path / "train_store",
                        predictions=path / "predictions.parquet",
                        record=json.loads((path / RECORD).read_text()),
                    )
                )
    return sorted(found, key=lambda version: version.number)


def all_versions(run_dir) -> list[Version]:
    return [original(run_dir), *grown(run_dir)]


def get(run_dir, name: str) -> Version:
    for version in all_versions(run_dir):
        if version.name == name:
            return version
    known = ", ".join(version.name for version in all_versions(run_dir))
    raise SpecError(f"{Path(run_dir)}: no version {name!r} (versions: {known})")


def current_name(run_dir) -> str:
    path = versions_dir(run_dir) / CURRENT
    return path.read_text().strip() if path.is_file() else ORIGINAL


def current(run_dir) -> Version:
    """The version `retrikt serve` loads: the one CURRENT names, else v0."""
    return get(run_dir, current_name(run_dir))


def use(run_dir, name: str) -> Version:
    """Make `name` the served version (a reload of a running server follows)."""
    version = get(run_dir, name)
    with staged(versions_dir(run_dir) / CURRENT) as staging:
        staging.write_text(name + "\n")
    return version


def next_name(run_dir) -> str:
    numbers = [version.number for version in all_versions(run_dir)]
    folder = versions_dir(run_dir)
    if folder.is_dir():  # a name taken by a half-written folder is not given again
        numbers += [int(match.group(1)) for path in folder.iterdir() if (match := NAME.match(path.name))]
    return f"v{max(numbers) + 1}"


def publish(run_dir, staging: Path, record: dict) -> Version:
    """Write the record into the staging folder, then make the folder the next version with one rename."""
    name = next_name(run_dir)
    record = {**record, "version": name}
    (staging / RECORD).write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    target = versions_dir(run_dir) / name
    os.rename(staging, target)
    return get(run_dir, name)


def link_or_copy_tree(source: Path, target: Path) -> None:
    """A copy of a folder of files that shares their bytes where the filesystem allows (a version's model that
    is its parent's)."""

    def link(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, target, copy_function=link)
