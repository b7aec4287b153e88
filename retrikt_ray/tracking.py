"""MLflow experiment tracking of pipeline runs and sweeps, recorded from what the stages leave behind.

In MLflow: an experiment per job (`tracking.experiment`, default the job's name); a run per run directory, named
after it, with the resolved job spec flattened as parameters (`student.lr`), the stage hashes
(`stage_hash.<stage>`), every stage's scalar metrics (`<stage>.<metric>`) and `job.yaml`; nested under it, a run per
stage with the config it read as parameters, every metric of its manifest with its steps (lists such as
`loss_per_step` step by step, history entries such as PPO's `history.reward` per update and the student's
`history.loss` per epoch), its row counts (`counts.<name>`), `seconds`, and as artifacts `manifest.json`,
`config.yaml`, its plots and the evaluation's predictions. A sweep (`retrikt tune`) is a run with a nested run per
trial (its values, and the sweep's metric at each rung), the trial's pipeline runs nested under it.

The manifests stay the record: a stage is recorded from its manifest once it is finished (or found finished, or
reused), so a stage finished while tracking was off is recorded by the next run of its folder, and running a run
directory again continues its MLflow run without recording a stage twice. Everything is logged by the process that
runs the pipeline (the CLI, or a Tune trial), never by Ray workers, with the tracking URI passed explicitly: on a
cluster set `tracking.uri` to a server (or a database on a shared volume) that those processes reach.

Tracking never breaks a run: the first failure (an unreachable server, a locked or unwritable database) is said in
one line and tracking stops for the rest of that run; HTTP calls are made with few retries and a short timeout.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .artifacts import MANIFEST, read_manifest, run_dir_for
from .config import JobSpec

if TYPE_CHECKING:
    from .artifacts import StageRun

# The default store: `<runs folder>/mlflow/mlflow.db`, the artifacts beside it.
STORE_DIR = "mlflow"
STORE_FILE = "mlflow.db"
# Files of a stage folder logged as artifacts of its MLflow run.
STAGE_ARTIFACTS = (MANIFEST, "config.yaml", "*.png", "predictions.parquet")
SWEEP_ARTIFACTS = ("results.md", "results.parquet", "*.png", "best.yaml")
# HTTP limits: the first contact fails fast (no retry, 5 s); later calls retry a little. A user's own settings of
# these variables win for later calls, never for the first contact.
PROBE_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
CALL_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
# Tags (MLflow's own, and ours).
PARENT = "mlflow.parentRunId"
NOTE = "mlflow.note.content"
KIND, RUN_DIR, STAGE, STAGE_HASH = "retrikt.kind", "retrikt.run_dir", "retrikt.stage", "retrikt.stage_hash"
FINISHED_AT = "retrikt.finished_at"  # with the stage hash, which manifest a stage run records
# Keys of a history entry that number it (its step), rather than measure anything.
STEP_KEYS = ("epoch", "update", "step")
MAX_PARAM_LENGTH = 6000
BATCH = 1000  # metrics per log_batch call (MLflow's limit)
PARAM_BATCH = 100

# URIs this process found failing: said once, then left alone for the process's later runs.
_failed: dict[str, str] = {}


def tracking_uri(spec: JobSpec) -> str | None:
    """The MLflow tracking URI the job logs to; None when tracking is off. A relative sqlite path is made absolute
    (Tune trials run in folders of their own)."""
    if not spec.tracking.enabled:
        return None
    uri = spec.tracking.uri
    if uri is None:
        return f"sqlite:///{(run_dir_for(spec).parent / STORE_DIR / STORE_FILE).expanduser().resolve()}"
    path = sqlite_path(uri)
    if path is not None and not path.is_absolute():
        return f"sqlite:///{path.expanduser().resolve()}"
    return uri


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///...` URI, else None."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def experiment_name(spec: JobSpec) -> str:
    return spec.tracking.experiment or spec.name


def where(spec: JobSpec) -> str | None:
    """One line saying where the job's runs are tracked: the `mlflow ui` command for a local database, else the
    URI; None when tracking is off or failed in this process."""
    uri = tracking_uri(spec)
    if uri is None or uri in _failed:
        return None
    if sqlite_path(uri) is not None:
        return f"tracked in MLflow (experiment {experiment_name(spec)}): mlflow ui --backend-store-uri {uri}"
    return f"tracked in MLflow at {uri} (experiment {experiment_name(spec)})"


# ------------------------------------------------------------------------------------------ flattening
def _key(text: str) -> str:
    """A metric or parameter name MLflow accepts (letters, digits, _ - . space : /)."""
    return re.sub(r"[^\w\-. :/]", "_", text)[:250]


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def flat_params(value: Any, prefix: str = "") -> dict[str, str]:
    """A nested mapping as `section.field` -> text: strings as they are, anything else as JSON."""
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for name, item in value.items():
            out |= flat_params(item, f"{prefix}.{name}" if prefix else str(name))
        return out
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return {_key(prefix): text[:MAX_PARAM_LENGTH]}


def flat_metrics(value: Any, prefix: str = "") -> list[tuple[str, float, int]]:
    """(name, value, step) of every number under a manifest's metrics: a scalar at step 0 (a flag as 0 or 1), a
    list of numbers step by step, a list of entries (a history) field by field at each entry's own step
    (`epoch`, `update`, `step`, else its position); text is left out (the manifest artifact holds it)."""
    out: list[tuple[str, float, int]] = []
    if isinstance(value, bool) or _number(value):
        out.append((_key(prefix), float(value), 0))
    elif isinstance(value, dict):
        for name, item in value.items():
            out += flat_metrics(item, f"{prefix}.{name}" if prefix else str(name))
    elif isinstance(value, list) and value and all(_number(item) for item in value):
        out += [(_key(prefix), float(item), step) for step, item in enumerate(value)]
    elif isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
        for position, entry in enumerate(value):
            step = next((entry[key] for key in STEP_KEYS if isinstance(entry.get(key), int)), position)
            for name, item in entry.items():
                if name not in STEP_KEYS and (isinstance(item, bool) or _number(item)):
                    out.append((_key(f"{prefix}.{name}"), float(item), int(step)))
    return out


def manifest_metrics(manifest: dict) -> list[tuple[str, float, int]]:
    """Every metric of a stage's manifest, its row counts (`counts.<name>`) and `seconds`."""
    out = flat_metrics(manifest.get("metrics", {}))
    out += flat_metrics(manifest.get("counts", {}), "counts")
    if _number(manifest.get("seconds")):
        out.append(("seconds", float(manifest["seconds"]), 0))
    return out


