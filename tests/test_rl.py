"""Hand-computed cases for the PPO maths of stage 2 (retrikt_ray.rl)."""

import math

import pytest
import torch

from retrikt_ray.rl import (
    MemoryBank,
    approx_kl,
    distinct_n,
    diversity_reward,
    gae,
    masked_mean,
    max_cosine_to_others,
    policy_loss,
    token_rewards,
    value_loss,
    whiten,
)


def close(actual, expected):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=1e-6, rtol=1e-6)


def test_masked_mean_ignores_padding_and_empty_mask_is_zero():
    x = torch.tensor([[1.0, 2.0, 100.0]])
    close(masked_mean(x, torch.tensor([[1, 1, 0]])), 1.5)
    close(masked_mean(x, torch.tensor([[True, True, False]])), 1.5)
    close(masked_mean(x, torch.zeros(1, 3)), 0.0)


def test_token_rewards_kl_at_every_token_and_sequence_reward_at_last_valid_token():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -1.0, 9.0]])
    ref_logprobs = torch.tensor([[-1.5, -1.0, -3.0], [-1.0, -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    rewards = token_rewards(torch.tensor([2.0, -1.0]), logprobs, ref_logprobs, mask, kl_coef=0.1)
    # row 0: log-ratio 0.5, -1, 0 -> -0.05, 0.1, 0; sequence reward 2 on t=2 -> 2.0
    # row 1: log-ratio 0.5, 0, (padding) -> -0.05, 0, 0; sequence reward -1 on t=1 (its last valid token)
    close(rewards, [[-0.05, 0.1, 2.0], [-0.05, -1.0, 0.0]])


def test_token_rewards_row_without_tokens_gets_nothing():
    zeros = torch.zeros(1, 2)
    close(token_rewards(torch.tensor([5.0]), zeros, zeros, zeros, kl_coef=0.1), [[0.0, 0.0]])


def test_gae_three_tokens_lambda_095():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7]])
    advantages, returns = gae(rewards, values, torch.ones(1, 3), discount=1.0, lam=0.95)
    # deltas: t2 = 1 + 0 - 0.7 = 0.3; t1 = 0 + 0.7 - 0.6 = 0.1; t0 = 0 + 0.6 - 0.5 = 0.1
    # A2 = 0.3; A1 = 0.1 + 0.95 * 0.3 = 0.385; A0 = 0.1 + 0.95 * 0.385 = 0.46575
    close(advantages, [[0.46575, 0.385, 0.3]])
    close(returns, [[0.96575, 0.985, 1.0]])


def test_gae_lambda_1_is_returns_to_go_minus_values():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7]])
    advantages, returns = gae(rewards, values, torch.ones(1, 3), discount=1.0, lam=1.0)
    # returns-to-go are 1, 1, 1
    close(advantages, [[0.5, 0.4, 0.3]])
    close(returns, [[1.0, 1.0, 1.0]])


def test_gae_two_rows_of_different_lengths():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 5.0]])
    values = torch.tensor([[1.0, 1.0, 1.0], [0.5, 0.5, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    advantages, returns = gae(rewards, values, mask, discount=1.0, lam=1.0)
    # row 0: returns-to-go 6, 5, 3; minus values 1 -> 5, 4, 2
    # row 1: the padded reward 5 and value 7 must not leak in; returns-to-go 3, 2 -> 2.5, 1.5
    close(advantages, [[5.0, 4.0, 2.0], [2.5, 1.5, 0.0]])
    close(returns, [[6.0, 5.0, 3.0], [3.0, 2.0, 0.0]])

    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 5.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [1.0, 0.5, 3.0]])
    advantages, returns = gae(rewards, values, mask, discount=1.0, lam=0.95)
    # row 1: delta1 = 2 + 0 - 0.5 = 1.5; delta0 = 0 + 0.5 - 1 = -0.5; A0 = -0.5 + 0.95 * 1.5 = 0.925
    close(advantages, [[0.46575, 0.385, 0.3], [0.925, 1.5, 0.0]])
    close(returns, [[0.96575, 0.985, 1.0], [1.925, 2.0, 0.0]])


def test_gae_discount_below_one():
    advantages, _ = gae(torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, 0.5]]), torch.ones(1, 2), 0.9, 1.0)
    # lambda 1: discounted returns-to-go 1 + 0.9 * 2 = 2.8 and 2, minus 0.5
    close(advantages, [[2.3, 1.5]])


