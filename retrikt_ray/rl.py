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


# ------------------------------------------------------------------------- the student-friendly reward term
# L2 penalty on the PPO student head's weights when it is refitted: keeps its probabilities from growing
# overconfident on the few hundred rows of the bank.
HEAD_L2 = 1e-3
# Probabilities are floored here before a logarithm, as the student's KD loss floors them.
STUDENT_PROB_FLOOR = 1e-8


class StudentHead:
    """The small student PPO keeps up to date (`ppo.student_reward`): a linear softmax head on frozen student
    embeddings, refitted after every update on the student rows of the last `size` accepted samples per label
    (the memory bank's samples), each with the teacher's soft label. Its state (the rows and the head) is part of
    the PPO loop's checkpointed state."""

    def __init__(self, dim: int, classes: int, num_labels: int, size: int):
        self.linear = torch.nn.Linear(dim, classes)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)
        # One entry per accepted sample: (its rows' embeddings (r, dim), their soft labels (r, classes)).
        self.samples: list[deque[tuple[torch.Tensor, torch.Tensor]]] = [deque(maxlen=size) for _ in range(num_labels)]

    def probs(self, embeddings: torch.Tensor) -> torch.Tensor:
        """`(n, classes)` softmax of the head on `embeddings` `(n, dim)`; uniform before the first refit."""
        with torch.no_grad():
            return torch.softmax(self.linear(embeddings.float()), dim=-1)

    def add(self, label: int, embeddings: torch.Tensor, soft_labels: torch.Tensor) -> None:
        """Remember one accepted sample of `label`: its rows' embeddings and soft labels (the oldest of a full
        label drops out)."""
        self.samples[label].append((embeddings.detach().float().clone(), soft_labels.detach().float().clone()))

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every remembered row, labels in order: embeddings `(R, dim)` and soft labels `(R, classes)`."""
        entries = [entry for bank in self.samples for entry in bank]
        if not entries:
            dim, classes = self.linear.in_features, self.linear.out_features
            return torch.zeros(0, dim), torch.zeros(0, classes)
        return torch.cat([z for z, _ in entries]), torch.cat([q for _, q in entries])

    def refit(self, steps: int, l2: float = HEAD_L2) -> None:
        """`steps` L-BFGS iterations from the current head on `mean_r CE(q_r, softmax(W z_r + b)) + l2 / 2 * |W|^2`
        over the remembered rows (the KD loss up to a constant); nothing while no row is remembered."""
        z, q = self.rows()
        if z.shape[0] == 0:
            return
        parameters = list(self.linear.parameters())
        optimiser = torch.optim.LBFGS(parameters, max_iter=steps, history_size=10, line_search_fn="strong_wolfe")

        def closure():
            optimiser.zero_grad()
            log_p = torch.log_softmax(self.linear(z), dim=-1)
            loss = -(q * log_p).sum(dim=-1).mean() + 0.5 * l2 * self.linear.weight.pow(2).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            optimiser.step(closure)
        for parameter in parameters:
            parameter.grad = None

    def state_dict(self) -> dict:
        return {
            "head": {name: tensor.detach().clone() for name, tensor in self.linear.state_dict().items()},
            "samples": [list(bank) for bank in self.samples],
        }

    def load_state_dict(self, state: dict) -> None:
        """The saved head and rows, in place: each label keeps its size."""
        self.linear.load_state_dict(state["head"])
        for bank, saved in zip(self.samples, state["samples"], strict=True):
            bank.clear()
            bank.extend(saved)


def per_sample_mean(values: torch.Tensor, owner: torch.Tensor, count: int) -> torch.Tensor:
    """`(count,)` mean of the row values `(R,)` of each sample, `owner[r]` being row r's sample; 0 without rows."""
    sums = torch.zeros(count, dtype=values.dtype).index_add_(0, owner, values)
    rows = torch.zeros(count, dtype=values.dtype).index_add_(0, owner, torch.ones_like(values))
    return sums / rows.clamp(min=1.0)


