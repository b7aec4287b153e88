"""The student term of PPO's reward (`ppo.student_reward`): hand-made cases of each definition, the student head
PPO refits and checkpoints, and on the tiny models that the term off gives the reward as it was, and that a
PPO interrupted between updates resumes its rewards and student exactly."""

import math

import numpy as np
import pytest
import torch
from helpers import tiny_spec

from retrikt_ray import pipeline
from retrikt_ray.config import HASHED_WHEN_SET, JobSpec
from retrikt_ray.rl import MemoryBank, StudentHead, learnability, per_sample_mean, targeted, usefulness


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tensors here are tiny: one torch thread is fastest, and spares a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def e(*values: float) -> torch.Tensor:
    return torch.tensor([values], dtype=torch.float32)


def test_learnability_is_higher_for_the_sample_whose_soft_label_the_head_already_predicts():
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.9, 0.1]])
    soft = torch.tensor([[0.9, 0.1], [0.1, 0.9], [0.9, 0.1]])
    novelty = torch.tensor([0.4, 0.4, 0.0])
    scores = learnability(soft, probs, torch.arange(3), novelty)
    # agreeing: exp(-KL) = 1, times its novelty; disagreeing: KL = 0.8 ln 9, so exp(-KL) = 9^-0.8
    assert scores[:2].tolist() == pytest.approx([0.4, 0.4 * 9**-0.8])
    assert scores[2] == 0.0  # a copy of a sample in the bank earns nothing, however learnable


def test_targeted_rewards_the_soft_label_that_corrects_the_heads_error_nearby():
    # labelled row 0 at e1 is class 0, which the head gets wrong (p = 0.2 / 0.8); row 1 at e2 is class 1, right
    labelled = torch.eye(2)
    targets = torch.tensor([0, 1])
    labelled_probs = torch.tensor([[0.2, 0.8], [0.1, 0.9]])
    z = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    soft = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    scores = targeted(z, soft, torch.arange(3), 3, labelled, targets, labelled_probs, tau=0.01)
    # tau 0.01: each sample weighs only its own labelled row; <q, onehot(t) - p>
    assert scores.tolist() == pytest.approx([0.8, -0.8, 0.1], abs=1e-6)
    assert scores[0] > scores[2] > scores[1]


def test_usefulness_is_the_gain_in_the_labelled_rows_gold_probability_from_adding_the_sample():
    labelled, targets, tau = e(1.0, 0.0), torch.tensor([0]), 0.5
    z = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    soft = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    empty = (torch.zeros(0, 2), torch.zeros(0, 2))
    scores = usefulness(z, soft, torch.arange(3), 3, *empty, labelled, targets, tau)
    # the empty bank retrieves the virtual uniform row (weight exp(0) = 1): p = 1/2; a sample at cosine 1 weighs
    # exp(1 / tau) = e^2, so p' = (1/2 + e^2 q(0)) / (1 + e^2); a sample at cosine 0 weighs as much as the prior
    w = math.exp(2.0)
    expected = [(0.5 + w) / (1 + w) - 0.5, 0.5 / (1 + w) - 0.5, 1.5 / 2 - 0.5]
    assert scores.tolist() == pytest.approx(expected)
    # against a bank that already labels the labelled row right, the same right sample adds less
    bank = (e(1.0, 0.0), torch.tensor([[1.0, 0.0]]))
    against_bank = usefulness(z[:1], soft[:1], torch.arange(1), 1, *bank, labelled, targets, tau)
    assert 0 < against_bank.item() < scores[0].item()


def test_a_choice_sample_adds_its_rows_together_and_its_scores_average_over_its_rows():
    from retrikt_ray.config import TaskSpec
    from retrikt_ray.tasks import Task

    # a choice sample's rows: "alternative i is the right one", with the teacher's p(i) as its soft label
    rows = Task.from_spec(TaskSpec(name="copa")).row_soft_labels(np.array([0.25, 0.75]))
    assert rows.tolist() == [[0.75, 0.25], [0.25, 0.75]]
    assert Task.from_spec(TaskSpec(name="sst2")).row_soft_labels(np.array([0.25, 0.75])).tolist() == [[0.25, 0.75]]
    assert per_sample_mean(torch.tensor([1.0, 3.0, 5.0]), torch.tensor([0, 0, 1]), 3).tolist() == [2.0, 5.0, 0.0]
    labelled, targets = torch.eye(2), torch.tensor([1, 1])
    z, soft = torch.eye(2), torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    none = (torch.zeros(0, 2), torch.zeros(0, 2))
    together = usefulness(z, soft, torch.tensor([0, 0]), 1, *none, labelled, targets, 0.5)
    apart = usefulness(z, soft, torch.tensor([0, 1]), 2, *none, labelled, targets, 0.5)
    assert together.item() > apart.max().item() > 0


