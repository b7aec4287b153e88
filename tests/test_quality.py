"""The quality benchmark's pieces: baseline runners on tiny models, the benchmark's pipeline variants,
seed aggregation, and the written results (JSON, markdown, plots)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from pydantic import ValidationError

from retrikt_ray.config import JobSpec, load_spec
from retrikt_ray.metrics import mcnemar_exact, paired
from retrikt_ray.pipeline import plan
from retrikt_ray.retrieval_student import RetrievalStudent, ce_loss, encoder_fingerprint
from retrikt_ray.tasks import load_dev, load_few_shot
from retrikt_ray.teacher import Teacher

REPO = Path(__file__).resolve().parents[1]


def _load_benchmark(name: str):
    """A script of benchmarks/ as a module."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # pydantic resolves a module's annotations through sys.modules
    spec.loader.exec_module(module)
    return module


baselines = _load_benchmark("baselines")
quality = _load_benchmark("quality")


def _spec(tiny_models, task="sst2", shots=4, tmp_path=None) -> JobSpec:
    raw = {
        "task": {"name": task},
        "data": {"shots": shots, "dev_limit": 12},
        "teacher": {"model": tiny_models["teacher"]},
        "student": {"model": tiny_models["student"], "max_length": 32, "lr": 1e-3},
    }
    if tmp_path is not None:
        raw["storage"] = {"runs_dir": str(tmp_path)}
    return JobSpec.model_validate(raw)


def _training_loss(task, student, examples) -> float:
    rows, targets = baselines.labelled_rows(task, examples)
    with torch.no_grad():
        return ce_loss(torch.tensor(targets), student.head_probs(torch.from_numpy(student.embed_all(rows)))).item()


def test_finetuned_student_trains_encoder_and_head_on_the_labelled_rows(tiny_models):
    spec = _spec(tiny_models)
    task, few_shot = load_few_shot(spec)
    untrained = RetrievalStudent.from_spec(spec.student, task.student_num_labels)
    student = baselines.finetune_student(
        spec, task, few_shot, baselines.BaselineSettings(finetune_epochs=15, batch_size=4)
    )
    assert encoder_fingerprint(student.encoder) != encoder_fingerprint(untrained.encoder)
    torch.manual_seed(spec.student.seed)  # the same fresh head the runner started from
    fresh = RetrievalStudent.from_spec(spec.student, task.student_num_labels)
    assert _training_loss(task, student, few_shot) < _training_loss(task, fresh, few_shot)
    probs = baselines.head_predictions(task, student, few_shot)
    assert (probs.argmax(axis=1) == [example.label for example in few_shot]).mean() >= 0.75


def test_linear_probe_leaves_the_encoder_frozen_and_fits_the_head(tiny_models):
    spec = _spec(tiny_models)
    task, few_shot = load_few_shot(spec)
    untrained = RetrievalStudent.from_spec(spec.student, task.student_num_labels)
    settings = baselines.BaselineSettings(probe_epochs=300, probe_lr=0.1)
    student = baselines.linear_probe(spec, task, few_shot, settings)
    assert encoder_fingerprint(student.encoder) == encoder_fingerprint(untrained.encoder)
    torch.manual_seed(spec.student.seed)
    fresh = RetrievalStudent.from_spec(spec.student, task.student_num_labels)
    assert _training_loss(task, student, few_shot) < _training_loss(task, fresh, few_shot)


def test_choice_task_predictions_are_distributions_over_the_alternatives(tiny_models):
    spec = _spec(tiny_models, task="copa", shots=6)
    task, few_shot = load_few_shot(spec)
    _, dev = load_dev(spec)
    student = baselines.linear_probe(spec, task, few_shot, baselines.BaselineSettings(probe_epochs=5))
    probs = baselines.head_predictions(task, student, dev)
    assert probs.shape == (len(dev), 2)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    # p(alternative i) is proportional to the head's p(right) of row i.
    rows, _ = baselines.labelled_rows(task, dev[:1])
    with torch.no_grad():
        right = student.head_probs(torch.from_numpy(student.embed_all(rows)))[:, 1].numpy()
    np.testing.assert_allclose(probs[0], right / right.sum(), rtol=1e-4)


