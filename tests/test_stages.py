"""Every stage on tiny 2-layer models through the real pipeline and real Ray (Train and Data).

One SST-2 pipeline run (conftest's `sst2_run`: 2 workers, ZeRO-2) is shared by the per-stage tests; further tests
check a choice task (COPA), skipping, partial re-runs, reuse and generation resume.
"""

import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
from helpers import manifest, run_logged, tiny_spec
from safetensors.torch import load_file

from retrikt_ray import pipeline
from retrikt_ray.artifacts import STAGING_PREFIX, run_dir_for, staged, write_parquet_atomic
from retrikt_ray.config import JobSpec
from retrikt_ray.knowledge_store import KnowledgeStore
from retrikt_ray.retrieval_student import RetrievalStudent, encoder_fingerprint


def test_every_stage_writes_config_and_manifest(sst2_run):
    spec, run_dir = sst2_run
    assert (run_dir / "job.yaml").is_file()
    for stage in pipeline.plan(spec, run_dir):
        record = manifest(run_dir, stage.name)
        assert record["status"] == "done" and record["stage_hash"] == stage.stage_hash
        assert (run_dir / stage.name / "config.yaml").is_file()
        assert record["seconds"] > 0
        assert not (run_dir / stage.name / "_ray_train").exists()


def test_prompt_stage_learns_a_soft_prompt(sst2_run):
    spec, run_dir = sst2_run
    prompt = load_file(str(run_dir / "prompt" / "soft_prompt.safetensors"))["soft_prompt"]
    assert tuple(prompt.shape) == (4, 32)
    losses = manifest(run_dir, "prompt")["metrics"]["loss_per_epoch"]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert (run_dir / "prompt" / "adapter" / "adapter_config.json").is_file()


def test_ppo_stage_logs_every_reward_term_and_moves_the_prompt(sst2_run):
    spec, run_dir = sst2_run
    metrics = manifest(run_dir, "ppo")["metrics"]
    assert len(metrics["history"]) == spec.ppo.updates
    for entry in metrics["history"]:
        for key in (
            "reward",
            "consistency_term",
            "diversity_term",
            "penalty_term",
            "consistency_rate",
            "distinct_2",
            "mean_max_cos",
            "kl",
        ):
            assert np.isfinite(entry[key]), key
    for measured in (metrics["before"], metrics["after"]):  # fixed draws from the stage-1 and the final prompt
        assert 0.0 <= measured["consistency_rate"] <= 1.0 and 0.0 <= measured["distinct_2"] <= 1.0
        assert -1.0 <= measured["mean_max_cos"] <= 1.0
    assert (run_dir / "ppo" / "ppo_curves.png").stat().st_size > 1000
    assert 0.0 <= metrics["teacher_accuracy_labelled"] <= 1.0 and metrics["labelled_majority_share"] == 0.5
    assert f"of the {metrics['labelled_examples']} labelled examples right" in manifest(run_dir, "ppo")["summary"]
    assert (
        f"draws parsed {metrics['before']['valid_rate']:.2f} -> {metrics['after']['valid_rate']:.2f}"
        in manifest(run_dir, "ppo")["summary"]
    )
    before = load_file(str(run_dir / "prompt" / "soft_prompt.safetensors"))["soft_prompt"]
    after = load_file(str(run_dir / "ppo" / "soft_prompt.safetensors"))["soft_prompt"]
    assert not np.allclose(before.numpy(), after.numpy())


def test_ppo_says_when_the_teacher_labels_the_labelled_examples_no_better_than_the_majority_label():
    from retrikt_ray.stages.ppo import describe_teacher_on_labelled, teacher_on_labelled

    labels = np.array([0] * 8 + [1] * 8 + [2] * 16)
    measured = teacher_on_labelled(np.eye(3)[labels], labels)
    assert measured == {"teacher_accuracy_labelled": 1.0, "labelled_majority_share": 0.5, "labelled_examples": 32}
    assert "not clearly better" not in describe_teacher_on_labelled(measured)
    # Always "2" scores the majority share; two more right (56%) is within one standard error (8.8 points) of it.
    always_majority = np.tile([0.2, 0.2, 0.6], (len(labels), 1))
    for right in (0, 2):
        probs = always_majority.copy()
        probs[:right] = np.eye(3)[labels[:right]]
        assert "not clearly better than always answering the majority label" in describe_teacher_on_labelled(
            teacher_on_labelled(probs, labels)
        )
    probs = always_majority.copy()
    probs[:4] = np.eye(3)[labels[:4]]  # 62.5%: more than one standard error above 50%
    assert "not clearly better" not in describe_teacher_on_labelled(teacher_on_labelled(probs, labels))


