"""Run directories, stage manifests, content hashes, skip and reuse.

Layout: `<runs_dir>/<job>-<spec hash>/job.yaml` and one folder per stage holding its outputs,
`config.yaml` (the resolved config parts the stage read) and `manifest.json` (hash, inputs, metrics,
row counts, timings). A stage is finished when its manifest says so with the hash the current spec
gives it; a finished stage with the same hash in another run directory is copied instead of redone.

`runs_dir` may also be a pyarrow filesystem URI (s3://, gs://, hdfs://, file://): the run is then
worked on in a local staging copy under `cache_dir` and every finished stage folder is uploaded to
the URI (its manifest last, so a half-uploaded stage never looks finished); stages finished at the
URI are fetched instead of redone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import JobSpec, SpecError, content_hash, dump_spec

MANIFEST = "manifest.json"
STAGING_PREFIX = ".staging-"


def file_digest(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def is_uri(location: str | os.PathLike) -> bool:
    """A filesystem URI (s3://bucket/runs, file:///shared/runs) rather than a local path."""
    return "://" in str(location)


def run_location(spec: JobSpec) -> str:
    """Where the run lives: its folder under runs_dir, a path or a URI."""
    name = f"{spec.name}-{spec.spec_hash()[:8]}"
    if is_uri(spec.storage.runs_dir):
        return f"{spec.storage.runs_dir.rstrip('/')}/{name}"
    return str(Path(spec.storage.runs_dir).expanduser() / name)


def staging_dir(run_uri: str, cache_dir: str) -> Path:
    """The local copy of a run kept at a URI: one folder per runs_dir URI, so runs under it can reuse each other."""
    parent, name = run_uri.rstrip("/").rsplit("/", 1)
    return Path(cache_dir).expanduser() / "runs" / content_hash(parent)[:12] / name


def run_dir_for(spec: JobSpec) -> Path:
    """The local run directory the stages write: runs_dir's own, or the staging copy of a URI's."""
    location = run_location(spec)
    return staging_dir(location, spec.storage.cache_dir) if is_uri(location) else Path(location)


@contextlib.contextmanager
def staged(path: Path) -> Iterator[Path]:
    """A staging file beside `path` that replaces it once the block succeeds, so a reader never finds a
    half-written file. A failing block removes its staging file; one left by a killed process is removed
    when its stage finishes (StageRun.finish)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(dir=path.parent, prefix=f"{STAGING_PREFIX}{path.name}.")
    os.close(handle)
    try:
        yield Path(staging)
    except BaseException:
        os.unlink(staging)
        raise
    os.replace(staging, path)


def write_json_atomic(path: Path, payload: Any) -> None:
    with staged(path) as staging:
        staging.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))


def write_parquet_atomic(frame, path: Path) -> None:
    with staged(path) as staging:
        frame.to_parquet(staging, index=False)


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
        for leftover in self.dir.rglob(f"{STAGING_PREFIX}*"):
            leftover.unlink()
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
                str(path.relative_to(self.dir))
                for path in self.dir.rglob("*")
                if path.is_file() and path.name != MANIFEST
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


def stage_hash(config: dict[str, Any], input_hashes: dict[str, str], files: list[str | os.PathLike]) -> str:
    """A stage's hash: the config it reads less what changes no result (stage_contract.Stage.hashed_config), its
    inputs' hashes and the bytes of its data files."""
    return content_hash(
        {
            "config": content_hash(config),
            "inputs": input_hashes,
            "files": {Path(path).name: file_digest(path) for path in files},
        }
    )


def write_job_file(run_dir: Path, spec: JobSpec) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "job.yaml").write_text(dump_spec(spec))


class RemoteRun:
    """A run directory at a pyarrow filesystem URI, mirrored stage by stage with a local folder."""

    def __init__(self, uri: str):
        import pyarrow
        from pyarrow import fs

        self.uri = uri
        try:
            self.filesystem, self.path = fs.FileSystem.from_uri(uri)
        except (pyarrow.ArrowException, OSError, ValueError) as error:
            raise SpecError(f"storage.runs_dir: {uri}: {error}") from None

    def _remote(self, relative: str) -> str:
        return f"{self.path}/{relative}" if relative else self.path

    def read_text(self, relative: str) -> str | None:
        from pyarrow import fs

        if self.filesystem.get_file_info(self._remote(relative)).type != fs.FileType.File:
            return None
        with self.filesystem.open_input_stream(self._remote(relative)) as stream:
            return stream.read().decode()

    def manifest(self, stage: str) -> dict | None:
        text = self.read_text(f"{stage}/{MANIFEST}")
        try:
            return json.loads(text) if text is not None else None
        except json.JSONDecodeError:
            return None

    def is_finished(self, stage: str, stage_hash: str) -> bool:
        manifest = self.manifest(stage)
        return bool(manifest and manifest.get("status") == "done" and manifest.get("stage_hash") == stage_hash)

    def upload_file(self, local: Path, relative: str) -> None:
        self.filesystem.create_dir(self._remote(relative).rsplit("/", 1)[0], recursive=True)
        with open(local, "rb") as source, self.filesystem.open_output_stream(self._remote(relative)) as target:
            shutil.copyfileobj(source, target, 1 << 20)

    def upload_stage(self, stage_dir: Path) -> None:
        """Replace the stage folder at the URI with the local one; the manifest goes last."""
        stage_dir = Path(stage_dir)
        self.filesystem.delete_dir_contents(self._remote(stage_dir.name), missing_dir_ok=True)
        files = sorted(path for path in stage_dir.rglob("*") if path.is_file())
        for path in sorted(files, key=lambda path: path.name == MANIFEST):
            self.upload_file(path, f"{stage_dir.name}/{path.relative_to(stage_dir).as_posix()}")

    def download(self, local: Path, relative: str = "") -> None:
        """Everything under `relative` at the URI into the same place under `local` (replacing it)."""
        from pyarrow import fs

        target = Path(local) / relative
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        root = self._remote(relative)
        for info in self.filesystem.get_file_info(fs.FileSelector(root, recursive=True)):
            if info.type != fs.FileType.File:
                continue
            path = target / info.path[len(root) :].lstrip("/")
            path.parent.mkdir(parents=True, exist_ok=True)
            with self.filesystem.open_input_stream(info.path) as source, open(path, "wb") as out:
                shutil.copyfileobj(source, out, 1 << 20)


def local_run_dir(location: str | os.PathLike, cache_dir: str) -> Path:
    """A run directory to read: a local path as is; a URI's run fetched whole into its staging copy."""
    if not is_uri(location):
        return Path(location)
    remote = RemoteRun(str(location))
    if remote.read_text("job.yaml") is None:
        raise SpecError(f"{location}: not a run directory (no job.yaml)")
    local = staging_dir(str(location), cache_dir)
    remote.download(local)
    return local