def _finished_ms(manifest: dict) -> int:
    try:
        return int(time.mktime(time.strptime(manifest["finished_at"][:19], "%Y-%m-%dT%H:%M:%S")) * 1000)
    except (KeyError, TypeError, ValueError, OverflowError):
        return int(time.time() * 1000)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


@contextlib.contextmanager
def environment(values: dict[str, str], override: bool) -> Iterator[None]:
    """Environment variables for a block (MLflow's HTTP settings, Ray Train's poll): `override` sets them, else
    only those the user left unset; restored after."""
    saved = {name: os.environ.get(name) for name in values}
    for name, value in values.items():
        if override or name not in os.environ:
            os.environ[name] = value
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# ---------------------------------------------------------------------------------------------- store
class Tracker:
    """One tracking URI and experiment, with the never-break policy: `guard()` blocks swallow any failure, say it
    once in one line (through `log`) and turn the tracker off."""

    def __init__(self, spec: JobSpec, log: Callable[[str], None]):
        self.uri = tracking_uri(spec)
        self.experiment = experiment_name(spec)
        self.log = log
        self.client = None
        self.experiment_id: str | None = None
        self.on = self.uri is not None and self.uri not in _failed
        if self.on:
            with self.guard(first=True):
                self._connect()

    @property
    def off(self) -> bool:
        return not self.on

    @contextlib.contextmanager
    def guard(self, first: bool = False) -> Iterator[None]:
        try:
            with environment(PROBE_ENV if first else CALL_ENV, override=first):
                yield
        except Exception as error:  # tracking must never break a run
            self.on = False
            if self.uri not in _failed:
                _failed[self.uri] = _one_line(error)
                self.log(
                    f"[tracking] MLflow at {self.uri} failed ({_failed[self.uri]}): the run goes on untracked; "
                    "its manifests hold every result"
                )

    def _connect(self) -> None:
        from mlflow import MlflowClient

        path = sqlite_path(self.uri)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=self.uri)
        experiment = self.client.get_experiment_by_name(self.experiment)
        if experiment is None:
            # A local database keeps its artifacts beside it (MLflow's default would be ./mlruns of the working
            # folder); a server decides its own.
            location = str(path.with_name(path.stem + "-artifacts")) if path is not None else None
            try:
                self.experiment_id = self.client.create_experiment(self.experiment, artifact_location=location)
            except Exception:
                experiment = self.client.get_experiment_by_name(self.experiment)  # created meanwhile elsewhere
                if experiment is None:
                    raise
                self.experiment_id = experiment.experiment_id
        else:
            self.experiment_id = experiment.experiment_id

    # The calls below run inside guard() blocks of their callers.
    def find(self, tags: dict[str, str], parent: str | None) -> Any | None:
        """The newest run with these tags under `parent` (None: a top-level run)."""
        conditions = [f"tags.`{name}` = '{value}'" for name, value in tags.items()]
        for run in self.client.search_runs(
            [self.experiment_id], " and ".join(conditions), order_by=["start_time DESC"]
        ):
            if run.data.tags.get(PARENT) == parent:
                return run
        return None

    def children(self, parent: str) -> list:
        return self.client.search_runs([self.experiment_id], f"tags.`{PARENT}` = '{parent}'", max_results=5000)

    def create(self, name: str, tags: dict[str, str], parent: str | None, start_ms: int | None = None) -> str:
        tags = {**tags, **({PARENT: parent} if parent else {})}
        run = self.client.create_run(self.experiment_id, start_time=start_ms, tags=tags, run_name=name)
        return run.info.run_id

    def params(self, run_id: str, params: dict[str, str], existing: dict[str, str] | None = None) -> None:
        """Log the parameters a run lacks (MLflow refuses to change a logged one)."""
        from mlflow.entities import Param

        missing = [Param(key, value) for key, value in params.items() if existing is None or key not in existing]
        for first in range(0, len(missing), PARAM_BATCH):
            self.client.log_batch(run_id, params=missing[first : first + PARAM_BATCH])

    def metrics(self, run_id: str, metrics: list[tuple[str, float, int]], at_ms: int | None = None) -> None:
        from mlflow.entities import Metric

        at_ms = at_ms or int(time.time() * 1000)
        entries = [Metric(key, value, at_ms, step) for key, value, step in metrics]
        for first in range(0, len(entries), BATCH):
            self.client.log_batch(run_id, metrics=entries[first : first + BATCH])

    def artifacts(self, run_id: str, folder: Path, patterns: tuple[str, ...], under: str | None = None) -> None:
        for pattern in patterns:
            for path in sorted(Path(folder).glob(pattern)):
                if path.is_file():
                    self.client.log_artifact(run_id, str(path), under)

    def end(self, run_id: str, status: str, end_ms: int | None = None) -> None:
        self.client.set_terminated(run_id, status, end_time=end_ms)