def test_whiten_uses_masked_statistics_and_zeroes_padding():
    x = torch.tensor([[1.0, 2.0], [3.0, 100.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    # mean 2, population variance (1 + 0 + 1) / 3 = 2/3, 1 / sqrt(2/3) = sqrt(1.5)
    s = math.sqrt(1.5)
    close(whiten(x, mask), [[-s, 0.0], [s, 0.0]])


def test_policy_loss_clipping_for_both_signs_of_the_advantage():
    ratios = torch.tensor([[1.1, 1.5, 0.5, 0.9, 0.5, 1.5, 3.0]])
    advantages = torch.tensor([[1.0, 1.0, -1.0, -1.0, 1.0, -1.0, 50.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0]])
    logprobs = ratios.log().requires_grad_()
    loss, clip_fraction = policy_loss(logprobs, torch.zeros(1, 7), advantages, mask, clip_eps=0.2)
    # per token: max(-A * r, -A * clip(r, 0.8, 1.2))
    #   A=+1 r=1.1 inside:           max(-1.1, -1.1) = -1.1
    #   A=+1 r=1.5 above the range:  max(-1.5, -1.2) = -1.2  clipped
    #   A=-1 r=0.5 below the range:  max( 0.5,  0.8) =  0.8  clipped
    #   A=-1 r=0.9 inside:           max( 0.9,  0.9) =  0.9
    #   A=+1 r=0.5 below the range:  max(-0.5, -0.8) = -0.5  (pessimistic side is unclipped)
    #   A=-1 r=1.5 above the range:  max( 1.5,  1.2) =  1.5  (pessimistic side is unclipped)
    #   padding ignored
    # mean = (-1.1 - 1.2 + 0.8 + 0.9 - 0.5 + 1.5) / 6 = 0.4 / 6
    close(loss, 0.4 / 6)
    close(clip_fraction, 2 / 6)
    loss.backward()
    # d(-A * r)/d logprob = -A * r where unclipped, 0 where the clip is active
    close(logprobs.grad, [[-1.1 / 6, 0.0, 0.0, 0.9 / 6, -0.5 / 6, 1.5 / 6, 0.0]])


def test_value_loss_clipped_and_unclipped():
    values = torch.tensor([[1.0, 1.5, 1.5, 9.0]])
    old_values = torch.tensor([[0.9, 1.0, 1.0, 0.0]])
    returns = torch.tensor([[2.0, 2.0, 1.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # v - old inside the clip: (1 - 2)^2 = 1 either way
    # v moved 0.5 towards R=2, clipped v = 1.2: max((1.5 - 2)^2, (1.2 - 2)^2) = max(0.25, 0.64) = 0.64
    # v moved 0.5 past R=1, clipped v = 1.2: max((1.5 - 1)^2, (1.2 - 1)^2) = max(0.25, 0.04) = 0.25
    # 0.5 * (1 + 0.64 + 0.25) / 3 = 0.315
    close(value_loss(values, old_values, returns, mask, clip=0.2), 0.315)
    # without clipping (large clip): 0.5 * (1 + 0.25 + 0.25) / 3 = 0.25
    close(value_loss(values, old_values, returns, mask, clip=10.0), 0.25)


def test_approx_kl():
    logprobs = torch.tensor([[-1.0, -2.0], [-3.0, 0.0]])
    ref_logprobs = torch.tensor([[-1.5, -1.0], [-4.0, 5.0]])
    # differences 0.5, -1, 1 (padding ignored) -> 0.5 / 3
    close(approx_kl(logprobs, ref_logprobs, torch.tensor([[1, 1], [1, 0]])), 0.5 / 3)


def test_distinct_n():
    assert distinct_n(["a b a b"]) == pytest.approx(2 / 3)  # ab, ba, ab
    assert distinct_n(["the cat sat", "the cat ran"]) == pytest.approx(3 / 4)  # the-cat twice
    assert distinct_n(["a", "b"]) == 0.0  # no bigram, and none across texts
    assert distinct_n([]) == 0.0
    assert distinct_n(["a a b"], n=1) == pytest.approx(2 / 3)


def test_memory_bank_max_cosine():
    bank = MemoryBank(num_labels=2, size=4)
    close(bank.max_cosine(0, torch.tensor([[1.0, 0.0]])), [0.0])  # empty bank
    bank.add(0, torch.tensor([[3.0, 4.0]]))
    # cos([3, 4], .) : same direction 1, orthogonal 0, [1, 0] -> 3/5
    close(bank.max_cosine(0, torch.tensor([[6.0, 8.0], [-4.0, 3.0], [1.0, 0.0]])), [1.0, 0.0, 0.6])
    close(bank.max_cosine(1, torch.tensor([[3.0, 4.0]])), [0.0])  # other label's bank is still empty
    bank.add(0, torch.tensor([[1.0, 0.0]]))
    close(bank.max_cosine(0, torch.tensor([[1.0, 0.0]])), [1.0])  # max over the bank


def test_memory_bank_keeps_only_the_most_recent_size_vectors():
    bank = MemoryBank(num_labels=1, size=2)
    bank.add(0, torch.eye(3))  # e1, e2, e3 in order: e1 drops out
    assert len(bank.banks[0]) == 2
    close(bank.max_cosine(0, torch.eye(3)), [0.0, 1.0, 1.0])


def test_diversity_reward_scores_against_the_bank_before_the_batch():
    bank = MemoryBank(num_labels=2, size=8)
    embeddings = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    rewards = diversity_reward(bank, [0, 0, 1], embeddings, accepted=[True, True, False])
    # empty banks: a sample is compared neither with itself nor with its identical batch mate
    close(rewards, [1.0, 1.0, 1.0])
    assert len(bank.banks[0]) == 2 and len(bank.banks[1]) == 0  # only accepted samples added

    rewards = diversity_reward(bank, [0, 1], torch.tensor([[1.0, 1.0], [0.0, 1.0]]), accepted=[True, True])
    # label 0: cos([1, 1], [1, 0]) = 1/sqrt(2) -> 1 - 0.70711; label 1 bank was empty -> 1
    close(rewards, [1.0 - 1.0 / math.sqrt(2.0), 1.0])
    assert len(bank.banks[0]) == 3 and len(bank.banks[1]) == 1


def test_max_cosine_to_others_excludes_each_row_itself():
    rows = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
    assert torch.allclose(max_cosine_to_others(rows), torch.tensor([1.0, 1.0, 0.0]))
    assert max_cosine_to_others(rows[:1]).tolist() == [0.0]


def test_a_loop_state_checkpoints_its_fields_and_restores_the_memory_bank_in_place(tmp_path):
    """What a training loop's LoopState saves goes through torch.save as a checkpoint does; resuming restores every
    field, the memory bank in place (the reward model holding it sees the restored vectors) and at its size."""
    import random
    from dataclasses import dataclass, field

    from retrikt_ray.training import LoopState

    @dataclass
    class Loop(LoopState):
        bank: MemoryBank
        order: random.Random
        history: list[dict] = field(default_factory=list)
        seen: set[str] = field(default_factory=set)

    saved = Loop(bank=MemoryBank(num_labels=2, size=2), order=random.Random(3))
    saved.bank.add(1, torch.tensor([[3.0, 4.0], [0.0, 2.0], [1.0, 0.0]]))
    saved.order.random()
    saved.history.append({"update": 0, "reward": 0.5})
    saved.seen.update({"a text", "another"})
    torch.save(saved.state_dict(), tmp_path / "state.pt")

    held = MemoryBank(num_labels=2, size=2)  # what the reward model holds
    resumed = Loop(bank=held, order=random.Random(0))
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=False))
    assert resumed.bank is held and [len(bank) for bank in held.banks] == [0, 2]
    assert torch.equal(torch.stack(list(held.banks[1])), torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    held.add(1, torch.tensor([[0.0, 5.0]]))
    assert len(held.banks[1]) == 2  # still at most `size` vectors
    assert resumed.order.random() == saved.order.random()
    assert resumed.history == saved.history and resumed.seen == saved.seen