def test_setfit_baseline_returns_probabilities_for_every_label(tiny_models, tmp_path, monkeypatch):
    pytest.importorskip("setfit")
    monkeypatch.chdir(tmp_path)  # SetFit's trainer must leave nothing in the working directory
    spec = _spec(tiny_models, task="cb", shots=3)
    task, few_shot = load_few_shot(spec)
    _, dev = load_dev(spec)
    settings = baselines.BaselineSettings(setfit_iterations=2, setfit_batch_size=8)
    probs = baselines.setfit_student(spec, task, few_shot, dev, settings)
    assert probs.shape == (len(dev), 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    # The head is fitted on the tuned embeddings of the labelled examples: it reproduces most of them.
    on_train = baselines.setfit_student(spec, task, few_shot, few_shot, settings)
    assert (on_train.argmax(axis=1) == [example.label for example in few_shot]).mean() >= 0.6
    assert list(tmp_path.iterdir()) == []


def test_tuned_prompt_teacher_scores_each_text_under_each_label_prompt(tiny_models):
    spec = _spec(tiny_models)
    task, few_shot = load_few_shot(spec)
    torch.manual_seed(0)
    teacher = Teacher.from_spec(spec, task)
    soft_prompt = 0.1 * torch.randn(4, 32)
    examples = few_shot[:5]
    batched = baselines.tuned_prompt_teacher(teacher, soft_prompt, examples, batch_size=3)  # padded batches
    assert batched.shape == (5, 2)
    for row, example in enumerate(examples):
        ids = torch.tensor(
            [teacher.tokenizer(task.generation_text(example) + "\n", add_special_tokens=False).input_ids]
        )
        with torch.no_grad():
            scores = np.array(
                [teacher.continuation_outputs(label, ids, soft_prompt)[0].sum().item() for label in range(2)]
            )
        expected = np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum()
        np.testing.assert_allclose(batched[row], expected, rtol=1e-3, atol=1e-5)


def test_variants_share_the_stages_they_should(tiny_models, tmp_path):
    profile = quality.Profile(
        description="test",
        tasks=["sst2", "rte"],
        seeds=[0],
        shots=4,
        ablation_tasks=["sst2"],
        store_fractions=[0.25],
        rank_weights=[0.1],
        unlabelled_samples=50,
        student_variants={"confidence_kd": {"kd_weighting": "confidence"}},
        job={"teacher": {"model": tiny_models["teacher"]}, "student": {"model": tiny_models["student"]}},
        task_job={"rte": {"generate": {"max_new_tokens": 96}}},
    )
    specs = quality.variant_specs(profile, "test", "sst2", 0, tmp_path)
    assert specs["full"].generate.max_new_tokens == 48  # the rte override leaves sst2 alone
    rte = quality.variant_specs(profile, "test", "rte", 0, tmp_path)
    assert rte["full"].generate.max_new_tokens == 96 and rte["full"].teacher.model == tiny_models["teacher"]
    assert set(rte) == {"full", "zerogen", "no_rank"}  # no L_rank is cheap (student and evaluate only): every task
    budgets = tmp_path / "budgets.yaml"
    budgets.write_text(yaml.safe_dump({"profiles": {"typo": {**profile.model_dump(), "task_job": {"rtee": {}}}}}))
    with pytest.raises(SystemExit, match=r"budgets.yaml, profile typo: task_job: rtee not in tasks \['sst2', 'rte'\]$"):
        quality.load_profile(budgets, "typo")
    assert set(specs) == {
        "full",
        "zerogen",
        "no_ppo",
        "no_rank",
        "rank_b0.1",
        "store_25",
        "unlabelled",
        "student_confidence_kd",
    }
    hashes = {
        variant: {stage.name: stage.stage_hash for stage in plan(spec, tmp_path / variant)}
        for variant, spec in specs.items()
    }
    full = hashes["full"]
    assert all(h["prompt"] == full["prompt"] for h in hashes.values())
    for variant in ("zerogen", "no_rank", "rank_b0.1", "store_25", "unlabelled"):
        assert hashes[variant]["generate"] == full["generate"]
    assert specs["unlabelled"].unlabelled.samples == 50 and hashes["unlabelled"]["unlabelled"] != full["unlabelled"]
    assert hashes["no_ppo"]["ppo"] != full["ppo"]
    for variant in ("no_rank", "rank_b0.1", "student_confidence_kd"):
        assert hashes[variant]["store"] == full["store"] and hashes[variant]["student"] != full["student"]
    assert specs["student_confidence_kd"].student.kd_weighting == "confidence"
    assert specs["rank_b0.1"].student.b == 0.1
    assert hashes["store_25"]["store"] != full["store"]
    assert specs["zerogen"].student.lam == 0 and specs["zerogen"].student.b == 0
    assert specs["full"].evaluate.teacher_zero_shot and not specs["no_rank"].evaluate.teacher_zero_shot
    other_seed = quality.variant_specs(profile, "test", "sst2", 1, tmp_path)["full"]
    assert plan(other_seed, tmp_path / "s1")[0].stage_hash != full["prompt"]


def _cells():
    cells = []
    for seed, (retrikt, setfit) in enumerate([(0.80, 0.70), (0.86, 0.72), (0.83, 0.74)]):
        cells.append({"task": "sst2", "seed": seed, "method": "retrikt", "accuracy": retrikt, "seconds": 1.0})
        cells.append({"task": "sst2", "seed": seed, "method": "student_setfit", "accuracy": setfit, "seconds": 1.0})
    cells.append({"task": "sst2", "seed": 0, "method": "retrikt_store_25", "accuracy": 0.75, "seconds": 1.0})
    cells.append({"task": "sst2", "seed": 0, "method": "retrikt_rank_b0.3", "accuracy": 0.81, "seconds": 1.0})
    cells.append({"task": "rte", "seed": 0, "method": "retrikt", "accuracy": 0.5, "seconds": 1.0})
    for seed, teacher in ((0, 0.85), (1, 0.86)):  # seed 2 has no teacher cell: no retention for it
        cells.append({"task": "sst2", "seed": seed, "method": "teacher_zero_shot", "accuracy": teacher, "seconds": 1.0})
    return cells


def test_aggregation_gives_mean_and_min_max_over_seeds(tmp_path):
    table = quality.aggregate(_cells())
    summary = table["sst2"]["retrikt"]
    assert summary["mean"] == pytest.approx(0.83) and summary["min"] == 0.80 and summary["max"] == 0.86
    assert summary["seeds"] == [0, 1, 2]
    assert table["rte"]["retrikt"] == {"mean": 0.5, "min": 0.5, "max": 0.5, "seeds": [0]}
    assert quality.format_cell(summary) == "83.0 (80.0-86.0)"
    assert quality.format_cell(table["rte"]["retrikt"]) == "50.0"
    # CB's zero-shot teacher scores 19 of 56 on every seed; the float mean of that is below the value itself.
    equal = quality.aggregate([{"task": "cb", "seed": seed, "method": "m", "accuracy": 19 / 56} for seed in range(3)])
    assert equal["cb"]["m"]["mean"] == equal["cb"]["m"]["min"] == 19 / 56
    quality.plot_accuracy(equal, ["cb"], {"m": "m"}, tmp_path / "equal.png")
    checks = quality.targets(table, ["sst2", "rte"])
    assert checks["sst2_retrikt_at_least_84.4"] is False
    assert checks["sst2_retrikt_5_points_above_setfit"] is True  # 0.83 >= 0.72 + 0.05


def test_results_and_plot_files_are_written(tmp_path):
    profile = quality.Profile(
        description="test budget",
        tasks=["sst2", "rte"],
        seeds=[0, 1, 2],
        ablation_tasks=["sst2"],
        store_fractions=[0.25],
        rank_weights=[0.3],
        student_variants={"confidence_kd": {"kd_weighting": "confidence"}},
    )
    cells = quality.Cells(tmp_path / "quality.json", "test")
    cells.cells = _cells()
    cells.add("sst2", 0, "retrikt_student_confidence_kd", 0.82, 1.0, quality.paired([1, 1, 0, 0], [1, 0, 1, 1]))
    history = [
        {
            "update": u,
            "reward": 0.1 * u,
            "consistency_term": -0.5,
            "diversity_term": 0.2,
            "penalty_term": 0.0,
            "consistency_rate": 0.6 + 0.1 * u,
            "distinct_2": 0.8,
        }
        for u in range(3)
    ]
    pool = {"generated": 10, "kept": 9, "teacher_agreement": 0.7, "distinct_2": 0.8}
    cells.extras["sst2/0"] = {
        "ppo_rollouts": {
            "before": {"consistency_rate": 0.6, "distinct_2": 0.8, "mean_max_cos": 0.5},
            "after": {"consistency_rate": 0.8, "distinct_2": 0.8, "mean_max_cos": 0.5},
        },
        "ppo_history": history,
        "parameters": {"teacher": 1000, "student": 100, "store_rows": 9},
        "cpu_ms_per_example": {"teacher": 10.0, "student_store": 1.0},
        "dev_examples": 12,
        "generated_pool": {"after_ppo": pool, "stage1_prompt": pool},
    }
    gated = {
        **cells.extras["sst2/0"],
        "store_on_labelled": {
            "retrieval_accuracy": 0.25,
            "majority_share": 1 / 3,
            "examples": 48,
            "informative": False,
        },
        "student_lam": 0.0,
    }
    cells.extras["rte/0"] = {**gated, "generated_pool": {"after_ppo": pool}}
    quality.write_results(tmp_path / "quality", "test", profile, cells, started=0.0)
    for name in ("quality_accuracy.png", "quality_store_size.png", "quality_ppo.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    written = json.loads((tmp_path / "quality.json").read_text())
    assert written["table"]["sst2"]["retrikt"]["min"] == 0.80
    text = (tmp_path / "quality.md").read_text()
    assert "| RetriKT: student + store, full recipe | 83.0 (80.0-86.0) | 50.0 |" in text
    assert "test budget" in text and "0.60 -> 0.80" in text
    assert "| 25% (33%) of 48: retrieval gated off, head alone |" in text and text.count("retrieval gated off") == 1
    # Retention pairs RetriKT with the teacher of the same seed: 0.80 / 0.85 and 0.86 / 0.86.
    assert written["retention"]["sst2"]["seeds"] == [0, 1] and "rte" not in written["retention"]
    assert "| retention: RetriKT ÷ teacher zero-shot, per seed | 97.1 (94.1-100.0) | - |" in text
    assert "| beyond the recipe: student confidence_kd (kd_weighting confidence) | 82.0 | - |" in text
    assert (
        "| sst2/0 | beyond the recipe: student confidence_kd (kd_weighting confidence) | 82.0 | 1 / 2 | 1.000 |" in text
    )
    assert "| ablation: L_rank weight b = 0.3 | 81.0 | - |" in text and "| ablation: store 25% | 75.0 | - |" in text
    # A seed counts as finished once all its cells ran (its extras are written last); the others as begun.
    assert "Seeds finished: sst2 [0] (begun: [1, 2]), rte [0]" in text
    # A rerun of the same profile starts from the finished cells; another profile starts afresh.
    assert len(quality.Cells(tmp_path / "quality.json", "test").cells) == len(_cells()) + 1
    assert quality.Cells(tmp_path / "quality.json", "other").cells == []


def test_task_and_seed_selection_keeps_the_profile_order_and_names_unknowns():
    assert quality.selection("--tasks", ["cb", "sst2"], ["sst2", "rte", "cb"]) == ["sst2", "cb"]
    assert quality.selection("--seeds", None, [0, 1]) == [0, 1]
    with pytest.raises(SystemExit, match="--tasks: mnli not in the profile"):
        quality.selection("--tasks", ["mnli"], ["sst2"])


def test_report_only_rewrites_table_and_plots_from_the_results_json(tmp_path):
    (tmp_path / "quality.json").write_text(json.dumps({"profile": "cpu-small", "cells": _cells(), "extras": {}}))
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "quality.py"), "--profile", "cpu-small", "--report-only",
         "--out", str(tmp_path / "quality"), "--runs-dir", str(tmp_path / "runs")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert (
        "| RetriKT: student + store, full recipe | 83.0 (80.0-86.0) | 50.0 | - | - |"
        in (tmp_path / "quality.md").read_text()
    )
    assert (tmp_path / "quality_accuracy.png").is_file() and not (tmp_path / "runs").exists()


def test_knn_readout_weights_the_nearest_rows_soft_labels_and_centring_removes_a_shared_offset():
    teacher_states = _load_benchmark("teacher_states")
    store = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    soft = np.array([[0.8, 0.2], [0.6, 0.4], [0.3, 0.7], [0.1, 0.9]])
    dev = np.array([[1.0, 0.05], [0.05, 1.0]])
    assert teacher_states.knn_accuracy(dev, store, soft, np.array([0, 1]), k=2, tau=0.05) == 1.0
    assert teacher_states.knn_accuracy(dev, store, soft, np.array([1, 0]), k=2, tau=0.05) == 0.0
    # k = 1 reads the single nearest row: row 1 for a dev point next to it, whose soft label still says 0.
    assert teacher_states.knn_accuracy(np.array([[0.8, 0.12]]), store, soft, np.array([0]), k=1, tau=0.05) == 1.0
    # The same points on top of a large shared offset (as in a decoder's states): every cosine near 1,
    # so softmax(cos / tau_T) is nearly flat; centring brings the spread back.
    offset = np.concatenate([store, np.zeros((4, 1))], axis=1) + np.array([0.0, 0.0, 100.0])
    assert teacher_states.mean_pairwise_cosine(offset) > 0.99
    assert teacher_states.mean_pairwise_cosine(offset - offset.mean(axis=0)) < 0.0


def test_teacher_states_benchmark_writes_its_table_for_a_finished_run(sst2_run, tmp_path):
    _, run_dir = sst2_run
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "teacher_states.py"), "--run", str(run_dir), "--layers", "-1",
         "--out", str(tmp_path / "states")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads((tmp_path / "states.json").read_text())["rows"]
    assert [row["representation"].split(" (")[0] for row in rows] == [
        "teacher answer",
        "teacher mean_pool",
        "student encoder before training",
    ]
    assert all(0.0 <= row["accuracy_raw"] <= 1.0 for row in rows)
    assert "| teacher answer | -1 |" in (tmp_path / "states.md").read_text()