def test_the_student_head_learns_the_bank_and_its_state_round_trips_in_place(tmp_path):
    from retrikt_ray.stages.ppo import PPOLoop

    head = StudentHead(dim=2, classes=2, num_labels=2, size=2)
    assert head.probs(e(1.0, 0.0)).tolist() == [[0.5, 0.5]]  # uniform before the first refit
    head.refit(steps=5)  # nothing remembered: nothing to fit
    for label, vector in ((0, (1.0, 0.0)), (0, (0.9, 0.1)), (0, (0.8, 0.2)), (1, (0.0, 1.0))):
        soft = torch.tensor([[0.9, 0.1]] if label == 0 else [[0.1, 0.9]])
        head.add(label, e(*vector), soft)
    assert [len(bank) for bank in head.samples] == [2, 1]  # the oldest of label 0 dropped out
    torch.testing.assert_close(head.rows()[0], torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.0, 1.0]]))
    head.refit(steps=50)
    probs = head.probs(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert probs[0, 0] > 0.7 and probs[1, 1] > 0.7

    saved = PPOLoop(bank=MemoryBank(2, 2), student=head)
    torch.save(saved.state_dict(), tmp_path / "state.pt")
    held = StudentHead(dim=2, classes=2, num_labels=2, size=2)
    resumed = PPOLoop(bank=MemoryBank(2, 2), student=held)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=False))
    assert resumed.student is held
    assert torch.equal(held.linear.weight, head.linear.weight) and torch.equal(held.linear.bias, head.linear.bias)
    assert all(torch.equal(a, b) for a, b in zip(held.rows(), head.rows()))
    held.add(0, e(0.5, 0.5), torch.tensor([[0.5, 0.5]]))
    assert len(held.samples[0]) == 2  # still at most `size` samples per label

    # a checkpoint from before the student existed restores the rest and leaves the student as it is
    old = PPOLoop(bank=MemoryBank(2, 2)).state_dict()
    del old["student"]
    resumed.load_state_dict(old)
    assert resumed.student is held


def test_the_new_fields_at_their_defaults_leave_every_hash_as_it_was(tmp_path):
    base = JobSpec(name="h")
    for path in HASHED_WHEN_SET:
        section, field = path.split(".")
        assert field not in pipeline.STAGES[1].hashed_config(base)[section], path
    before = {stage.name: stage.stage_hash for stage in pipeline.plan(base, tmp_path)}
    changed = base.model_copy(deep=True)
    changed.ppo.student_reward = "targeted"
    after = {stage.name: stage.stage_hash for stage in pipeline.plan(changed, tmp_path)}
    assert [name for name in before if before[name] != after[name]] == [
        "ppo",
        "generate",
        "store",
        "student",
        "evaluate",
    ]
    assert base.spec_hash() != changed.spec_hash()


# ------------------------------------------------------------------------------------ on the tiny models
TEXTS = {
    0: ["a dull and tired film", "bad", "the plot is slow and the jokes are stale", "a dull and tired film", "!!"],
    1: ["a warm and funny film", "great acting and a fine script", "?", "a joy from start to end"],
}


@pytest.fixture(scope="module")
def parts(tiny_models, tmp_path_factory):
    """What a reward model is made of, loaded once: the spec, task, labelled examples, teacher, student encoder
    and calibration reference."""
    from retrikt_ray.retrieval_student import RetrievalStudent
    from retrikt_ray.tasks import load_few_shot
    from retrikt_ray.teacher import Teacher, calibration_reference

    spec = tiny_spec(tiny_models, tmp_path_factory.mktemp("runs"))
    spec.ppo.memory_bank_size = 4
    task, few_shot = load_few_shot(spec)
    teacher = Teacher.from_spec(spec, task, device="cpu")
    encoder = RetrievalStudent.from_spec(spec.student, task.student_num_labels, dtype="float32")
    reference = calibration_reference(spec, teacher.classify_raw(few_shot), teacher)
    return spec, task, few_shot, teacher, encoder, reference


def reward_model(parts, definition: str):
    """A fresh reward model (empty banks, untrained student head) with `ppo.student_reward` = `definition`."""
    from retrikt_ray.stages.ppo import RewardModel

    spec, task, few_shot, teacher, encoder, reference = parts
    spec = spec.model_copy(deep=True)
    spec.ppo.student_reward = definition
    return RewardModel(spec, teacher, task, encoder, reference, few_shot)


