"""PPO maths for stage 2 (PPO on the soft prompt), as pure torch functions.

Shapes: `B` rows (sampled texts) by `T` generated-token positions. `mask` is 1 at generated tokens and 0
at padding; rows are right-padded, so a row's valid tokens are positions `0 .. L-1`. Every function
accepts a bool or float mask.

The model side (rollouts, log-probabilities, the value head) lives elsewhere; this module only turns
those tensors into rewards, advantages and losses, plus the diversity bookkeeping of the reward.
"""

from __future__ import annotations

from collections import deque

import torch
import torch.nn.functional as F


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`sum(x * m) / sum(m)` over all elements; 0 when the mask is empty."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def token_rewards(
    sequence_rewards: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
) -> torch.Tensor:
    """Per-token rewards `(B, T)`.

    `r_t = -kl_coef * (log pi_P(x_t) - log pi_ref(x_t))` at every valid token, plus the sequence reward
    `R` added at the last valid token of the row:  `r_{L-1} += R`. Padding gets 0. A row with no valid
    token gets nothing.
    """
    mask = mask.to(logprobs.dtype)
    rewards = -kl_coef * (logprobs - ref_logprobs) * mask
    lengths = mask.sum(dim=1).long()
    last = (lengths - 1).clamp(min=0)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += sequence_rewards.to(rewards.dtype) * (lengths > 0).to(rewards.dtype)
    return rewards


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, discount: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each row's valid tokens.

    `delta_t = r_t + discount * V_{t+1} - V_t`, with `V_L = 0` after the last valid token;
    `A_t = delta_t + discount * lam * A_{t+1}`, with `A_L = 0`;
    `returns_t = A_t + V_t`. Padding positions get 0 in both outputs.
    With `lam = 1` and `discount = 1`, `A_t` is the reward-to-go `sum_{s >= t} r_s` minus `V_t`.
    """
    mask = mask.to(values.dtype)
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + discount * next_value - values[:, t]
        advantage = (delta + discount * lam * next_advantage) * mask[:, t]
        advantages[:, t] = advantage
        next_value = values[:, t] * mask[:, t]
        next_advantage = advantage
    returns = (advantages + values) * mask
    return advantages, returns


def whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`(x - mean) / (std + 1e-8)` with the masked mean and masked (population) std; 0 on padding."""
    mask = mask.to(x.dtype)
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) / (var.sqrt() + 1e-8) * mask


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped surrogate loss and the fraction of tokens where the clip is active.

    `r = exp(logprobs - old_logprobs)`;
    `loss = masked mean of max(-A * r, -A * clip(r, 1 - eps, 1 + eps))`;
    `clip_fraction = masked mean of [-A * clip(r) > -A * r]`, i.e. the tokens whose gradient the clip
    cuts off.
    """
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped > unclipped).to(logprobs.dtype), mask)
    return loss, clip_fraction


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float
) -> torch.Tensor:
    """Clipped value loss.

    `v_clip = old_v + clip(v - old_v, -clip, clip)`;
    `loss = 0.5 * masked mean of max((v - R)^2, (v_clip - R)^2)`.
    """
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    losses = torch.maximum((values - returns) ** 2, (clipped_values - returns) ** 2)
    return 0.5 * masked_mean(losses, mask)


def approx_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token sample estimate of `KL(pi_P || pi_ref)`: masked mean of `logprobs - ref_logprobs`."""
    return masked_mean(logprobs - ref_logprobs, mask)


def distinct_n(texts: list[str], n: int = 2) -> float:
    """Distinct n-grams / total n-grams over whitespace tokens of all texts (n-grams do not cross texts).

    0 when the texts hold no n-gram.
    """
    ngrams = []
    for text in texts:
        tokens = text.split()
        ngrams.extend(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    if not ngrams:
        return 0.0
    return len(set(ngrams)) / len(ngrams)


def max_cosine_to_others(embeddings: torch.Tensor) -> torch.Tensor:
    """`(n,)` max cosine of each row of `embeddings` `(n, d)` to the other rows; 0 for a single row."""
    if embeddings.shape[0] < 2:
        return torch.zeros(embeddings.shape[0], dtype=embeddings.dtype, device=embeddings.device)
    unit = F.normalize(embeddings, dim=-1)
    cosines = unit @ unit.T
    cosines.fill_diagonal_(-float("inf"))
    return cosines.max(dim=1).values


class MemoryBank:
    """Recent accepted samples' embeddings per label: a deque of at most `size` L2-normalised vectors
    per label; the oldest vector drops out when a new one arrives at a full bank."""

    def __init__(self, num_labels: int, size: int):
        self.banks: list[deque[torch.Tensor]] = [deque(maxlen=size) for _ in range(num_labels)]

    def max_cosine(self, label: int, embeddings: torch.Tensor) -> torch.Tensor:
        """`(n,)` max cosine of each row of `embeddings` `(n, d)` to the bank of `label`; 0 when empty."""
        bank = self.banks[label]
        if not bank:
            return torch.zeros(embeddings.shape[0], dtype=embeddings.dtype, device=embeddings.device)
        keys = torch.stack(list(bank)).to(device=embeddings.device, dtype=embeddings.dtype)
        return (F.normalize(embeddings, dim=-1) @ keys.T).max(dim=1).values

    def add(self, label: int, embeddings: torch.Tensor) -> None:
        """Append each row of `embeddings` `(n, d)`, L2-normalised, to the bank of `label`, in order."""
        for vector in F.normalize(embeddings.detach(), dim=-1):
            self.banks[label].append(vector)

    def state_dict(self) -> dict[str, list[list[torch.Tensor]]]:
        return {"banks": [list(bank) for bank in self.banks]}

    def load_state_dict(self, state: dict[str, list[list[torch.Tensor]]]) -> None:
        """The saved vectors, in place: each bank keeps its size."""
        for bank, saved in zip(self.banks, state["banks"], strict=True):
            bank.clear()
            bank.extend(saved)


def diversity_reward(
    bank: MemoryBank, labels: list[int], embeddings: torch.Tensor, accepted: list[bool]
) -> torch.Tensor:
    """`(n,)` diversity term `1 - max_{x' in B_y} cos(e(x), e(x'))` per sample.

    Every sample is scored against the bank as it was before this batch, so no sample is compared with
    itself or with its batch mates. Afterwards the samples with `accepted[i]` true are added to the bank
    of their label, in batch order.
    """
    rewards = torch.empty(len(labels), dtype=embeddings.dtype, device=embeddings.device)
    for label in set(labels):
        rows = [i for i, y in enumerate(labels) if y == label]
        rewards[rows] = 1.0 - bank.max_cosine(label, embeddings[rows])
    for i, (label, keep) in enumerate(zip(labels, accepted)):
        if keep:
            bank.add(label, embeddings[i : i + 1])
    return rewards