def _status(error: BaseException | None) -> str:
    if error is None:
        return "FINISHED"
    # Ctrl-C, or Tune stopping a trial early (ASHA: its report raises SystemExit in the trial).
    return "KILLED" if isinstance(error, (KeyboardInterrupt, SystemExit)) else "FAILED"


# ----------------------------------------------------------------------------------------- pipeline run
class PipelineTracker:
    """The MLflow run of one run directory (continued when the folder is run again) and its stage runs.

    `stage(stage_run)` records a finished stage from its manifest unless this run already holds that manifest (the
    same hash and finish time: a stage redone with --force is recorded again); used as a context manager, the run
    ends FINISHED, or FAILED (KILLED on Ctrl-C) on an exception.
    """

    def __init__(
        self,
        spec: JobSpec,
        run_dir: Path,
        stages: list[StageRun],
        log: Callable[[str], None] = print,
        parent: str | None = None,
    ):
        self.tracker = Tracker(spec, log)
        self.run_id: str | None = None
        self.recorded: dict[str, set[str]] = {}
        self.ended = False
        if self.tracker.off:
            return
        with self.tracker.guard():
            self._start(spec, Path(run_dir).resolve(), stages, parent)

    def _start(self, spec: JobSpec, run_dir: Path, stages: list[StageRun], parent: str | None) -> None:
        tracker = self.tracker
        tags = {KIND: "pipeline", RUN_DIR: str(run_dir)}
        found = tracker.find(tags, parent)
        existing: dict[str, str] | None = None
        if found is None:
            self.run_id = tracker.create(run_dir.name, {**tags, "retrikt.spec_hash": spec.spec_hash()}, parent)
        else:
            self.run_id, existing = found.info.run_id, found.data.params
            tracker.client.update_run(self.run_id, status="RUNNING")
            for child in tracker.children(self.run_id):
                name, digest = child.data.tags.get(STAGE), child.data.tags.get(STAGE_HASH)
                if name and digest:
                    self.recorded.setdefault(name, set()).add(f"{digest}@{child.data.tags.get(FINISHED_AT)}")
        params = flat_params(spec.model_dump(mode="json"))
        params |= {f"stage_hash.{stage.name}": stage.stage_hash for stage in stages}
        tracker.params(self.run_id, params, existing)
        if (run_dir / "job.yaml").is_file():
            tracker.client.log_artifact(self.run_id, str(run_dir / "job.yaml"))

    def stage(self, stage: StageRun) -> None:
        """Record a finished stage (ran, found finished or reused) from its manifest."""
        if self.tracker.off or self.run_id is None:
            return
        manifest = read_manifest(stage.dir)
        if not manifest or manifest.get("status") != "done":
            return
        digest = manifest.get("stage_hash", stage.stage_hash)
        key = f"{digest}@{manifest.get('finished_at')}"  # a stage redone (--force) is recorded again
        if key in self.recorded.get(stage.name, set()):
            return
        with self.tracker.guard():
            self._record(stage, manifest, digest)
            self.recorded.setdefault(stage.name, set()).add(key)

    def _record(self, stage: StageRun, manifest: dict, digest: str) -> None:
        tracker = self.tracker
        end_ms = _finished_ms(manifest)
        seconds = manifest.get("seconds") if _number(manifest.get("seconds")) else 0.0
        tags = {KIND: "stage", STAGE: stage.name, STAGE_HASH: digest, FINISHED_AT: str(manifest.get("finished_at"))}
        tags[NOTE] = str(manifest.get("summary", ""))[:5000]  # the run's description in MLflow's UI
        if manifest.get("reused_from"):
            tags["retrikt.reused_from"] = str(manifest["reused_from"])
        run_id = tracker.create(stage.name, tags, self.run_id, start_ms=end_ms - int(seconds * 1000))
        tracker.params(run_id, flat_params(stage.config))
        metrics = manifest_metrics(manifest)
        tracker.metrics(run_id, metrics, end_ms)
        # The pipeline run gets each stage's scalars, `<stage>.<metric>`, to compare runs in one table.
        steps = Counter(key for key, _, _ in metrics)
        scalars = [(_key(f"{stage.name}.{key}"), value, 0) for key, value, _ in metrics if steps[key] == 1]
        tracker.metrics(self.run_id, scalars, end_ms)
        tracker.artifacts(run_id, stage.dir, STAGE_ARTIFACTS)
        tracker.end(run_id, "FINISHED", end_ms)

    def end(self, error: BaseException | None = None) -> None:
        if self.ended or self.tracker.off or self.run_id is None:
            return
        self.ended = True
        with self.tracker.guard():
            self.tracker.end(self.run_id, _status(error))

    def __enter__(self) -> PipelineTracker:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.end(error)


