"""Helpers the test files share (fixtures are in conftest.py): the tests' local Ray, the tiny job spec, a copy of
the shared tiny run to reuse, a logged pipeline run, a stage's manifest, the real `retrikt` command in-process, and
whether the processes a command started are still running."""

import contextlib
import json
import shutil
import time

from typer.testing import CliRunner

from retrikt_ray import pipeline
from retrikt_ray.artifacts import run_dir_for
from retrikt_ray.cli import app
from retrikt_ray.config import JobSpec

SHARED_PREFIX = "shared-"  # the folder name of a copy of the shared run (reuse_shared_run)


def start_ray(**options) -> None:
    """The tests' local Ray (conftest's `ray_local`; test_stage_contract.py restarts it with `options`)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False, **options)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False


def tiny_spec(tiny_models, runs_dir, task="sst2", **changes) -> JobSpec:
    spec = JobSpec.model_validate(
        {
            "name": f"tiny-{task}",
            "task": {"name": task},
            "data": {"shots": 4, "dev_limit": 24},
            "teacher": {"model": tiny_models["teacher"], "classify_batch_size": 8},
            "student": {
                "model": tiny_models["student"],
                "epochs": 2,
                "batch_size": 8,
                "gold_per_batch": 4,
                "k": 4,
                "lr": 1e-3,
            },
            "prompt": {"epochs": 3, "batch_size": 4, "lr": 0.05, "num_virtual_tokens": 4, "max_length": 48},
            "ppo": {
                "updates": 2,
                "rollouts_per_update": 8,
                "minibatch_size": 4,
                "max_new_tokens": 12,
                "eval_samples_per_label": 4,
            },
            "generate": {
                "samples_per_label": 12,
                "batch_size": 6,
                "rows_per_task": 6,
                "max_new_tokens": 16,
                "min_words": 1,
            },
            "evaluate": {"latency_examples": 3},
            "resources": {"cpus_per_worker": 1, "cpus_per_replica": 0.5},
            "storage": {"runs_dir": str(runs_dir)},
            # MLflow costs every pipeline run 1-3 s; test_tracking.py turns it on where tracking is the subject.
            "tracking": {"enabled": False},
        }
    )
    for path, value in changes.items():
        section, field = path.split("__")
        setattr(getattr(spec, section), field, value)
    return spec


def reuse_shared_run(sst2_run, runs_dir, **storage) -> JobSpec:
    """The shared tiny run's spec writing under `runs_dir` (and further `storage` fields), with that run
    copied in beside it: stage hashes ignore storage, so the pipeline reuses every stage instead of
    training again."""
    spec, run_dir = sst2_run
    copy = spec.model_copy(deep=True)
    copy.storage.runs_dir = str(runs_dir)
    for field, value in storage.items():
        setattr(copy.storage, field, value)
    shutil.copytree(run_dir, run_dir_for(copy).parent / f"{SHARED_PREFIX}{run_dir.name}")
    return copy


def run_logged(spec, **kwargs):
    lines = []
    run_dir = pipeline.run(spec, log=lines.append, **kwargs)
    return run_dir, lines


def manifest(run_dir, stage):
    return json.loads((run_dir / stage / "manifest.json").read_text())


def cli(*args, env=None):
    return CliRunner().invoke(app, list(args), env=env)


def process_tree(pid: int) -> list:
    """The process and all its descendants, as psutil.Process objects."""
    import psutil

    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def still_running(processes: list, within_s: float = 5.0) -> list[str]:
    """Those of the processes (psutil's, which a reused pid does not fool) still running after up to `within_s`,
    as "pid name"; a zombie has ended."""
    import psutil

    deadline = time.monotonic() + within_s
    while True:
        running = []
        for process in processes:
            with contextlib.suppress(psutil.Error):
                if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                    running.append(f"{process.pid} {process.name()}")
        if not running or time.monotonic() > deadline:
            return running
        time.sleep(0.2)