def agreement(soft_labels: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """`(R,)` `exp(-KL(q || p))` per row: 1 when the head's `p` is the teacher's soft label `q`, towards 0 as
    they part (`p` floored at 1e-8, `0 log 0 = 0`)."""
    q, p = soft_labels.double(), probs.double()
    kl = (torch.xlogy(q, q) - q * torch.log(p.clamp_min(STUDENT_PROB_FLOOR))).sum(dim=-1)
    return torch.exp(-kl)


def learnability(
    soft_labels: torch.Tensor, probs: torch.Tensor, owner: torch.Tensor, novelty: torch.Tensor
) -> torch.Tensor:
    """`(n,)` learnability of each sample: `novelty_i * mean_{r of i} exp(-KL(q_r || p_head(z_r)))`.

    The head already predicting the teacher's soft label on a sample it has not seen means the teacher's label
    there is one the student can learn (PromptKD's student-friendly knowledge); `novelty` (1 - max cos to the
    label's memory bank) keeps PPO from earning it with copies of samples the student has learnt already.
    """
    return per_sample_mean(agreement(soft_labels, probs), owner, len(novelty)) * novelty.double()


def targeted(
    embeddings: torch.Tensor,
    soft_labels: torch.Tensor,
    owner: torch.Tensor,
    count: int,
    labelled: torch.Tensor,
    targets: torch.Tensor,
    labelled_probs: torch.Tensor,
    tau: float,
) -> torch.Tensor:
    """`(count,)` how far each sample's soft label goes where the current head errs on the labelled examples:
    `mean_{r of i} sum_g k_rg <q_r, onehot(t_g) - p_head(z_g)>`, `k_rg = softmax_g(cos(z_r, z_g) / tau)`.

    `onehot(t_g) - p_head(z_g)` is the head's error on labelled row g: positive for the gold class it
    under-predicts, negative for the classes it over-predicts. A sample whose soft label points the way those
    errors point, near them, scores up to 1; one that would deepen an error scores down to -1 (S3's samples
    from the student's errors, with the sign of the teacher's label).
    """
    similarity = F.normalize(embeddings.double(), dim=-1) @ F.normalize(labelled.double(), dim=-1).T
    weights = torch.softmax(similarity / tau, dim=-1)  # (R, G)
    residual = F.one_hot(targets.long(), labelled_probs.shape[1]).double() - labelled_probs.double()
    per_row = ((weights @ residual) * soft_labels.double()).sum(dim=-1)
    return per_sample_mean(per_row, owner, count)


def usefulness(
    embeddings: torch.Tensor,
    soft_labels: torch.Tensor,
    owner: torch.Tensor,
    count: int,
    bank: torch.Tensor,
    bank_soft_labels: torch.Tensor,
    labelled: torch.Tensor,
    targets: torch.Tensor,
    tau: float,
) -> torch.Tensor:
    """`(count,)` how much adding each sample's rows to a kNN store of the bank raises the probability retrieval
    gives the labelled rows' gold targets: `sum_g [p'_ret(t_g | z_g) - p_ret(t_g | z_g)]`, the gain in the
    expected number of labelled rows that retrieval labels right (the smooth form of its accuracy).

    `p_ret(. | z_g) = sum_j w_gj q_j` over the bank's rows plus one virtual row at cosine 0 with the uniform
    label (so an empty bank retrieves the uniform distribution), `w_gj = softmax_j(cos(z_g, z_j) / tau)`;
    `p'_ret` is the same with the sample's rows added. Each sample is scored alone against the same bank.
    """
    classes = soft_labels.shape[1]
    unit = F.normalize(labelled.double(), dim=-1)
    to_bank = unit @ F.normalize(bank.double(), dim=-1).T / tau if bank.shape[0] else unit.new_zeros(len(unit), 0)
    to_rows = unit @ F.normalize(embeddings.double(), dim=-1).T / tau  # (G, R)
    shift = torch.cat([to_bank, to_rows, unit.new_zeros(len(unit), 1)], dim=1).max(dim=1, keepdim=True).values
    prior = torch.exp(-shift).squeeze(1)  # the virtual row's weight, exp(0 / tau - shift)
    bank_weights, row_weights = torch.exp(to_bank - shift), torch.exp(to_rows - shift)
    gold_of_bank = bank_soft_labels.double().T[targets.long()]  # (G, R_bank): q_j(t_g)
    gold_of_rows = soft_labels.double().T[targets.long()]  # (G, R)
    norm = prior + bank_weights.sum(dim=1)
    gold = prior / classes + (bank_weights * gold_of_bank).sum(dim=1)
    added_norm = torch.zeros(len(unit), count, dtype=torch.float64).index_add_(1, owner, row_weights)
    added_gold = torch.zeros(len(unit), count, dtype=torch.float64).index_add_(1, owner, row_weights * gold_of_rows)
    gain = (gold[:, None] + added_gold) / (norm[:, None] + added_norm) - (gold / norm)[:, None]
    return gain.sum(dim=0)
