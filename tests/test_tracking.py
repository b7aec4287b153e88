"""MLflow tracking (retrikt_ray/tracking.py) and the console of `retrikt run` (retrikt_ray/console.py).

A real `retrikt run` of the shared tiny run's job, with its student and evaluate stages left to redo, leaves an
MLflow store in which the run, its stage runs, the spec's parameters, the losses step by step, the evaluation's
metrics and the manifests are found, while the console shows one line per stage and the bars and the run's log
file the rest; running the folder again records nothing twice; a sweep's trials are runs under the sweep's run; an
unreachable server costs one line and no run; `tracking.enabled: false` writes nothing.
"""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import SHARED_PREFIX, manifest, reuse_shared_run, run_logged

from retrikt_ray import console, pipeline, tracking
from retrikt_ray.artifacts import run_dir_for
from retrikt_ray.config import JobSpec
from retrikt_ray.tune import SweepSpec, tune_job

REPO = Path(__file__).resolve().parents[1]
REDONE = ("student", "evaluate")  # the stages the tracked run trains and evaluates again


def retrikt(*args):
    return subprocess.run([sys.executable, "cli.py", *args], cwd=REPO, capture_output=True, text=True, timeout=900)


def client_for(runs_dir: Path):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{Path(runs_dir).resolve() / 'mlflow' / 'mlflow.db'}")


def runs_of(client, experiment: str, kind: str | None = None, parent: str | None = None) -> list:
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    runs = client.search_runs([experiment_id], max_results=1000)
    return [
        run
        for run in runs
        if (kind is None or run.data.tags.get("retrikt.kind") == kind)
        and (parent is None or run.data.tags.get("mlflow.parentRunId") == parent)
    ]