def test_every_committed_profile_gives_valid_job_specs(tmp_path):
    budgets = Path(quality.__file__).with_name("quality.yaml")
    for name in yaml.safe_load(budgets.read_text())["profiles"]:
        profile = quality.load_profile(budgets, name)
        for task in profile.tasks:
            specs = quality.variant_specs(profile, name, task, profile.seeds[0], tmp_path)
            assert specs["full"].task.name == task and specs["full"].data.shots == profile.shots
    pool = quality.variant_specs(quality.load_profile(budgets, "cpu-pool"), "cpu-pool", "sst2", 0, tmp_path)
    small = quality.variant_specs(quality.load_profile(budgets, "cpu-small"), "cpu-small", "sst2", 0, tmp_path)
    assert pool["full"].generate.samples_per_label == 4 * small["full"].generate.samples_per_label
    assert pool["full"].ppo == small["full"].ppo and pool["full"].student == small["full"].student
    # cpu-demo starts from jobs/demo.yaml, so its SST-2 seed-0 run is the demo's run, stage by stage.
    demo = quality.variant_specs(quality.load_profile(budgets, "cpu-demo"), "cpu-demo", "sst2", 0, tmp_path)
    demo_job = load_spec(REPO / "jobs" / "demo.yaml")

    def hashes(spec):
        return {stage.name: stage.stage_hash for stage in plan(spec, tmp_path / "run")}

    assert hashes(demo["full"]) == hashes(demo_job)
    with pytest.raises(ValidationError, match="job_file: jobs/missing.yaml not found"):
        quality.Profile(description="-", tasks=["sst2"], seeds=[0], ablation_tasks=[], store_fractions=[],
                        job_file="jobs/missing.yaml")  # fmt: skip


