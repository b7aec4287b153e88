"""Traffic capture (`serve.capture`): the inputs `/v1/classify` predicted, kept for `retrikt grow --from-traffic`.

What is stored, under `<run>/traffic/`: per input its fields (the task's input fields, as sent), the predicted
label, its probability (`confidence`), the version that answered and the time. Never a header, a token or
anything else of the request. Each predicted batch is one Parquet file, written whole and renamed into place, so a
crash loses at most the batch being written. Beyond `max_rows` the oldest inputs are dropped and counted
(`dropped-*.json`, one per writing process).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from pathlib import Path

TRAFFIC = "traffic"
LOCK = ".lock"


def traffic_dir(run_dir) -> Path:
    return Path(run_dir) / TRAFFIC


def _files(folder: Path) -> list[Path]:
    # Named <time_ns>-<pid>-<rows>.parquet: sorted by name is oldest first.
    return sorted(path for path in folder.glob("*.parquet") if not path.name.startswith("."))


def _rows(path: Path) -> int:
    return int(path.stem.rsplit("-", 1)[1])


@contextlib.contextmanager
def _locked(folder: Path):
    with open(folder / LOCK, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class TrafficWriter:
    """Appends a replica's predicted batches to the run's traffic folder, keeping at most `max_rows` inputs."""

    def __init__(self, run_dir, max_rows: int, max_confidence: float):
        self.folder = traffic_dir(run_dir)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_rows = max_rows
        self.max_confidence = max_confidence
        self.dropped_file = self.folder / f"dropped-{os.getpid()}.json"

    def append(self, fields: list[dict[str, str]], labels: list[str], confidences: list[float], version: str) -> int:
        """Keep the inputs the student was at most `max_confidence` sure of; returns how many were kept."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        kept = [index for index, confidence in enumerate(confidences) if confidence <= self.max_confidence]
        if not kept:
            return 0
        table = pa.table(
            {
                "fields": [json.dumps(fields[index], ensure_ascii=False) for index in kept],
                "label": [labels[index] for index in kept],
                "confidence": [float(confidences[index]) for index in kept],
                "version": [version] * len(kept),
                "time": [time.time()] * len(kept),
            }
        )
        name = f"{time.time_ns()}-{os.getpid()}-{len(kept)}.parquet"
        staging = self.folder / f".{name}"
        pq.write_table(table, staging)
        os.replace(staging, self.folder / name)
        self._bound()
        return len(kept)

    def _bound(self) -> None:
        """Drop the oldest inputs beyond max_rows (whole files, or the head of the oldest one), counting them."""
        import pyarrow.parquet as pq

        with _locked(self.folder):
            files = _files(self.folder)
            excess = sum(_rows(path) for path in files) - self.max_rows
            dropped = 0
            for path in files:
                if excess <= 0:
                    break
                rows = _rows(path)
                if rows <= excess:
                    path.unlink()
                    dropped += rows
                    excess -= rows
                else:
                    table = pq.read_table(path).slice(excess)
                    time_ns, pid, _ = path.stem.split("-")
                    staging = self.folder / f".{path.name}"
                    pq.write_table(table, staging)
                    os.replace(staging, self.folder / f"{time_ns}-{pid}-{table.num_rows}.parquet")
                    path.unlink()
                    dropped += excess
                    excess = 0
            if dropped:
                before = json.loads(self.dropped_file.read_text())["dropped"] if self.dropped_file.exists() else 0
                self.dropped_file.write_text(json.dumps({"dropped": before + dropped}) + "\n")


def traffic_summary(run_dir) -> dict:
    """Rows kept, rows dropped beyond max_rows, files."""
    folder = traffic_dir(run_dir)
    if not folder.is_dir():
        return {"rows": 0, "dropped": 0, "files": 0}
    files = _files(folder)
    dropped = sum(json.loads(path.read_text())["dropped"] for path in folder.glob("dropped-*.json"))
    return {"rows": sum(_rows(path) for path in files), "dropped": dropped, "files": len(files)}


def read_traffic(run_dir) -> tuple[list[dict[str, str]], str]:
    """Every captured input's fields, oldest first, and a digest of them."""
    import pyarrow.parquet as pq

    folder = traffic_dir(run_dir)
    if not folder.is_dir():
        return [], ""
    digest = hashlib.sha256()
    fields = []
    with _locked(folder):
        for path in _files(folder):
            for text in pq.read_table(path, columns=["fields"]).column("fields").to_pylist():
                digest.update(text.encode() + b"\n")
                fields.append(json.loads(text))
    return fields, digest.hexdigest()[:16]