@pytest.fixture(scope="module")
def tracked_run(sst2_run, tmp_path_factory):
    """`retrikt run` of the shared run's job with tracking on (its default store) and a shorter student, the shared
    run copied in but for its student and evaluate stages: five stages are found finished, two are redone."""
    spec, run_dir = sst2_run
    root = tmp_path_factory.mktemp("tracked")
    job = spec.model_dump(mode="json")
    job["storage"]["runs_dir"] = str(root / "runs")
    job["tracking"] = {"enabled": True}
    job["student"]["epochs"] = 3  # retrained: its curves need a few epochs, not the shared run's twenty
    path = root / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    copy = run_dir_for(JobSpec.model_validate(job))  # the shorter student names another folder
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns(*REDONE, "job.yaml"))
    started = time.perf_counter()
    result = retrikt("run", str(path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return JobSpec.model_validate(job), copy, result, path, time.perf_counter() - started


def test_a_run_is_tracked_with_its_stages_parameters_curves_metrics_and_manifests(tracked_run, tmp_path):
    spec, run_dir, result, _, _ = tracked_run
    store = run_dir.parent / "mlflow" / "mlflow.db"
    assert f"mlflow ui --backend-store-uri sqlite:///{store.resolve()}" in result.stdout
    client = client_for(run_dir.parent)
    (run,) = runs_of(client, spec.name, "pipeline")
    assert run.info.run_name == run_dir.name and run.info.status == "FINISHED"
    assert run.data.params["student.lr"] == json.dumps(spec.student.lr)
    assert run.data.params["task.name"] == "sst2" and run.data.params["resources.num_workers"] == "2"
    for stage in pipeline.STAGE_NAMES:
        assert run.data.params[f"stage_hash.{stage}"] == manifest(run_dir, stage)["stage_hash"]
    assert run.data.metrics["evaluate.accuracy_student_store"] == pytest.approx(
        manifest(run_dir, "evaluate")["metrics"]["accuracy_student_store"]
    )

    stages = {child.info.run_name: child for child in runs_of(client, spec.name, "stage", run.info.run_id)}
    assert sorted(stages) == sorted(pipeline.STAGE_NAMES)
    for name, child in stages.items():
        assert child.info.status == "FINISHED"
        assert child.data.tags["retrikt.stage_hash"] == manifest(run_dir, name)["stage_hash"]
        artifacts = {entry.path for entry in client.list_artifacts(child.info.run_id)}
        assert {"manifest.json", "config.yaml"} <= artifacts, name
    assert "predictions.parquet" in {entry.path for entry in client.list_artifacts(stages["evaluate"].info.run_id)}
    assert "ppo_curves.png" in {entry.path for entry in client.list_artifacts(stages["ppo"].info.run_id)}
    fetched = client.download_artifacts(stages["student"].info.run_id, "manifest.json", str(tmp_path))
    assert json.loads(Path(fetched).read_text()) == manifest(run_dir, "student")

    student = manifest(run_dir, "student")["metrics"]
    losses = client.get_metric_history(stages["student"].info.run_id, "loss_per_step")
    assert len(losses) == student["steps"] > 1
    assert [entry.step for entry in losses] == list(range(student["steps"]))
    assert [entry.value for entry in losses] == pytest.approx(student["loss_per_step"])
    per_epoch = client.get_metric_history(stages["student"].info.run_id, "history.loss")
    assert [entry.step for entry in per_epoch] == list(range(spec.student.epochs))
    prompt = manifest(run_dir, "prompt")["metrics"]
    assert len(client.get_metric_history(stages["prompt"].info.run_id, "loss_per_step")) == prompt["steps"] > 1
    for key in ("history.reward", "history.policy_loss", "history.value_loss", "history.consistency_rate"):
        assert len(client.get_metric_history(stages["ppo"].info.run_id, key)) == spec.ppo.updates, key
    assert "history.distinct_2" in stages["ppo"].data.metrics
    generate = stages["generate"].data.metrics
    assert generate["counts.generated"] == manifest(run_dir, "generate")["counts"]["generated"]
    assert "generation_tokens_per_s" in generate
    evaluate = manifest(run_dir, "evaluate")["metrics"]
    for key in (
        "accuracy_student_store",
        "accuracy_student_head",
        "accuracy_retrieval_only",
        "accuracy_teacher_zero_shot",
        "ms_per_example_student_store",
        "ms_per_example_teacher",
    ):
        assert stages["evaluate"].data.metrics[key] == pytest.approx(evaluate[key]), key


def test_the_console_shows_the_stages_and_bars_and_the_log_file_the_rest(tracked_run):
    _, run_dir, result, _, _ = tracked_run
    lines = result.stdout.splitlines()
    log = run_dir / "run.log"
    assert f"log: {log} (Ray's, DeepSpeed's and the libraries' own output; --verbose shows it)" in lines
    for stage in pipeline.STAGE_NAMES:
        if stage not in REDONE:
            assert f"[{stage}] finished earlier, skipped" in lines
    assert any(line.startswith("[student] ") and "epochs; last loss" in line for line in lines)
    assert any(line.startswith("[evaluate] ") and "student+store" in line for line in lines)
    assert any(line.startswith("student: 100%|") for line in result.stderr.splitlines())  # the worker's bar
    console_text = "\n".join(line for line in (result.stdout + result.stderr).splitlines() if line != lines[1])
    assert lines[1].startswith("log: ")  # (it names DeepSpeed)
    for machinery in ("pid=", "RayTrainWorker", "DeepSpeed", "WARNING", "Traceback"):
        assert machinery not in console_text, machinery
    kept = log.read_text()
    assert "RayTrainWorker" in kept and "[student] " in kept


def test_running_the_folder_again_records_no_stage_twice(tracked_run):
    spec, run_dir, _, _, _ = tracked_run
    again, lines = run_logged(spec)
    assert again == run_dir and all("finished earlier, skipped" in line for line in lines)
    client = client_for(run_dir.parent)
    (run,) = runs_of(client, spec.name, "pipeline")
    assert len(runs_of(client, spec.name, "stage", run.info.run_id)) == len(pipeline.STAGE_NAMES)
    assert client.get_run(run.info.run_id).info.status == "FINISHED"


def test_an_unreachable_server_costs_one_line_and_no_run(tracked_run):
    _, _, _, job, _ = tracked_run
    started = time.monotonic()
    result = retrikt("run", str(job), "--set", "tracking.uri=http://127.0.0.1:9")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert time.monotonic() - started < 120
    said = [line for line in (result.stdout + result.stderr).splitlines() if "127.0.0.1:9" in line]
    assert len(said) == 1 and said[0].startswith("[tracking] MLflow at http://127.0.0.1:9 failed"), said
    assert "the run goes on untracked" in said[0]
    assert "tracked in MLflow" not in result.stdout and "run directory: " in result.stdout


def test_tracking_off_writes_nothing(sst2_run, tmp_path):
    spec = reuse_shared_run(sst2_run, tmp_path / "runs")
    spec.tracking.enabled = False
    run_dir, lines = run_logged(spec)
    assert (run_dir / "evaluate" / "manifest.json").is_file()
    assert sorted(path.name for path in (tmp_path / "runs").iterdir()) == sorted(
        [run_dir.name, f"{SHARED_PREFIX}{sst2_run[1].name}"]
    )
    assert not any("[tracking]" in line for line in lines)
    assert tracking.where(spec) is None


def test_a_sweeps_trials_are_runs_under_the_sweeps_run(sst2_run, tmp_path):
    """Two trials that only redo `evaluate` (the stages before it are the shared run's, reused)."""
    spec = reuse_shared_run(sst2_run, tmp_path / "runs")
    spec.tracking.enabled = True
    sweep = SweepSpec.model_validate(
        {
            "num_samples": 1,
            "set": {"evaluate.teacher_zero_shot": False},
            "space": {"evaluate.latency_examples": {"grid": [2, 3]}},
        }
    )
    outcome = tune_job(spec, sweep, log=lambda line: None)
    client = client_for(run_dir_for(spec).parent)
    (sweep_run,) = runs_of(client, spec.name, "sweep")
    assert sweep_run.info.status == "FINISHED" and sweep_run.info.run_name == outcome["dir"].name
    assert sweep_run.data.metrics["best.evaluate.accuracy_student_store"] == pytest.approx(
        outcome["best"]["evaluate.accuracy_student_store"]
    )
    assert {"results.md", "best.yaml"} <= {entry.path for entry in client.list_artifacts(sweep_run.info.run_id)}
    trials = runs_of(client, spec.name, "trial", sweep_run.info.run_id)
    assert len(trials) == 2
    assert sorted(trial.data.params["evaluate.latency_examples"] for trial in trials) == ["2", "3"]
    rows = {row["evaluate.latency_examples"]: row for row in outcome["rows"]}
    for trial in trials:
        assert trial.info.status == "FINISHED"
        value = rows[int(trial.data.params["evaluate.latency_examples"])]["evaluate.accuracy_student_store"]
        assert trial.data.metrics["evaluate.accuracy_student_store"] == pytest.approx(value)
        (run,) = runs_of(client, spec.name, "pipeline", trial.info.run_id)
        assert "evaluate" in {stage.info.run_name for stage in runs_of(client, spec.name, "stage", run.info.run_id)}
    shared = runs_of(client, spec.name, "pipeline", sweep_run.info.run_id)  # the stages the trials share
    assert len(shared) == 1


def test_manifest_metrics_are_flattened_with_their_steps():
    metrics = tracking.manifest_metrics(
        {
            "metrics": {
                "final_loss": 0.5,
                "kept": True,
                "precision": "fp32",
                "loss_per_step": [3.0, 2.0, 1.0],
                "history": [{"epoch": 0, "loss": 2.0, "kd": 1.0}, {"epoch": 1, "loss": 1.5, "kd": 0.5}],
                "before": {"reward": -0.2, "valid_rate": 1.0},
                "retrieval_labelled": None,
                "samples_by_node": {"ab12": 7},
                "kept_label_very good!": 3,
            },
            "counts": {"generated": 24},
            "seconds": 12.5,
        }
    )
    assert ("final_loss", 0.5, 0) in metrics and ("kept", 1.0, 0) in metrics
    assert [(value, step) for key, value, step in metrics if key == "loss_per_step"] == [(3.0, 0), (2.0, 1), (1.0, 2)]
    assert [(value, step) for key, value, step in metrics if key == "history.loss"] == [(2.0, 0), (1.5, 1)]
    assert ("before.reward", -0.2, 0) in metrics and ("samples_by_node.ab12", 7.0, 0) in metrics
    assert ("kept_label_very good_", 3.0, 0) in metrics
    assert ("counts.generated", 24.0, 0) in metrics and ("seconds", 12.5, 0) in metrics
    assert not any(key in ("precision", "retrieval_labelled", "history.epoch") for key, _, _ in metrics)
    params = tracking.flat_params({"student": {"lr": 3e-5, "model": "m"}, "task": {"label_values": ["a", "b"]}})
    assert params == {"student.lr": "3e-05", "student.model": "m", "task.label_values": '["a", "b"]'}


def test_tracking_changes_no_hash_and_defaults_to_a_database_beside_the_runs(tmp_path):
    spec = JobSpec(name="t", storage={"runs_dir": str(tmp_path / "runs")})
    changed = spec.model_copy(deep=True)
    changed.tracking.uri, changed.tracking.experiment, changed.tracking.enabled = "http://example:5000", "x", False
    assert changed.spec_hash() == spec.spec_hash()
    assert [stage.stage_hash for stage in pipeline.plan(changed, tmp_path)] == [
        stage.stage_hash for stage in pipeline.plan(spec, tmp_path)
    ]
    assert tracking.tracking_uri(spec) == f"sqlite:///{(tmp_path / 'runs' / 'mlflow' / 'mlflow.db').resolve()}"
    assert tracking.tracking_uri(changed) is None
    changed.tracking.enabled = True
    assert tracking.tracking_uri(changed) == "http://example:5000" and tracking.experiment_name(changed) == "x"


def test_the_console_passes_the_pipelines_lines_and_bars_and_keeps_the_rest(tmp_path):
    assert set(pipeline.STAGE_NAMES) <= set(console.TAGS)
    worker = "\x1b[36m(RayTrainWorker pid=8951)\x1b[0m "
    assert console.clean(worker + "[student] retrieved") == "[student] retrieved"
    assert console.is_ours(
        console.clean("(trial pid=3) [trial_1_00000] [evaluate] 3s: done [repeated 2x across cluster]")
    )
    assert not console.is_ours(console.clean(worker + "[2026-12-07 10:14:57,377] [WARNING] [real_accelerator.py]"))
    assert console.progress("student:  50%|#####     | 1/2 [00:00<00:00,  4.24it/s]") == ("student", False)
    assert console.progress("student: 100%|##########| 2/2 [00:00<00:00,  4.24it/s]") == ("student", True)
    assert console.progress("Loading weights: 100%|##########| 20/20 [00:00<00:00]") is None

    log = tmp_path / "run.log"
    script = f"""
import os, sys, warnings
from pathlib import Path
from retrikt_ray.console import quiet
with quiet(Path({str(log)!r}), header="test") as output:
    output.echo("[prompt] 3s: ours")
    print("a library's line")
    print({worker!r} + "[student] from a worker")
    print({worker!r} + "[student] from a worker", file=sys.stderr)
    print({worker!r} + "\\rstudent:   0%|          | 0/2 [00:00<?, ?it/s]\\rstudent: 100%|##########| 2/2 [00:01]",
          file=sys.stderr)
    warnings.warn("old", FutureWarning)
    os.write(2, b"from C\\n")
print("after")
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["[prompt] 3s: ours", "[student] from a worker", "after"]
    # Off a terminal a bar is a line when it starts and when it completes (and one a minute in between).
    assert result.stderr.splitlines() == [
        "student:   0%|          | 0/2 [00:00<?, ?it/s]",
        "student: 100%|##########| 2/2 [00:01]",
    ]
    kept = log.read_text()
    for text in ("[prompt] 3s: ours", "a library's line", "FutureWarning: old", "from C", "RayTrainWorker pid=8951"):
        assert text in kept, text