# ------------------------------------------------------------------------------------------ sweeps
class SweepTracker:
    """The MLflow run of one `retrikt tune` (a new one each time), the parent of its trials' runs and of the
    pipeline run of the stages the trials share."""

    def __init__(self, spec: JobSpec, sweep: dict, out: Path, log: Callable[[str], None] = print):
        self.tracker = Tracker(spec, log)
        self.run_id: str | None = None
        if self.tracker.off:
            return
        with self.tracker.guard():
            out = Path(out).resolve()
            self.run_id = self.tracker.create(out.name, {KIND: "sweep", RUN_DIR: str(out)}, None)
            params = flat_params(spec.model_dump(mode="json")) | flat_params(sweep, "sweep")
            self.tracker.params(self.run_id, params)

    def trial_spec(self, spec: JobSpec) -> JobSpec:
        """The spec the trials run: the URI written out (they run elsewhere), or tracking off when it failed here."""
        from .tune import with_values

        if self.tracker.off:
            return with_values(spec, {"tracking.enabled": False}) if spec.tracking.enabled else spec
        return with_values(spec, {"tracking.uri": self.tracker.uri})

    def finish(self, out: Path, metric: str, best: float | None, error: BaseException | None = None) -> None:
        """End the sweep's run with its best value and result files; trials Tune stopped early (ASHA), whose runs
        were left open, end KILLED."""
        if self.tracker.off or self.run_id is None:
            return
        tracker = self.tracker
        with tracker.guard():
            if best is not None and math.isfinite(best):
                tracker.metrics(self.run_id, [(_key(f"best.{metric}"), float(best), 0)])
            tracker.artifacts(self.run_id, out, SWEEP_ARTIFACTS)
            for trial in tracker.children(self.run_id):
                for run in [*tracker.children(trial.info.run_id), trial]:
                    if run.info.status == "RUNNING":
                        tracker.end(run.info.run_id, "KILLED")
            tracker.end(self.run_id, _status(error))
        self.run_id = None

    def __enter__(self) -> SweepTracker:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        """On an exception the sweep's run ends FAILED (KILLED on Ctrl-C); else `finish` ends it."""
        if error is not None and self.tracker.on and self.run_id is not None:
            with self.tracker.guard():
                self.tracker.end(self.run_id, _status(error))


class TrialTracker:
    """A Tune trial's run under its sweep's run: the trial's values as parameters, the sweep's metric per rung."""

    def __init__(self, spec: JobSpec, parent: str | None, name: str, values: dict, log: Callable[[str], None]):
        self.tracker = Tracker(spec, log)
        self.run_id: str | None = None
        if self.tracker.off or parent is None:
            self.tracker.on = False
            return
        with self.tracker.guard():
            self.run_id = self.tracker.create(name, {KIND: "trial"}, parent)
            self.tracker.params(self.run_id, flat_params(values))

    def metric(self, name: str, value: float | None, step: int = 0) -> None:
        if self.tracker.off or self.run_id is None or value is None or not _number(value):
            return
        with self.tracker.guard():
            self.tracker.metrics(self.run_id, [(_key(name), float(value), step)])

    def __enter__(self) -> TrialTracker:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if self.tracker.off or self.run_id is None:
            return
        with self.tracker.guard():
            self.tracker.end(self.run_id, _status(error))
