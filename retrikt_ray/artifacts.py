"""Run directories, stage manifests, content hashes, skip and reuse.

Layout: `<runs_dir>/<job>-<spec hash>/job.yaml` and one folder per stage holding its outputs,
`config.yaml` (the resolved config parts the stage read) and `manifest.json` (hash, inputs, metrics,
row counts, timings). A stage is finished when its manifest says so with the hash the current spec
gives it; a finished stage with the same hash in another run directory is copied instead of redone.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import JobSpec, content_hash, dump_spec

MANIFEST = "manifest.json"


def file_digest(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def run_dir_for(spec: JobSpec) -> Path:
    return Path(spec.storage.runs_dir).expanduser() / f"{spec.name}-{spec.spec_hash()[:8]}"


def write_json_atomic(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(handle, "w") as out:
        json.dump(payload, out, indent=2, sort_keys=True, default=str)
    os.replace(staging, path)


def read_manifest(stage_dir: Path) -> dict | None:
    path = Path(stage_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def is_finished(stage_dir: Path, stage_hash: str) -> bool:
    manifest = read_manifest(stage_dir)
    return bool(manifest and manifest.get("status") == "done" and manifest.get("stage_hash") == stage_hash)


def find_finished_elsewhere(runs_root: Path, stage: str, stage_hash: str, exclude: Path) -> Path | None:
    """A finished copy of this stage (same hash) in another run directory under the same root."""
    for candidate in sorted(Path(runs_root).glob(f"*/{stage}")):
        if candidate.parent.resolve() != Path(exclude).resolve() and is_finished(candidate, stage_hash):
            return candidate
    return None


@dataclass
class StageResult:
    """What a stage reports: metrics (floats), row counts (ints, including what was dropped and why)."""

    metrics: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    summary: str = ""


@dataclass
class StageRun:
    """One stage's place in a run: where it writes, what it reads, and its hash."""

    name: str
    run_dir: Path
    stage_hash: str
    config: dict[str, Any]
    inputs: dict[str, Path]
    input_hashes: dict[str, str]

    @property
    def dir(self) -> Path:
        return self.run_dir / self.name

    def prepare(self) -> None:
        """Make the stage folder; wipe it if it holds another hash's finished work (stale)."""
        manifest = read_manifest(self.dir)
        if manifest is not None and manifest.get("stage_hash") != self.stage_hash:
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "config.yaml").write_text(yaml.safe_dump(self.config, sort_keys=False))

    def finish(self, result: StageResult, seconds: float, reused_from: Path | None = None) -> dict:
        manifest = {
            "stage": self.name,
            "status": "done",
            "stage_hash": self.stage_hash,
            "inputs": self.input_hashes,
            "metrics": result.metrics,
            "counts": result.counts,
            "summary": result.summary,
            "seconds": round(seconds, 3),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "files": sorted(
                str(path.relative_to(self.dir)) for path in self.dir.rglob("*") if path.is_file() and path.name != MANIFEST
            ),
        }
        if reused_from is not None:
            manifest["reused_from"] = str(reused_from)
        write_json_atomic(self.dir / MANIFEST, manifest)
        return manifest

    def reuse(self, source: Path) -> dict:
        """Copy a finished stage with the same hash from another run directory."""
        if self.dir.exists():
            shutil.rmtree(self.dir)
        shutil.copytree(source, self.dir)
        manifest = read_manifest(self.dir)
        manifest["reused_from"] = str(source)
        write_json_atomic(self.dir / MANIFEST, manifest)
        return manifest


def stage_hash(spec: JobSpec, config_keys: tuple[str, ...], input_hashes: dict[str, str], files: list[str]) -> str:
    return content_hash(
        {
            "config": spec.section_hash(*config_keys),
            "inputs": input_hashes,
            "files": {Path(path).name: file_digest(path) for path in files},
        }
    )


def write_job_file(run_dir: Path, spec: JobSpec) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "job.yaml").write_text(dump_spec(spec))

