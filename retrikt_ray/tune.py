"""`retrikt tune`: Ray Tune over any job fields; every trial is the pipeline on the job with its values.

A sweep file names the metric (`<stage>.<metric>` of a stage manifest), the search space over
`section.field` paths (choice, uniform, loguniform, grid), the search algorithm (random, or Optuna or
HyperOpt when installed) and the scheduler. Trials share what they can: the stages before the first
stage any swept field changes run once before Tune starts, and every trial copies them (the pipeline
reuses a finished stage of the same hash from another run directory), so one generation and store
serve every trial of a student sweep.

ASHA needs a trial to report more than once, and a pipeline run reports once. With
`scheduler: {type: asha, fidelity: student.epochs, rungs: [1, 2, 3]}` a trial runs the pipeline at
each rung value of the fidelity field in turn, reports after each, and ASHA stops the weaker trials
after the lower rungs. A rung re-runs only the stages that field changes, from scratch.

Output, in `<runs_dir>/sweep-<job>-<hash>/`: `results.parquet` and `results.md` (one row per trial,
best first), `metric_vs_fields.png`, and `best.yaml`, the best trial as a complete job spec (running it
finds every stage finished), beside Tune's own records in `tune/`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from . import pipeline
from .artifacts import is_uri, read_manifest, run_dir_for
from .config import JobSpec, SpecError, apply_overrides, content_hash, dump_spec, validate_spec
from .ray_session import ray_session
from .tracking import SweepTracker

SEARCHERS = {
    "optuna": ("ray.tune.search.optuna", "OptunaSearch"),
    "hyperopt": ("ray.tune.search.hyperopt", "HyperOptSearch"),
}


class Domain(BaseModel):
    """One swept field's values: exactly one of these keys."""

    model_config = ConfigDict(extra="forbid")

    choice: list[Any] | None = Field(None, description="Sampled uniformly from these values")
    grid: list[Any] | None = Field(
        None, description="Every value, each with every other grid field's (random search only)"
    )
    uniform: tuple[float, float] | None = Field(None, description="[low, high], sampled uniformly")
    loguniform: tuple[float, float] | None = Field(None, description="[low, high] > 0, sampled uniformly in log space")

    @model_validator(mode="after")
    def _one_kind(self):
        given = [kind for kind in ("choice", "grid", "uniform", "loguniform") if getattr(self, kind) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of choice, grid, uniform, loguniform")
        if given[0] in ("choice", "grid") and not getattr(self, given[0]):
            raise ValueError(f"{given[0]} is empty")
        bounds = self.uniform or self.loguniform
        if bounds and not (bounds[0] < bounds[1] and (self.uniform or bounds[0] > 0)):
            raise ValueError("needs low < high (and low > 0 for loguniform)")
        return self

    @property
    def kind(self) -> str:
        return next(kind for kind in ("choice", "grid", "uniform", "loguniform") if getattr(self, kind) is not None)

    def values(self) -> list:
        """Values that stand for the domain when checking it: its choices, or its bounds."""
        return list(getattr(self, self.kind))

    def to_tune(self):
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(self.grid)
        if self.kind == "choice":
            return tune.choice(self.choice)
        return tune.uniform(*self.uniform) if self.kind == "uniform" else tune.loguniform(*self.loguniform)


class SchedulerSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["none", "asha"] = Field(
        "none", description="asha: stop weak trials at the rungs; none: run every trial fully"
    )
    fidelity: str | None = Field(None, description="An integer job field a trial raises rung by rung (student.epochs)")
    rungs: list[int] = Field(default_factory=list, description="The fidelity field's values, lowest first")
    reduction_factor: float = Field(2.0, gt=1, description="ASHA keeps the best 1/reduction_factor at each rung")

    @model_validator(mode="after")
    def _rungs(self):
        if self.type == "asha" and (self.fidelity is None or len(self.rungs) < 2):
            raise ValueError("asha needs a fidelity field and at least two rungs")
        if self.rungs != sorted(set(self.rungs)):
            raise ValueError("rungs must increase")
        return self


class SweepSpec(BaseModel):
    """A sweep file."""

    model_config = ConfigDict(extra="forbid")

    metric: str = Field(
        "evaluate.accuracy_student_store", pattern=r"^[a-z]+\.\w+$", description="<stage>.<metric> of a stage manifest"
    )
    mode: Literal["max", "min"] = "max"
    num_samples: int = Field(8, ge=1, description="Trials drawn (each grid combination this many times)")
    search: Literal["random", "optuna", "hyperopt"] = "random"
    scheduler: SchedulerSpec = SchedulerSpec()
    max_concurrent: int | None = Field(
        None, ge=1, description="Trials at once (None: as many as the cluster's resources hold)"
    )
    set: dict[str, Any] = Field(default_factory=dict, description="Fields fixed for every trial")
    space: dict[str, Domain] = Field(description="section.field -> its domain")

    @model_validator(mode="after")
    def _consistent(self):
        if not self.space:
            raise ValueError("space: no field to sweep")
        if self.search != "random" and any(domain.kind == "grid" for domain in self.space.values()):
            raise ValueError(f"grid needs search: random ({self.search} samples its own points)")
        if self.scheduler.fidelity in self.space:
            raise ValueError(f"{self.scheduler.fidelity} is both swept and the fidelity")
        if self.metric.split(".")[0] not in pipeline.STAGE_NAMES:
            raise ValueError(f"metric: '{self.metric.split('.')[0]}' is not a stage")
        return self

    @property
    def tune_metric(self) -> str:
        return self.metric.replace(".", "/")  # Tune flattens the reported {stage: {metric: value}} this way


def load_sweep(path: str | Path) -> SweepSpec:
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: sweep file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
        return SweepSpec.model_validate(raw)
    except yaml.YAMLError as error:
        raise SpecError(f"{path}: not valid YAML ({getattr(error, 'problem', error)})") from None
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise SpecError(f"{path}: {where}: {first['msg'].removeprefix('Value error, ')}") from None


def with_values(spec: JobSpec, values: dict[str, Any]) -> JobSpec:
    """A copy of the spec with `section.field` values set as `--set` sets them (`config.apply_overrides`), then
    validated as a loaded spec is (`config.validate_spec`: the same one-line errors, relative paths resolved
    against the working folder)."""
    return validate_spec(apply_overrides(spec.model_dump(), values), Path.cwd())


def shared_stages(fields: list[str]) -> list[str]:
    """The stages before the first one whose hash covers any of the fields: the same in every trial."""
    for index, stage in enumerate(pipeline.STAGES):
        if any(stage.hashes(field) for field in fields):
            return list(pipeline.STAGE_NAMES[:index])
    return list(pipeline.STAGE_NAMES)


def concurrent_trials(spec: JobSpec, cluster: dict[str, float]) -> int:
    """Trials the cluster holds at once: each is a driver (1 CPU) plus its largest stage's workers."""
    resources = spec.resources
    cpus = 1 + max(
        resources.num_workers * resources.cpus_per_worker, resources.generation_replicas * resources.cpus_per_replica
    )
    fits = math.floor(cluster.get("CPU", 0) / cpus)
    if resources.use_gpu:
        gpus = max(resources.num_workers, resources.generation_replicas * resources.gpus_per_replica)
        fits = min(fits, math.floor(cluster.get("GPU", 0) / gpus))
    return max(1, fits)


def stage_metrics(run_dir: Path, stage: str) -> dict[str, float]:
    manifest = read_manifest(run_dir / stage) or {}
    return {key: value for key, value in manifest.get("metrics", {}).items() if isinstance(value, (int, float))}


def trial(config: dict, base: dict, sweep: dict, tracking_parent: str | None = None) -> None:
    """One Tune trial: the pipeline with the trial's values, once or at each fidelity rung, reporting the
    metric's stage's metrics (Tune names them `<stage>/<metric>`) after each run. Its lines start with the
    trial's name; in MLflow it is a run under the sweep's run (`tracking_parent`) with the sweep's metric per rung,
    its pipeline runs nested under it."""
    from ray import tune

    from .tracking import TrialTracker

    settings = SweepSpec.model_validate(sweep)
    stage, metric = settings.metric.split(".")
    spec = with_values(JobSpec.model_validate(base), config)
    name = tune.get_context().get_trial_name()

    def log(line: str) -> None:
        print(f"[{name}] {line}", flush=True)

    fidelity = settings.scheduler.fidelity
    with TrialTracker(spec, tracking_parent, name, config, log) as tracked:
        for rung in settings.scheduler.rungs or [None]:
            rung_spec = with_values(spec, {fidelity: rung}) if rung is not None else spec
            run_dir = pipeline.run(rung_spec, log=log, tracking_parent=tracked.run_id)
            reported = {stage: stage_metrics(run_dir, stage), "run_dir": str(run_dir)}
            tracked.metric(settings.metric, reported[stage].get(metric), rung or 0)
            tune.report(reported if rung is None else {**reported, "fidelity": rung})


def sweep_job(spec: JobSpec, sweep: SweepSpec) -> JobSpec:
    """The job as the sweep runs it: the sweep's fixed fields set, and a relative runs_dir made absolute (trials run
    in Tune's trial folders: a relative runs_dir would land there)."""
    spec = with_values(spec, sweep.set)
    if not is_uri(spec.storage.runs_dir):
        spec.storage.runs_dir = str(Path(spec.storage.runs_dir).expanduser().resolve())
    return spec


def sweep_dir_for(spec: JobSpec, sweep: SweepSpec) -> Path:
    """Beside the job's run directories; for a runs_dir URI, beside their local staging copies (not uploaded)."""
    return (
        run_dir_for(spec).parent
        / f"sweep-{spec.name}-{content_hash([spec.spec_hash(), sweep.model_dump(mode='json')])[:8]}"
    )


def tuner(spec: JobSpec, sweep: SweepSpec, out: Path, max_concurrent: int, tracking_parent: str | None = None):
    """The Tuner: trial function, search space, searcher, scheduler, concurrency, storage; the trials' MLflow runs
    go under `tracking_parent`."""
    import importlib

    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    searcher = None
    if sweep.search != "random":
        module, name = SEARCHERS[sweep.search]
        try:
            searcher = getattr(importlib.import_module(module), name)()
        except ImportError:
            raise SpecError(
                f"search: {sweep.search} is not installed (pip install {sweep.search}), or use search: random"
            ) from None
    scheduler = None
    if sweep.scheduler.type == "asha":
        rungs = len(sweep.scheduler.rungs)
        scheduler = ASHAScheduler(max_t=rungs, grace_period=1, reduction_factor=sweep.scheduler.reduction_factor)
    return tune.Tuner(
        tune.with_parameters(
            trial,
            base=spec.model_dump(mode="json"),
            sweep=sweep.model_dump(mode="json"),
            tracking_parent=tracking_parent,
        ),
        param_space={path: domain.to_tune() for path, domain in sweep.space.items()},
        tune_config=tune.TuneConfig(
            metric=sweep.tune_metric,
            mode=sweep.mode,
            num_samples=sweep.num_samples,
            search_alg=searcher,
            scheduler=scheduler,
            max_concurrent_trials=max_concurrent,
        ),
        run_config=tune.RunConfig(name="tune", storage_path=str(out.resolve())),
    )


def results_table(result_grid, sweep: SweepSpec) -> list[dict]:
    """One row per trial: its values, the fidelity it reached, the metric, the stage's other metrics and
    its run directory. Best first: the furthest fidelity reached, then the metric."""
    stage, metric = sweep.metric.split(".")
    fidelity = sweep.scheduler.fidelity
    rows = []
    for result in result_grid:
        reported = result.metrics or {}
        row = {
            "trial": reported.get("trial_id", Path(result.path).name),
            **{path: result.config[path] for path in sweep.space},
        }
        if fidelity:
            row[fidelity] = reported.get("fidelity")
        metrics = reported.get(stage, {})
        row[sweep.metric] = metrics.get(metric, math.nan)
        row |= {f"{stage}.{key}": value for key, value in metrics.items() if key != metric}
        row |= {"status": "error" if result.error else "done", "run_dir": reported.get("run_dir", "")}
        rows.append(row)
    sign = 1 if sweep.mode == "min" else -1

    def rank(row: dict) -> tuple:
        score = row[sweep.metric]
        return (
            math.isnan(score),
            -(row.get(fidelity) or 0) if fidelity else 0,
            sign * score if not math.isnan(score) else 0,
        )

    return sorted(rows, key=rank)


def markdown(rows: list[dict], sweep: SweepSpec) -> str:
    columns = [
        "trial",
        *sweep.space,
        *([sweep.scheduler.fidelity] if sweep.scheduler.fidelity else []),
        sweep.metric,
        "status",
    ]

    def cell(value) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = [f"# Sweep: {sweep.metric} ({sweep.mode}), {len(rows)} trials, best first", ""]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row[column]) for column in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def plot(frame, sweep: SweepSpec, path: Path) -> None:
    """The metric against each swept field, one panel each; the best trial circled."""
    import matplotlib
    import pandas as pd

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = frame[frame[sweep.metric].notna()]
    figure, axes = plt.subplots(1, len(sweep.space), figsize=(4 * len(sweep.space), 3.5), squeeze=False)
    for axis, (field, domain) in zip(axes[0], sweep.space.items()):
        values = done[field] if pd.api.types.is_numeric_dtype(done[field]) else done[field].astype(str)
        axis.scatter(values, done[sweep.metric], alpha=0.7)
        if len(done):
            axis.scatter(
                values.iloc[:1], done[sweep.metric].iloc[:1], s=160, facecolors="none", edgecolors="red", label="best"
            )
            axis.legend()
        if domain.kind == "loguniform":
            axis.set_xscale("log")
        axis.set_xlabel(field)
        axis.set_ylabel(sweep.metric)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def tune_job(spec: JobSpec, sweep: SweepSpec, log: Callable[[str], None] = print) -> dict:
    """Run the sweep; returns its folder, its rows (best first) and the best row (None when no trial finished)."""
    import pandas as pd
    import ray

    spec = sweep_job(spec, sweep)
    for path, domain in sweep.space.items():
        for value in domain.values():
            with_values(spec, {path: value})
    if sweep.scheduler.fidelity:
        for rung in sweep.scheduler.rungs:
            with_values(spec, {sweep.scheduler.fidelity: rung})
    out = sweep_dir_for(spec, sweep)
    out.mkdir(parents=True, exist_ok=True)
    fields = [*sweep.space, *([sweep.scheduler.fidelity] if sweep.scheduler.fidelity else [])]
    tracker = SweepTracker(spec, sweep.model_dump(mode="json"), out, log)
    spec = tracker.trial_spec(spec)
    with ray_session(spec), tracker:
        for stage in shared_stages(fields):
            pipeline.run(spec, only=stage, log=log, tracking_parent=tracker.run_id)
        max_concurrent = sweep.max_concurrent or concurrent_trials(spec, ray.cluster_resources())
        log(f"sweep: {sweep.num_samples} samples, at most {max_concurrent} trials at once, output {out}")
        result_grid = tuner(spec, sweep, out, max_concurrent, tracker.run_id).fit()
    rows = results_table(result_grid, sweep)
    frame = pd.DataFrame(rows)
    frame.to_parquet(out / "results.parquet", index=False)
    (out / "results.md").write_text(markdown(rows, sweep))
    plot(frame, sweep, out / "metric_vs_fields.png")
    best = rows[0] if rows and not math.isnan(rows[0][sweep.metric]) else None
    if best is not None:
        (out / "best.yaml").write_text(dump_spec(with_values(spec, {path: best[path] for path in fields})))
    tracker.finish(out, sweep.metric, best[sweep.metric] if best is not None else None)
    return {"dir": out, "rows": rows, "best": best}
