"""The ordered stages and how a run walks them: hash, skip what is finished, reuse, run, record."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from .artifacts import (
    RemoteRun,
    StageRun,
    find_finished_elsewhere,
    is_finished,
    is_uri,
    read_manifest,
    run_dir_for,
    run_location,
    stage_hash,
    write_job_file,
)
from .config import JobSpec, SpecError
from .ray_session import ray_session
from .stage_contract import Stage
from .stages import evaluate, generate, ppo, prompt, store, student, unlabelled
from .tracking import PipelineTracker

# Each stage's contract (stage_contract.Stage), in the order they run.
STAGES: tuple[Stage, ...] = tuple(
    module.STAGE for module in (prompt, ppo, generate, unlabelled, store, student, evaluate)
)
STAGE_NAMES = tuple(stage.name for stage in STAGES)


def validate(spec: JobSpec) -> str:
    """Everything checkable without running: task, data files (every row), few-shot draw, model names."""
    from .models import ModelNotFound, check_model_name
    from .tasks import Task, data_files

    task = Task.from_spec(spec.task)
    train, dev = data_files(spec, task)
    train_rows, dev_rows = task.load(train), task.load(dev)
    task.few_shot(train_rows, spec.data.shots, spec.data.seed)
    if spec.unlabelled.file is not None:
        task.load(spec.unlabelled.file, labelled=False)
    for field, name in (("teacher.model", spec.teacher.model), ("student.model", spec.student.model)):
        try:
            check_model_name(name)
        except ModelNotFound as error:
            raise SpecError(f"{field}: {error}") from None
    return (
        f"{spec.name}: task {task.name} ({task.num_labels} labels), "
        f"{len(train_rows)} train rows, {len(dev_rows)} dev rows"
    )


def plan(spec: JobSpec, run_dir: Path) -> list[StageRun]:
    """Every stage with its hash: its config parts, its data files and its inputs' hashes."""
    from .tasks import Task, data_files

    train, dev = data_files(spec, Task.from_spec(spec.task))
    hashes: dict[str, str] = {}
    runs = []
    for stage in STAGES:
        inputs = {name: hashes[name] for name in stage.inputs}
        files = stage.data_files(spec, train, dev)
        hashes[stage.name] = stage_hash(stage.hashed_config(spec), inputs, files)
        runs.append(
            StageRun(
                name=stage.name,
                run_dir=run_dir,
                stage_hash=hashes[stage.name],
                config=stage.config(spec),
                inputs={name: run_dir / name for name in stage.inputs},
                input_hashes=inputs,
            )
        )
    return runs


def sync_with_remote(remote: RemoteRun, stages: list[StageRun], log: Callable[[str], None]) -> None:
    """Fetch the stages finished at the URI that the staging copy lacks; upload the reverse."""
    for stage in stages:
        here, there = is_finished(stage.dir, stage.stage_hash), remote.is_finished(stage.name, stage.stage_hash)
        if there and not here:
            remote.download(stage.run_dir, stage.name)
            log(f"[{stage.name}] finished at {remote.uri}, fetched")
        elif here and not there:
            remote.upload_stage(stage.dir)


def run(
    spec: JobSpec,
    only: str | None = None,
    force: bool = False,
    log: Callable[[str], None] = print,
    tracking_parent: str | None = None,
) -> Path:
    """Run the pipeline (or one stage) and return the (local) run directory.

    With a URI as runs_dir, the stages run in the local staging copy and each one is uploaded when done.
    Each stage, once finished (or found finished), is recorded in MLflow (tracking.py), in the run directory's
    MLflow run, nested under `tracking_parent` (a sweep's or a trial's run) when given.
    """
    from .models import teacher_path

    if only is not None and only not in STAGE_NAMES:
        raise SpecError(f"--stage {only}: not a stage (one of {', '.join(STAGE_NAMES)})")
    run_dir = run_dir_for(spec)
    write_job_file(run_dir, spec)
    stages = plan(spec, run_dir)
    remote = RemoteRun(run_location(spec)) if is_uri(spec.storage.runs_dir) else None
    if remote is not None:
        remote.upload_file(run_dir / "job.yaml", "job.yaml")
        sync_with_remote(remote, stages, log)
    contracts = dict(zip(STAGE_NAMES, STAGES))
    selected = [stage for stage in stages if only in (None, stage.name)]
    for stage in selected:
        for name, input_hash in stage.input_hashes.items():
            if only is not None and not is_finished(run_dir / name, input_hash):
                raise SpecError(f"--stage {only}: needs stage '{name}' finished first (run without --stage)")
    pending = [stage for stage in selected if force or not is_finished(stage.dir, stage.stage_hash)]
    tracker = PipelineTracker(spec, run_dir, stages, log, tracking_parent)
    for stage in selected:
        if stage not in pending:
            log(f"[{stage.name}] finished earlier, skipped")
            tracker.stage(stage)
    if not pending:
        tracker.end()
        return run_dir
    teacher_path(spec.teacher.model, spec.storage.cache_dir)  # convert once here, not in every worker
    with ray_session(spec), tracker:
        for stage in pending:
            source = None if force else find_finished_elsewhere(run_dir.parent, stage.name, stage.stage_hash, run_dir)
            if source is not None:
                stage.reuse(source)
                log(f"[{stage.name}] same inputs as {source}, reused")
            else:
                stage.prepare()
                started = time.perf_counter()
                result = contracts[stage.name].run(spec, stage)
                manifest = stage.finish(result, time.perf_counter() - started)
                log(f"[{stage.name}] {manifest['seconds']:.0f}s: {result.summary}")
            tracker.stage(stage)
            if remote is not None:
                remote.upload_stage(stage.dir)
                log(f"[{stage.name}] uploaded to {remote.uri}/{stage.name}")
    return run_dir


def stage_status(run_dir: Path) -> list[dict]:
    """Each stage's manifest (or a 'missing' row) for `retrikt show`."""
    rows = []
    for name in STAGE_NAMES:
        manifest = read_manifest(Path(run_dir) / name)
        rows.append(manifest or {"stage": name, "status": "missing"})
    return rows
