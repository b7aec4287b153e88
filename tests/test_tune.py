"""`retrikt tune`: sweep files, which stages trials share, concurrency, and a small real sweep (two
student trials, ASHA over student epochs) on tiny models."""

from pathlib import Path

import pandas as pd
import pytest
import yaml
from helpers import SHARED_PREFIX, reuse_shared_run, tiny_spec

from retrikt_ray import pipeline
from retrikt_ray.artifacts import is_finished, read_manifest, run_dir_for
from retrikt_ray.config import SpecError, load_spec
from retrikt_ray.tune import SweepSpec, concurrent_trials, load_sweep, shared_stages, tune_job, with_values

NO_MODELS = {"teacher": "unused/teacher", "student": "unused/student"}


def sweep_file(tmp_path, **fields):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"space": {"student.lam": {"uniform": [0.2, 0.8]}}, **fields}))
    return path


def test_packaged_sweep_is_valid_for_the_demo():
    sweep = load_sweep("jobs/sweeps/sst2.yaml")
    spec = with_values(load_spec("jobs/demo.yaml"), sweep.set)
    for path, domain in sweep.space.items():
        assert path.startswith("student.")
        for value in domain.values():
            with_values(spec, {path: value})
    assert shared_stages([*sweep.space, sweep.scheduler.fidelity]) == [
        "prompt",
        "ppo",
        "generate",
        "unlabelled",
        "store",
    ]


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"space": {}}, "no field to sweep"),
        ({"space": {"student.lam": {"uniform": [0.8, 0.2]}}}, "low < high"),
        ({"space": {"student.lam": {"uniform": [0.2, 0.8], "choice": [1]}}}, "exactly one"),
        ({"search": "optuna", "space": {"student.k": {"grid": [4, 8]}}}, "grid needs search: random"),
        ({"scheduler": {"type": "asha"}}, "fidelity"),
        ({"metric": "nostage.accuracy"}, "not a stage"),
        ({"spaces": {}}, "spaces"),
    ],
)
def test_sweep_file_mistakes_are_one_line(tmp_path, fields, message):
    with pytest.raises(SpecError, match=message):
        load_sweep(sweep_file(tmp_path, **fields))


def test_swept_values_are_checked_as_job_fields():
    spec = tiny_spec(NO_MODELS, "runs")
    assert with_values(spec, {"student.lam": 0.3}).student.lam == 0.3 and spec.student.lam == 0.5
    with pytest.raises(SpecError, match="student.lamb: unknown field"):
        with_values(spec, {"student.lamb": 0.3})
    with pytest.raises(SpecError, match="student.lam: Input should be less than or equal to 1"):
        with_values(spec, {"student.lam": 2})
    with pytest.raises(SpecError, match="deepspeed.precision: fp16 needs GPUs"):  # checks across sections run too
        with_values(spec, {"deepspeed.precision": "fp16"})
    resolved = with_values(spec, {"data.train_file": "train.tsv"}).data.train_file  # as load_spec resolves paths
    assert resolved == str((Path.cwd() / "train.tsv").resolve())


def test_trials_share_the_stages_before_the_first_swept_one():
    assert shared_stages(["student.lr", "student.epochs"]) == ["prompt", "ppo", "generate", "unlabelled", "store"]
    assert shared_stages(["generate.samples_per_label"]) == ["prompt", "ppo"]
    assert shared_stages(["prompt.lr"]) == []
    # The world size is in every training stage's hash, from the first (prompt) on; where the work runs is in none.
    assert shared_stages(["resources.num_workers"]) == []
    assert shared_stages(["resources.generation_replicas", "resources.cpus_per_worker"]) == list(pipeline.STAGE_NAMES)
    assert shared_stages(["generate.batch_size", "storage.runs_dir", "serve.port"]) == list(pipeline.STAGE_NAMES)


def test_concurrency_follows_resources():
    spec = tiny_spec(NO_MODELS, "runs")  # 1 worker x 1 CPU, 2 replicas x 0.5 CPU: 1 + 1 CPUs per trial
    assert concurrent_trials(spec, {"CPU": 2}) == 1 and concurrent_trials(spec, {"CPU": 8}) == 4
    spec.resources.use_gpu = True
    assert concurrent_trials(spec, {"CPU": 8, "GPU": 4}) == 2  # 2 GPUs per trial (the replicas)
    spec.resources.gpus_per_replica = 0.5  # the two replicas share one GPU: the CPUs are the limit again
    assert concurrent_trials(spec, {"CPU": 8, "GPU": 4}) == 4 and concurrent_trials(spec, {"CPU": 8, "GPU": 3}) == 3


def test_sweep_reuses_upstream_and_writes_table_plot_and_best_job(sst2_run, tmp_path):
    """The sweep runs over the shared tiny run's spec, with that run copied into its runs dir: the
    stages before the swept one are reused from it, and every trial trains a student of its own."""
    spec = reuse_shared_run(sst2_run, tmp_path / "runs")
    sweep = SweepSpec.model_validate(
        {
            "num_samples": 1,
            "scheduler": {"type": "asha", "fidelity": "student.epochs", "rungs": [1, 2]},
            "set": {"evaluate.teacher_zero_shot": False},
            "space": {"student.lam": {"grid": [0.3, 0.7]}},
        }
    )
    outcome = tune_job(spec, sweep, log=lambda line: None)
    out = outcome["dir"]
    table = pd.read_parquet(out / "results.parquet")
    assert len(table) == 2 and sorted(table["student.lam"]) == [0.3, 0.7]
    assert set(table["status"]) == {"done"} and table["student.epochs"].iloc[0] == 2
    assert table["evaluate.accuracy_student_store"].between(0, 1).all()
    assert (
        "| trial | student.lam | student.epochs | evaluate.accuracy_student_store | status |"
        in (out / "results.md").read_text()
    )
    assert (out / "metric_vs_fields.png").stat().st_size > 0

    best = load_spec(out / "best.yaml")
    assert best.student.lam == outcome["best"]["student.lam"] and best.student.epochs == 2
    assert not best.evaluate.teacher_zero_shot
    run_dir = run_dir_for(best)
    assert str(run_dir) == outcome["best"]["run_dir"]
    for stage in pipeline.plan(best, run_dir):
        assert is_finished(stage.dir, stage.stage_hash), stage.name  # `retrikt run best.yaml` finds it all done

    sweep_dirs = [
        job.parent for job in (tmp_path / "runs").glob("*/job.yaml") if not job.parent.name.startswith(SHARED_PREFIX)
    ]
    for stage in shared_stages(["student.lam"]):
        assert all("reused_from" in read_manifest(path / stage) for path in sweep_dirs), (
            stage
        )  # nothing upstream re-ran
    students = [read_manifest(path / "student") for path in sweep_dirs if read_manifest(path / "student")]
    assert sum("reused_from" not in manifest for manifest in students) >= 3  # two trials x rungs, ASHA may stop one