def updates(rewards, first: int, last: int) -> list[dict]:
    """PPO's reward side of updates first..last-1: score each label's texts, then refit the student."""
    scores = []
    for update in range(first, last):
        for label, texts in TEXTS.items():
            scores.append(rewards.score(label, [*texts, f"update {update} of label {label}"]))
        rewards.refresh_student()
    return scores


def test_student_reward_off_gives_the_reward_of_the_other_terms_alone(parts):
    off, on = reward_model(parts, "off"), reward_model(parts, "learnability")
    assert off.student is None and off.refresh_student() == {}
    for without, with_student in zip(updates(off, 0, 2), updates(on, 0, 2)):
        assert not without["student"].any()
        # the reward as it was: alpha * c + beta * d - gamma * malformed, bit for bit
        np.testing.assert_array_equal(
            without["reward"], without["consistency"] + without["diversity"] + without["penalty"]
        )
        for key in ("consistency", "diversity", "penalty", "valid", "agrees", "embeddings"):
            np.testing.assert_array_equal(without[key], with_student[key])
        np.testing.assert_array_equal(with_student["reward"], without["reward"] + with_student["student"])
        assert with_student["student"][~with_student["valid"]].tolist() == [0.0] * (~with_student["valid"]).sum()
    assert with_student["student"].any()


@pytest.mark.parametrize("definition", ["learnability", "usefulness", "targeted"])
def test_a_ppo_interrupted_between_updates_resumes_its_student_and_rewards_exactly(parts, tmp_path, definition):
    from retrikt_ray.stages.ppo import PPOLoop

    uninterrupted = reward_model(parts, definition)
    expected = updates(uninterrupted, 0, 3)

    first = reward_model(parts, definition)
    updates(first, 0, 2)
    torch.save(PPOLoop(bank=first.bank, student=first.student).state_dict(), tmp_path / "loop.pt")
    second = reward_model(parts, definition)
    PPOLoop(bank=second.bank, student=second.student).load_state_dict(
        torch.load(tmp_path / "loop.pt", weights_only=False)
    )
    resumed = updates(second, 2, 3)
    for want, got in zip(expected[-len(TEXTS) :], resumed):
        np.testing.assert_array_equal(want["student"], got["student"])
        np.testing.assert_array_equal(want["reward"], got["reward"])
    assert torch.equal(second.student.linear.weight, uninterrupted.student.linear.weight)
    assert all(torch.equal(a, b) for a, b in zip(second.student.rows(), uninterrupted.student.rows()))


def test_the_benchmark_reports_each_definitions_gains_over_no_ppo_and_ppo():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "ppo_student.py"
    spec = importlib.util.spec_from_file_location("ppo_student", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules["ppo_student"] = bench
    spec.loader.exec_module(bench)

    assert bench.parse_weights(["2", "targeted=5"], ["learnability", "targeted"]) == {
        "learnability": 2.0,
        "targeted": 5.0,
    }
    with pytest.raises(SystemExit, match="not a definition"):
        bench.parse_weights(["other=1"], ["targeted"])

    def row(accuracy: float, labels: float) -> dict:
        keys = ("student_store", "head_alone", "retrieval_alone", "pool_label_consistency", "pool_distinct_2")
        return dict.fromkeys(keys, accuracy) | {"pool_label_consistency": labels}

    seeds = {
        0: {"no_ppo": row(0.80, 0.6), "ppo": row(0.81, 0.7), "student_targeted": row(0.83, 0.7)},
        1: {"no_ppo": row(0.80, 0.6), "ppo": row(0.79, 0.7), "student_targeted": row(0.79, 0.5)},
    }
    summary = bench.summarise(seeds, ["targeted"])
    gains = summary["gains"]["targeted"]
    assert gains["mean_gain_over_no_ppo"] == pytest.approx(0.01)
    assert gains["mean_gain_over_ppo"] == pytest.approx(0.01)
    assert gains["min_seed_gain_over_no_ppo"] == pytest.approx(-0.01)
    assert summary["means"]["student_targeted"]["pool_label_consistency"] == pytest.approx(0.6)
    assert bench.targets(gains) == {
        "mean_at_least_1.5_points_above_no_ppo": False,
        "mean_above_ppo": True,
        "no_seed_below_no_ppo": False,
        "pool_label_consistency_not_below_no_ppo": True,
    }