def test_exact_mcnemar_counts_the_rows_only_one_of_two_students_gets_right():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)
    assert mcnemar_exact(21, 40) == pytest.approx(mcnemar_exact(40, 21))
    assert mcnemar_exact(21, 40) == pytest.approx(0.0205, abs=5e-4)
    assert mcnemar_exact(3, 3) == 1.0
    baseline, variant = np.array([True, True, False, False, True]), np.array([True, False, True, True, True])
    assert paired(baseline, variant) == {
        "only_baseline_right": 1,
        "only_variant_right": 2,
        "p_value": 1.0,
    }


def test_student_variants_benchmark_reruns_only_the_student_and_evaluate_stages(sst2_run, tmp_path):
    import shutil

    _, run_dir = sst2_run
    copy = tmp_path / "runs" / run_dir.name
    shutil.copytree(run_dir, copy)
    variants = tmp_path / "variants.yaml"
    # Two epochs, not the shared run's twenty: the variant only has to retrain its student.
    variants.write_text("as_run: []\nstore_lists: [student.rank_lists=store, student.epochs=2]\n")
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "student_variants.py"), "--run", str(copy),
         "--variants", str(variants), "--out", str(tmp_path / "variants")],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads((tmp_path / "variants.json").read_text())
    rows = results["rows"]
    assert [row["variant"] for row in rows] == ["as_run", "store_lists"]
    assert rows[0]["against_baseline"] is None and all(row["last_epoch"]["rank"] > 0 for row in rows)
    assert all(
        0.0 <= row["teacher_agreement"] <= 1.0
        and row["store_rows"] > 0
        and 0.0 <= row["pool_teacher_agrees_with_intended_label"] <= 1.0
        for row in rows
    )  # the tiny run scores its teacher
    against = rows[1]["against_baseline"]
    assert (
        against["only_baseline_right"] + against["only_variant_right"] <= results["settings"]["dev_examples"]
        and 0.0 <= against["p_value"] <= 1.0
    )
    table = (tmp_path / "variants.md").read_text()
    assert "| as_run | as run |" in table and "| store_lists | `student.rank_lists=store` `student.epochs=2` |" in table

    def manifest(folder, stage):
        return json.loads((folder / stage / "manifest.json").read_text())

    unchanged, changed = (tmp_path / "runs" / row["run"] for row in rows)
    for stage in ("prompt", "ppo", "generate", "unlabelled", "store", "student", "evaluate"):
        assert manifest(unchanged, stage)["finished_at"] == manifest(copy, stage)["finished_at"]
    for stage in ("prompt", "ppo", "generate", "unlabelled", "store"):
        assert (
            manifest(changed, stage)["reused_from"]
            and manifest(changed, stage)["finished_at"] == manifest(copy, stage)["finished_at"]
        )
    assert not manifest(changed, "student").get("reused_from")
    assert manifest(changed, "student")["stage_hash"] != manifest(copy, "student")["stage_hash"]