def test_ppo_says_what_to_change_when_few_of_the_stage1_prompts_draws_parse():
    from retrikt_ray.stages.ppo import describe_stage1_draws

    spec = JobSpec.model_validate({"task": {"name": "copa"}, "prompt": {"epochs": 3}, "ppo": {"max_new_tokens": 56}})
    assert (
        describe_stage1_draws({"valid_rate": 21 / 32}, 32, spec)
        == "the stage-1 prompt writes 21 of 32 fixed draws in the task's template"
    )
    few = describe_stage1_draws({"valid_rate": 7 / 32}, 32, spec)
    assert few.startswith("the stage-1 prompt writes 7 of 32 fixed draws in the task's template: PPO learns little")
    assert "prompt.epochs, now 3" in few and "ppo.max_new_tokens, now 56" in few


def test_a_per_label_prompt_goes_in_front_of_its_own_labels_generation_prompt(tiny_models, tmp_path):
    import torch

    from retrikt_ray.tasks import load_few_shot
    from retrikt_ray.teacher import Teacher

    spec = tiny_spec(tiny_models, tmp_path)
    task, _ = load_few_shot(spec)
    torch.manual_seed(0)
    prompts = 0.1 * torch.randn(2, 4, 32)
    teacher = Teacher.from_spec(spec, task)
    ids = torch.tensor([teacher.tokenizer(" a fine film", add_special_tokens=False).input_ids])
    with torch.no_grad():
        for label in range(2):
            per_label, _ = teacher.continuation_outputs(label, ids, prompts)
            alone, _ = teacher.continuation_outputs(label, ids, prompts[label])
            other, _ = teacher.continuation_outputs(label, ids, prompts[1 - label])
            torch.testing.assert_close(per_label, alone)
            assert not torch.allclose(per_label, other)


def rerun_ppo(sst2_run, tmp_path, **ppo_changes):
    """The shared tiny run's prompt stage, copied into a new run whose PPO section has `ppo_changes`; its PPO run
    there."""
    spec, shared = sst2_run
    spec = spec.model_copy(deep=True)
    spec.storage.runs_dir = str(tmp_path / "runs")
    for key, value in ppo_changes.items():
        setattr(spec.ppo, key, value)
    shutil.copytree(
        shared, run_dir_for(spec), ignore=shutil.ignore_patterns("ppo", "generate", "store", "student", "evaluate")
    )
    run_dir, _ = run_logged(spec, only="ppo")
    return spec, run_dir


def test_ppo_with_per_label_prompts_tunes_each_labels_copy_and_generates_from_them(sst2_run, tmp_path):
    """Each label's copy of the stage-1 prompt moves, and the copies part (a prompt shared by the labels
    would keep them equal); the generate stage samples from them."""
    spec, run_dir = rerun_ppo(sst2_run, tmp_path, per_label_prompt=True)
    run_logged(spec, only="generate")
    stage_one = load_file(str(run_dir / "prompt" / "soft_prompt.safetensors"))["soft_prompt"].numpy()
    prompts = load_file(str(run_dir / "ppo" / "soft_prompt.safetensors"))["soft_prompt"].numpy()
    assert prompts.shape == (2, *stage_one.shape)
    for label in range(2):
        assert not np.allclose(prompts[label], stage_one)
    assert not np.allclose(prompts[0], prompts[1])
    assert manifest(run_dir, "generate")["counts"]["generated"] == 2 * spec.generate.samples_per_label


def test_ppo_passes_on_the_stage1_prompt_when_the_final_one_scores_lower_on_the_fixed_draws(sst2_run, tmp_path):
    from retrikt_ray.stages.ppo import keeps_stage1_prompt

    spec, run_dir = rerun_ppo(sst2_run, tmp_path, keep_stage1_when_worse=True)
    ppo = manifest(run_dir, "ppo")
    metrics, summary = ppo["metrics"], ppo["summary"]
    worse = metrics["after"]["reward"] < metrics["before"]["reward"]
    assert metrics["kept_stage1_prompt"] == worse
    assert ("the stage-1 prompt is kept" in summary) == worse
    stage_one = load_file(str(run_dir / "prompt" / "soft_prompt.safetensors"))["soft_prompt"].numpy()
    passed_on = load_file(str(run_dir / "ppo" / "soft_prompt.safetensors"))["soft_prompt"].numpy()
    assert np.allclose(passed_on, stage_one) == worse

    before, after = {"reward": -0.85, "valid_rate": 0.65}, {"reward": -4.6, "valid_rate": 0.0}
    assert keeps_stage1_prompt(before, after, spec) and not keeps_stage1_prompt(after, before, spec)
    assert not keeps_stage1_prompt(before, before, spec)
    spec.ppo.keep_stage1_when_worse = False
    assert not keeps_stage1_prompt(before, after, spec)


def test_generate_stage_counts_everything_it_drops(sst2_run):
    spec, run_dir = sst2_run
    counts = manifest(run_dir, "generate")["counts"]
    assert counts["generated"] == 2 * spec.generate.samples_per_label
    dropped = sum(value for key, value in counts.items() if key.startswith("dropped_"))
    assert counts["kept"] + dropped == counts["generated"]
    samples = pd.read_parquet(run_dir / "generate" / "samples.parquet")
    assert len(samples) == counts["kept"] > 0
    soft = np.stack(samples["soft_label"].to_numpy())
    assert np.allclose(soft.sum(axis=1), 1, atol=1e-5)
    assert np.stack(samples["teacher_state"].to_numpy()).shape == (len(samples), 32)
    assert len(list((run_dir / "generate" / "shards").glob("*.parquet"))) == 4


def test_filtering_names_why_each_sample_was_dropped(tiny_models, tmp_path):
    from retrikt_ray.stages.generate import filter_samples
    from retrikt_ray.tasks import Task

    # A random tiny encoder may put any two texts close: near duplicates are tested in the sst2 run.
    spec = tiny_spec(
        tiny_models,
        tmp_path,
        task="rte",
        generate__min_words=3,
        generate__max_words=12,
        generate__near_duplicate_cosine=1.0,
    )
    budget = spec.generate.max_new_tokens
    texts_tokens = [
        ("A dog runs. Hypothesis: An animal moves.", 9),
        ("Premise: A cat sleeps. Hypothesis: It is awake.", 11),  # repeats the opening literal it was handed
        ("a dog runs.  Hypothesis: an animal moves.", 9),
        ("A cat sleeps on the warm mat by the", budget),  # ran out of tokens before the hypothesis
        ("A cat sleeps on the mat.", 7),  # stopped without a hypothesis
        ("Hi.", 2),
        ("one two three four five six seven eight nine ten eleven twelve thirteen", budget),
    ]
    generated = pd.DataFrame(
        {"text": [t for t, _ in texts_tokens], "label": [0] * 7, "tokens": [n for _, n in texts_tokens]}
    )
    kept, dropped = filter_samples(spec, Task.from_spec(spec.task), generated)
    assert {reason: count for reason, count in dropped.items() if count} == {
        "exact_duplicate": 1,
        "cut_off": 1,
        "unparseable": 1,
        "too_short": 1,
        "too_long": 1,
    }
    assert [json.loads(fields) for fields in kept["fields"]] == [
        {"premise": "A dog runs.", "hypothesis": "An animal moves."},
        {"premise": "A cat sleeps.", "hypothesis": "It is awake."},
    ]


def test_unlabelled_stage_labels_in_domain_texts_with_the_teachers_answer(sst2_run):
    from retrikt_ray.tasks import Task, load_dev, load_few_shot

    spec, run_dir = sst2_run
    counts = manifest(run_dir, "unlabelled")["counts"]
    assert (
        counts["annotated"]
        == spec.unlabelled.samples
        == sum(counts[f"teacher_label_{name}"] for name in ("negative", "positive"))
    )
    texts = pd.read_parquet(run_dir / "unlabelled" / "samples.parquet")
    soft = np.stack(texts["soft_label"].to_numpy())
    assert np.allclose(soft.sum(axis=1), 1, atol=1e-5) and texts["label"].tolist() == soft.argmax(axis=1).tolist()
    assert np.stack(texts["teacher_state"].to_numpy()).shape == (len(texts), 32)
    task = Task.from_spec(spec.task)
    train = {json.dumps(example.fields) for example in task.load(task.default_files()[0])}
    held_out = {json.dumps(example.fields) for example in load_few_shot(spec)[1] + load_dev(spec)[1]}
    assert set(texts["fields"]) <= train and not set(texts["fields"]) & held_out
    for stage in ("generate", "unlabelled"):  # the annotation shards go once the samples file holds them
        assert manifest(run_dir, stage)["metrics"]["annotation_chunks_resumed"] == 0
        assert not (run_dir / stage / "annotation_shards").exists()


def test_annotation_resumes_from_the_chunks_it_saved(sst2_run, tmp_path, monkeypatch):
    from retrikt_ray import samples
    from retrikt_ray.tasks import Task

    spec, run_dir = sst2_run
    monkeypatch.setattr(samples, "ANNOTATION_CHUNK", 2)
    task, spec_json, shards = Task.from_spec(spec.task), spec.model_dump(mode="json"), tmp_path / "shards"
    frame = samples.read_samples(run_dir / "generate")[["label", "text", "fields"]]
    first, resumed = samples.annotate(spec, task, frame, spec_json, shards)
    saved = sorted(shards.glob("*.parquet"))
    assert resumed == 0 and len(saved) == -(-len(frame) // 2) > 1
    saved[0].unlink()  # as if the stage was interrupted before its first chunk was saved
    kept_times = {path.name: path.stat().st_mtime_ns for path in saved[1:]}
    again, resumed = samples.annotate(spec, task, frame, spec_json, shards)
    assert resumed == len(saved) - 1 and saved[0].exists()
    assert {path.name: path.stat().st_mtime_ns for path in saved[1:]} == kept_times
    assert again["fields"].tolist() == first["fields"].tolist()
    for column in ("soft_label", "teacher_state"):
        assert np.allclose(np.stack(again[column].to_numpy()), np.stack(first[column].to_numpy()), atol=1e-5)
    changed = frame.copy()
    changed.loc[len(frame) - 1, "fields"] = json.dumps({"sentence": "a different last sentence"})
    assert samples.annotate(spec, task, changed, spec_json, shards)[1] == len(saved) - 1  # its last chunk is new


def test_unlabelled_texts_skip_labelled_dev_repeated_and_short_ones_and_count_them(tiny_models, tmp_path):
    from retrikt_ray.stages.unlabelled import draw_texts
    from retrikt_ray.tasks import load_dev, load_few_shot

    spec = tiny_spec(tiny_models, tmp_path)
    task, labelled = load_few_shot(spec)
    dev = task.load(task.default_files()[1])
    rows = [
        labelled[0].fields["sentence"],
        dev[-1].fields["sentence"].upper(),
        "a fine film , warmly acted",
        "A fine film ,  warmly acted",
        "too short",
        "a dull and tired remake",
    ]
    source = tmp_path / "reviews.tsv"
    source.write_text("sentence\n" + "\n".join(rows) + "\n")  # no label column
    spec.unlabelled.file, spec.unlabelled.min_words, spec.unlabelled.samples = str(source), 3, 5
    drawn, skipped, eligible = draw_texts(spec, task)
    assert dict(skipped) == {"labelled_example": 1, "in_dev_set": 1, "duplicate": 1, "too_short": 1}
    assert eligible == 2 and sorted(example.fields["sentence"] for example in drawn) == [
        "a dull and tired remake",
        "a fine film , warmly acted",
    ]
    assert all(example.label == -1 for example in drawn)
    spec.unlabelled.samples = 1
    assert len(draw_texts(spec, task)[0]) == 1
    assert len(load_dev(spec)[1]) == 24  # data.dev_limit, while every dev row was held out above


def test_store_stage_indexes_every_kept_sample_and_unlabelled_text(sst2_run):
    spec, run_dir = sst2_run
    store = KnowledgeStore.load(run_dir / "store")
    counts = manifest(run_dir, "store")["counts"]
    assert len(store) == counts["examples"] == manifest(run_dir, "generate")["counts"]["kept"] + spec.unlabelled.samples
    assert counts["examples_unlabelled"] == spec.unlabelled.samples > 0
    _, ids = store.search(store.keys[:3], 1)
    assert ids[:, 0].tolist() == [0, 1, 2]


def test_student_stage_saves_a_student_and_the_store_it_was_trained_with(sst2_run):
    spec, run_dir = sst2_run
    student = RetrievalStudent.load(run_dir / "student" / "model")
    store = KnowledgeStore.load(run_dir / "student" / "store")
    assert store.encoder_fingerprint == encoder_fingerprint(student.encoder)
    assert store.encoder_fingerprint != KnowledgeStore.load(run_dir / "store").encoder_fingerprint
    history = manifest(run_dir, "student")["metrics"]["history"]
    assert len(history) == spec.student.epochs
    assert all(np.isfinite(entry[key]) for entry in history for key in ("kd", "ce", "rank"))


def run_stages(spec: JobSpec, run_dir, modules) -> None:
    """Each stage module in turn, in run_dir, on the inputs already there (no pipeline around them)."""
    stages = {stage.name: stage for stage in pipeline.plan(spec, run_dir)}
    for module in modules:
        stages[module.STAGE.name].prepare()
        stages[module.STAGE.name].finish(module.STAGE.run(spec, stages[module.STAGE.name]), 0.0)


def labelled_examples_as_samples(spec: JobSpec, flip: bool) -> pd.DataFrame:
    """The job's labelled examples as annotated samples, each with a one-hot soft label: its own label,
    or (flip) the next one, a teacher that is always wrong."""
    from retrikt_ray.tasks import load_few_shot

    task, few_shot = load_few_shot(spec)
    soft = [np.eye(task.num_labels)[(e.label + flip) % task.num_labels].astype(np.float32) for e in few_shot]
    return pd.DataFrame(
        {
            "label": [e.label for e in few_shot],
            "text": [task.generation_text(e) for e in few_shot],
            "fields": [json.dumps(e.fields) for e in few_shot],
            "soft_label": soft,
            "teacher_state": [np.random.default_rng(i).normal(size=8).astype(np.float32) for i in range(len(few_shot))],
        }
    )


def test_retrieval_is_gated_off_when_the_stores_soft_labels_do_not_label_the_labelled_examples(tiny_models, tmp_path):
    from retrikt_ray.stages import store, student
    from retrikt_ray.tasks import load_few_shot

    spec = tiny_spec(tiny_models, tmp_path, student__tau=0.01)
    task, few_shot = load_few_shot(spec)
    untrained = RetrievalStudent.from_spec(spec.student, task.student_num_labels)

    def measured(flip):
        rows = store.store_rows(task, labelled_examples_as_samples(spec, flip))
        keys = untrained.embed_all(rows["inputs"])
        knowledge = KnowledgeStore(keys=keys, encoder_fingerprint=encoder_fingerprint(untrained.encoder), **rows)
        knowledge.build_index("flat")
        return student.retrieval_on_labelled(task, untrained, knowledge, few_shot)

    # Each labelled example finds itself in the store (cosine 1): a right teacher labels all of them, a wrong one none.
    right, wrong = measured(flip=False), measured(flip=True)
    assert right == {"retrieval_accuracy": 1.0, "majority_share": 0.5, "examples": 8, "informative": True}
    assert wrong == {"retrieval_accuracy": 0.0, "majority_share": 0.5, "examples": 8, "informative": False}
    assert not student.gates_retrieval(right, spec) and student.gates_retrieval(wrong, spec)
    assert student.describe_retrieval_on_labelled(right, spec) == (
        "the store's soft labels, retrieved by the untrained student, label 100% of the 8 labelled examples right "
        "(majority label 50%)"
    )
    assert (
        "so the student trains and predicts with its head alone (lam 0, not 0.5)"
        in student.describe_retrieval_on_labelled(wrong, spec)
    )
    spec.student.retrieval_gate = False
    assert not student.gates_retrieval(wrong, spec)


def test_a_gated_student_is_trained_saved_and_evaluated_with_its_head_alone(ray_local, tiny_models, tmp_path):
    from retrikt_ray.samples import SAMPLES
    from retrikt_ray.stages import evaluate, store, student, unlabelled

    spec = tiny_spec(tiny_models, tmp_path, student__tau=0.01)
    run_dir = tmp_path / "run"
    (run_dir / "generate").mkdir(parents=True)
    labelled_examples_as_samples(spec, flip=True).to_parquet(run_dir / "generate" / SAMPLES)
    run_stages(spec, run_dir, (unlabelled, store, student, evaluate))
    trained = manifest(run_dir, "student")
    assert trained["metrics"]["retrieval_labelled"]["retrieval_accuracy"] == 0.0 and trained["metrics"]["lam"] == 0.0
    assert "head alone (lam 0, not 0.5)" in trained["summary"]
    assert RetrievalStudent.load(run_dir / "student" / "model").lam == 0.0
    metrics = manifest(run_dir, "evaluate")["metrics"]
    assert metrics["accuracy_student_store"] == metrics["accuracy_student_head"]


def test_the_kd_term_is_todays_by_default_and_weighs_or_bootstraps_as_asked():
    import torch

    from retrikt_ray.config import StudentSpec
    from retrikt_ray.retrieval_student import kd_loss
    from retrikt_ray.stages.student import kd_term

    soft = torch.tensor([[0.9, 0.1], [0.5, 0.5]])
    p = torch.tensor([[0.6, 0.4], [0.3, 0.7]], requires_grad=True)
    assert kd_term(StudentSpec(), soft, p).item() == kd_loss(soft, p).item()
    # confidence: the row the teacher labels at chance drops out
    assert kd_term(StudentSpec(kd_weighting="confidence"), soft, p).item() == pytest.approx(
        kd_loss(soft[:1], p[:1]).item()
    )
    # bootstrap: the target moves halfway to the student's own prediction, and no gradient flows through it
    bootstrapped = kd_term(StudentSpec(kd_bootstrap=0.5), soft, p)
    target = 0.5 * soft + 0.5 * p.detach()
    assert bootstrapped.item() == pytest.approx(kd_loss(target, p).item())
    bootstrapped.backward()
    gradient = p.grad.clone()
    p.grad = None
    leaf = p.detach().clone().requires_grad_()
    kd_loss(target, leaf).backward()
    assert torch.allclose(gradient, leaf.grad)


def test_rank_lists_hold_each_row_once_and_never_padding():
    from retrikt_ray.stages.student import rank_lists

    members, valid = rank_lists(np.array([[4, 7], [2, 3]]), np.array([[7, 5, -1], [1, 2, 3]]))
    assert members.tolist() == [[4, 7, 0, 5, 0], [2, 3, 1, 0, 0]]
    assert valid.tolist() == [[True, True, False, True, False], [True, True, True, False, False]]


def test_a_student_ranking_store_lists_trains_on_a_nonzero_rank_loss(ray_local, tiny_models, tmp_path):
    from retrikt_ray.samples import SAMPLES
    from retrikt_ray.stages import store, student, unlabelled

    spec = tiny_spec(
        tiny_models, tmp_path, student__rank_lists="store", student__rank_list_size=3, student__retrieval_gate=False
    )
    run_dir = tmp_path / "run"
    (run_dir / "generate").mkdir(parents=True)
    labelled_examples_as_samples(spec, flip=False).to_parquet(run_dir / "generate" / SAMPLES)
    run_stages(spec, run_dir, (unlabelled, store, student))
    history = manifest(run_dir, "student")["metrics"]["history"]
    assert len(history) == spec.student.epochs
    assert all(np.isfinite(entry["rank"]) and entry["rank"] > 0 for entry in history)


def test_evaluate_stage_reports_metrics_in_range(sst2_run):
    spec, run_dir = sst2_run
    metrics = manifest(run_dir, "evaluate")["metrics"]
    for key in (
        "accuracy_student_store",
        "accuracy_student_head",
        "accuracy_teacher_zero_shot",
        "macro_f1_student_store",
    ):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["dev_examples"] == 24
    assert metrics["params_teacher"] > metrics["params_student"] > 0
    assert metrics["ms_per_example_student_store"] > 0
    predictions = pd.read_parquet(run_dir / "evaluate" / "predictions.parquet")
    assert len(predictions) == 24
    # Every reported accuracy is the one the written predictions give against the written gold labels.
    from retrikt_ray.retrieval_student import predict_examples
    from retrikt_ray.tasks import load_dev

    task, dev = load_dev(spec)
    gold = predictions["gold"].to_numpy()
    assert gold.tolist() == [example.label for example in dev]
    p, p_head = np.stack(predictions["p"]), np.stack(predictions["p_head"])
    assert predictions["predicted"].tolist() == p.argmax(axis=1).tolist()
    assert metrics["accuracy_student_store"] == pytest.approx((p.argmax(axis=1) == gold).mean())
    assert metrics["accuracy_student_head"] == pytest.approx((p_head.argmax(axis=1) == gold).mean())
    assert metrics["accuracy_teacher_zero_shot"] == pytest.approx(
        (np.stack(predictions["p_teacher"]).argmax(axis=1) == gold).mean()
    )
    # The file holds no p_ret: predict again with the saved student and store, check that this gives the file's
    # p and p_head, and take the retrieval-only accuracy from its p_ret.
    student = RetrievalStudent.load(run_dir / "student" / "model", dtype=spec.student.dtype)  # as evaluate does
    again = predict_examples(
        task, student, KnowledgeStore.load(run_dir / "student" / "store"), dev, spec.evaluate.batch_size
    )
    assert np.allclose(again["p"], p, atol=1e-5) and np.allclose(again["p_head"], p_head, atol=1e-5)
    assert np.allclose(student.lam * again["p_ret"] + (1 - student.lam) * p_head, p, atol=1e-5)
    assert metrics["accuracy_retrieval_only"] == pytest.approx((again["p_ret"].argmax(axis=1) == gold).mean())
    same_answer = np.stack(predictions["p_teacher"]).argmax(axis=1) == np.stack(predictions["p"]).argmax(axis=1)
    assert metrics["agreement_student_teacher"] == pytest.approx(same_answer.mean())
    assert f"student agrees on {same_answer.mean():.1%}" in manifest(run_dir, "evaluate")["summary"]


def test_choice_task_stages(ray_local, tiny_models, tmp_path):
    """COPA through annotation, unlabelled texts, store, student and evaluation. A random tiny teacher cannot
    write parseable COPA examples, so the 'generated' samples here are real COPA training examples."""
    from retrikt_ray.samples import SAMPLES, annotate
    from retrikt_ray.stages import evaluate, store, student, unlabelled
    from retrikt_ray.tasks import Task

    spec = tiny_spec(tiny_models, tmp_path, task="copa", unlabelled__samples=6)
    task = Task.from_spec(spec.task)
    examples = task.load(task.default_files()[0])[:12]
    frame = pd.DataFrame(
        {
            "label": [e.label for e in examples],
            "text": [task.generation_text(e) for e in examples],
            "fields": [json.dumps(e.fields) for e in examples],
        }
    )
    annotated, _ = annotate(spec, task, frame, spec.model_dump(mode="json"), tmp_path / "annotation_shards")
    assert np.allclose(np.stack(annotated["soft_label"].to_numpy()).sum(axis=1), 1, atol=1e-5)
    run_dir = tmp_path / "run"
    (run_dir / "generate").mkdir(parents=True)
    annotated.to_parquet(run_dir / "generate" / SAMPLES)
    run_stages(spec, run_dir, (unlabelled, store, student, evaluate))
    trained = KnowledgeStore.load(run_dir / "student" / "store")
    assert len(trained) == 2 * (len(examples) + 6)  # one row per alternative
    texts = pd.read_parquet(run_dir / "unlabelled" / SAMPLES)
    assert texts["label"].tolist() == np.stack(texts["soft_label"].to_numpy()).argmax(axis=1).tolist()
    assert sorted(np.unique(trained.labels)) == [0, 1]
    metrics = manifest(run_dir, "evaluate")["metrics"]
    assert metrics["dev_examples"] == 24
    assert 0.0 <= metrics["accuracy_student_store"] <= 1.0 and 0.0 <= metrics["accuracy_teacher_zero_shot"] <= 1.0


def test_rerun_skips_and_changes_rerun_only_downstream(sst2_run, tiny_models):
    spec, run_dir = sst2_run
    _, lines = run_logged(spec)
    assert lines == [f"[{name}] finished earlier, skipped" for name in pipeline.STAGE_NAMES]

    changed = spec.model_copy(deep=True)
    changed.student.lr = 5e-4
    new_dir, lines = run_logged(changed)
    assert new_dir != run_dir
    reused = [line.split("]")[0][1:] for line in lines if "reused" in line]
    ran = [line.split("]")[0][1:] for line in lines if "reused" not in line]
    assert reused == ["prompt", "ppo", "generate", "unlabelled", "store"]
    assert ran == ["student", "evaluate"]
    assert manifest(new_dir, "store")["reused_from"].endswith("store")


def test_generation_resumes_from_finished_shards(sst2_run):
    spec, run_dir = sst2_run
    shards = sorted((run_dir / "generate" / "shards").glob("*.parquet"))
    kept_times = {path.name: path.stat().st_mtime_ns for path in shards[1:]}
    (run_dir / "generate" / "manifest.json").unlink()  # as if the stage was interrupted
    shards[0].unlink()
    killed_write = shards[0].parent / f"{STAGING_PREFIX}{shards[0].name}.x1y2"  # what a kill mid-write leaves
    killed_write.write_bytes(b"half a parquet file")
    _, lines = run_logged(spec, only="generate")
    assert lines[0].startswith("[generate]") and "skipped" not in lines[0]
    assert shards[0].exists() and not killed_write.exists()
    assert not any(STAGING_PREFIX in name for name in manifest(run_dir, "generate")["files"])
    assert {path.name: path.stat().st_mtime_ns for path in shards[1:]} == kept_times
    assert manifest(run_dir, "generate")["counts"]["generated"] == 2 * spec.generate.samples_per_label


def test_a_write_that_fails_leaves_neither_the_file_nor_its_staging_copy(tmp_path):
    target = tmp_path / "samples.parquet"
    with pytest.raises(ValueError):
        with staged(target) as staging:
            staging.write_bytes(b"half a parquet file")
            raise ValueError("interrupted")
    assert list(tmp_path.iterdir()) == []
    write_parquet_atomic(pd.DataFrame({"text": ["kept"]}), target)
    assert pd.read_parquet(target)["text"].tolist() == ["kept"] and list(tmp_path.iterdir()) == [target]


def test_force_redoes_a_finished_stage(sst2_run):
    spec, run_dir = sst2_run
    before = manifest(run_dir, "store")
    # finished_at has one-second resolution: date every file of the finished stage back to 2001, so that
    # each one the rerun rewrites is unmistakably newer and one it leaves alone is not.
    long_ago = 1_000_000_000
    written = [run_dir / "store" / name for name in [*before["files"], "manifest.json"]]
    for path in written:
        os.utime(path, (long_ago, long_ago))
    _, lines = run_logged(spec, only="store", force=True)
    assert len(lines) == 1 and "skipped" not in lines[0] and "reused" not in lines[0]
    after = manifest(run_dir, "store")
    assert after["stage_hash"] == {stage.name: stage.stage_hash for stage in pipeline.plan(spec, run_dir)}["store"]
    assert after["files"] == before["files"]
    assert {path.name: path.stat().st_mtime > long_ago for path in written} == {path.name: True for path in written}
    assert before["finished_at"] <= after["finished_at"]


def tiny_reward_model(spec: JobSpec):
    """The tiny teacher and PPO's reward model on it, calibrated against a uniform reference."""
    from retrikt_ray.stages.ppo import RewardModel
    from retrikt_ray.tasks import load_few_shot
    from retrikt_ray.teacher import Teacher

    task, _ = load_few_shot(spec)
    teacher = Teacher.from_spec(spec, task)
    encoder = RetrievalStudent.from_spec(spec.student, task.student_num_labels)
    return teacher, RewardModel(spec, teacher, task, encoder, np.full(task.num_labels, 1.0 / task.num_labels))


def test_measuring_a_prompt_repeats_its_draws_and_leaves_the_memory_bank_alone(tiny_models, tmp_path):
    """PPO's before / after: the same fixed draws for any prompt, and the bank neither scores nor keeps them."""
    import torch

    from retrikt_ray.stages.ppo import measure_prompt

    spec = tiny_spec(tiny_models, tmp_path)
    teacher, rewards = tiny_reward_model(spec)
    prompt = 0.02 * torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    first, again = measure_prompt(teacher, rewards, prompt), measure_prompt(teacher, rewards, prompt)
    assert {key: value for key, value in first.items() if key != "kl"} == {
        key: value for key, value in again.items() if key != "kl"
    }
    assert first["valid_rate"] > 0 and 0.0 <= first["consistency_rate"] <= 1.0 and -1.0 <= first["mean_max_cos"] <= 1.0
    assert all(len(bank) == 0 for bank in rewards.bank.banks)


def test_a_malformed_sample_is_punished_by_gamma_alone(tiny_models, tmp_path):
    """No p_C for a malformed sample: by default its consistency term is its batch's valid mean, so only the
    gamma penalty (and no diversity bonus) sets it below the valid samples on average; 'floor' scores log 0.01."""
    from retrikt_ray.stages.ppo import CONSISTENCY_FLOOR

    spec = tiny_spec(tiny_models, tmp_path)
    _, rewards = tiny_reward_model(spec)
    texts = ["a warm and funny film", "dull , slow and far too long", "", "word " * (spec.generate.max_words + 1)]
    score = rewards.score(1, texts, remember=False)
    assert score["valid"].tolist() == [True, True, False, False]
    valid_mean = score["consistency"][:2].mean()
    assert score["consistency"][0] != score["consistency"][1]
    np.testing.assert_allclose(score["consistency"][2:], valid_mean)
    np.testing.assert_allclose(score["reward"][2:], valid_mean - spec.ppo.gamma)
    np.testing.assert_allclose(score["penalty"], [0.0, 0.0, -spec.ppo.gamma, -spec.ppo.gamma])
    spec.ppo.malformed_consistency = "floor"
    floored = rewards.score(1, texts, remember=False)
    np.testing.assert_allclose(
        floored["consistency"], [*score["consistency"][:2], np.log(CONSISTENCY_FLOOR), np.log(CONSISTENCY_FLOOR)]
    )


def test_the_teachers_answer_state_is_read_in_the_classifying_pass(tiny_models, tmp_path):
    """h_T = 'answer': the state at the classification prompt's last token (choice tasks: the context's), from
    the same batched, padded forward as p_C; each row equals that example's own unpadded forward."""
    import torch

    from retrikt_ray.tasks import load_few_shot
    from retrikt_ray.teacher import Teacher

    for task_name in ("sst2", "copa"):
        spec = tiny_spec(tiny_models, tmp_path, task=task_name)
        spec.teacher.dtype = "float32"  # equal to Hugging Face's float32 forward within float32 rounding
        task, examples = load_few_shot(spec)
        teacher = Teacher.from_spec(spec, task)
        probs, states = teacher.read(examples, batch_size=3, state_layer=-2)
        np.testing.assert_allclose(probs, teacher.classify_raw(examples, batch_size=5), atol=1e-5)
        assert states.shape == (len(examples), 32)
        for row, example in enumerate(examples):
            if task.kind == "choice":
                ids = teacher.tokenizer(task.choice_contexts(example)[0][0], return_tensors="pt").input_ids
            else:
                ids = teacher.tokenizer(teacher.classification_text(example), return_tensors="pt").input_ids
            with torch.no_grad():
                alone = teacher.model(input_ids=ids, output_hidden_states=True).hidden_states[-2][0, -1]
            np.testing.assert_allclose(states[row], alone.numpy(), atol=1e-4)


def test_manifests_name_the_teachers_precision_per_use(sst2_run):
    """teacher.dtype auto resolves where the teacher runs; generate, PPO and evaluate record what it became."""
    from retrikt_ray.engine import resolve_precision

    spec, run_dir = sst2_run
    expected = resolve_precision(spec.teacher.dtype, "cpu").names()
    assert manifest(run_dir, "generate")["metrics"]["teacher_precision"] == [
        " ".join(f"{use}={dtype}" for use, dtype in expected.items())
    ]
    assert manifest(run_dir, "ppo")["metrics"]["teacher_precision"] == expected
    assert manifest(run_dir, "evaluate")["metrics"]["teacher_precision"] == expected


def test_length_grouped_batches_keep_the_rows_and_cut_padding():
    from retrikt_ray.stages.student import LENGTH_GROUP_BATCHES, length_grouped

    rng = np.random.default_rng(0)
    token_counts = rng.integers(5, 60, size=1000)
    shuffled = list(rng.permutation(1000))
    batch = 8
    grouped = length_grouped(shuffled, token_counts, batch, np.random.default_rng(1))
    assert sorted(grouped) == sorted(shuffled) and len(grouped) == len(shuffled)
    batches = [grouped[i : i + batch] for i in range(0, 1000, batch)]
    size = LENGTH_GROUP_BATCHES * batch
    groups = [set(shuffled[start : start + size]) for start in range(0, 1000, size)]
    for rows in batches:  # each batch: rows of one group, longest first
        assert any(set(rows) <= group for group in groups)
        assert list(token_counts[rows]) == sorted(token_counts[rows], reverse=True)
    # the batches do not run from long to short over the epoch
    longest = [token_counts[rows].max() for rows in batches]
    assert abs(np.corrcoef(np.arange(len(longest)), longest)[0, 1]) < 0.3
    assert grouped != length_grouped(shuffled, token_counts, batch, np.random.default_rng(2))

    def padded(order):
        return sum(token_counts[order[i : i + batch]].max() * len(order[i : i + batch]) for i in range(0, 1000, batch))

    assert padded(grouped) < 0.8 * padded(shuffled)
