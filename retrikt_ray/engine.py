"""The teacher engine: every forward pass of the frozen teacher runs here.

`Teacher` (teacher.py) speaks the task: prompts, verbalisers, calibration. It hands this module
embeddings and token ids; how they are computed is decided here and nowhere else.

`Engine` is the interface, three calls that a vLLM-backed engine could implement as well (vLLM's
`prompt_embeds` input carries a soft prompt; see docs/teacher_engine.md):
- `generate`: sampled (or greedy) continuations of one prompt given as embeddings, one seed per row;
- `score`: log-probs and last hidden states of given continuations of such a prompt (PPO; differentiable);
- `read`: the last position (or chosen positions) of many token sequences: logits, a layer's state, the
  token log-probs of a span, a mean-pooled state (classification, annotation, choice scoring).

`TorchEngine` is the one implementation, on PyTorch, CPU or CUDA:
- The shared prefix once. A generation prompt (soft prompt + the label's prompt) is prefilled once; its
  key/value cache is copied into every row's slot. `read` finds the token prefix that all its sequences
  share (the chat template, the task's instructions) and prefills it once too.
- A decode loop with little per-step overhead: a static key/value cache of fixed slots, a lean forward
  of Llama-family decoders (`LeanRunner`: fused projections, one SDPA call per layer), continuous
  batching (a finished row's slot is refilled at once with the next row, so the batch stays full), and
  per-row seeds: a row's tokens depend on its seed and its prompt only, never on its batch.
- Precision per use (`Precision`): decode, read and score each run in the dtype that measured fastest
  on this class of hardware (`resolve_precision`); the figures are in benchmarks/results/teacher_speed.md.
- Sequences are read in batches sorted by length, so little padding is computed.
Other architectures run through the Hugging Face forward (`HFRunner`): the same results, prefixes
shared through its own cache, batches compacted rather than refilled.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

# Rows refilled or compacted no more often than this share of the batch falls idle.
COMPACT_BELOW = 0.75
# On CPUs, attention over queries up to this long runs as batched matmuls (LeanRunner.attend).
MATMUL_ATTENTION_MAX_QUERY = 64
# Top-k takes this many more candidates, to keep those tied with the k-th as Hugging Face does.
TOP_K_TIES = 8
# Top-p draws a row again at most this often before it sorts the row's vocabulary (see draw).
REDRAWS = 8


# ------------------------------------------------------------------------------------------ precision
@dataclass(frozen=True)
class Precision:
    """The dtype of each use of the teacher: decode (generation), read (classification, annotation,
    states) and score (continuation log-probs; PPO's backward pass runs through it)."""

    decode: torch.dtype
    read: torch.dtype
    score: torch.dtype

    def names(self) -> dict[str, str]:
        return {use: str(getattr(self, use)).removeprefix("torch.") for use in ("decode", "read", "score")}


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux); empty where /proc/cpuinfo is not there."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def hardware_class(device: torch.device) -> str:
    """cuda-bf16, cuda, cpu-amx (AMX tiles), cpu-avx512-bf16 (bf16 dot products, no AMX) or cpu."""
    if device.type == "cuda":
        return "cuda-bf16" if torch.cuda.is_bf16_supported() else "cuda"
    flags = cpu_flags()
    if "amx_bf16" in flags:
        return "cpu-amx"
    if "avx512_bf16" in flags:
        return "cpu-avx512-bf16"
    return "cpu"


# `teacher.dtype: auto`, per hardware class, (decode, read, score): bf16 wherever the hardware has bf16
# matmuls (on the AVX512-BF16 CPU measured, 2x float32's rate for decoding, reading and PPO's backward
# pass, with PPO's loss curves and the zero-shot accuracy beside float32's in
# benchmarks/results/teacher_speed.md); fp16 scores on older GPUs would underflow, so they stay float32.
AUTO_PRECISION = {
    "cuda-bf16": ("bfloat16", "bfloat16", "bfloat16"),
    "cuda": ("float16", "float16", "float32"),
    "cpu-amx": ("bfloat16", "bfloat16", "bfloat16"),
    "cpu-avx512-bf16": ("bfloat16", "bfloat16", "bfloat16"),
    "cpu": ("float32", "float32", "float32"),
}


def resolve_precision(requested: str, device: torch.device | str) -> Precision:
    """`teacher.dtype` -> a dtype per use: a named dtype is used everywhere; `auto` looks up the hardware."""
    device = torch.device(device)
    if requested != "auto":
        dtype = getattr(torch, requested)
        return Precision(dtype, dtype, dtype)
    return Precision(*(getattr(torch, name) for name in AUTO_PRECISION[hardware_class(device)]))


def load_dtype(requested: str, device: torch.device | str, training: str | None = None) -> torch.dtype:
    """The dtype to load the teacher's weights in: the requested one, or for `auto` the widest dtype any
    use needs (float32 on CPUs, which keep bf16 copies of the weights for the uses that run in bf16).
    `training`: the DeepSpeed precision of a stage that trains through the frozen weights (prompt tuning):
    with `auto` they are loaded in the dtype that scores use on this hardware (the trained soft prompt
    stays in the stage's precision), or in the stage's half type on a GPU."""
    if requested != "auto":
        return getattr(torch, requested)
    if training is not None:
        # Trained through (prompt tuning): the frozen weights in the dtype scores use on this hardware, unless
        # the stage's own precision asks for another half type on a GPU.
        if torch.device(device).type == "cuda" and training in ("bf16", "fp16"):
            return {"bf16": torch.bfloat16, "fp16": torch.float16}[training]
        return resolve_precision(requested, device).score
    precision = resolve_precision(requested, device)
    uses = {precision.decode, precision.read, precision.score}
    if torch.device(device).type == "cuda" and len(uses) == 1:
        return uses.pop()
    return torch.float32


# ------------------------------------------------------------------------------------------ sampling
@dataclass(frozen=True)
class SamplingParams:
    """How continuations are drawn, as in Hugging Face's `generate`: temperature, then top-k (0: off),
    then top-p, then a draw; `greedy` takes the most likely token instead. A row ends after its first
    stop token."""

    max_new_tokens: int
    stop_ids: tuple[int, ...]
    top_p: float = 1.0
    temperature: float = 1.0
    greedy: bool = False
    top_k: int = 0


def row_seeds(seed: int, rows: int) -> np.ndarray:
    """One seed per row, derived from a call's seed: row i of a call with seed s is the same whatever the batching."""
    with np.errstate(over="ignore"):
        return _mix(
            np.uint64(seed & 0xFFFFFFFFFFFFFFFF) * np.uint64(0x9E3779B97F4A7C15) + np.arange(rows, dtype=np.uint64)
        )


def _mix(values: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a counter in, well-spread 64-bit values out."""
    with np.errstate(over="ignore"):
        z = np.asarray(values, dtype=np.uint64).copy()
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def uniforms(seeds: np.ndarray, steps: np.ndarray, attempt: int = 0) -> np.ndarray:
    """A uniform number in [0, 1) per (row seed, token index, attempt): counter-based, no generator state."""
    with np.errstate(over="ignore"):
        counter = (np.asarray(steps, dtype=np.uint64) + np.uint64(1)) * np.uint64(0xD1B54A32D192ED03)
        z = _mix(_mix(seeds + counter) + np.uint64(attempt) * np.uint64(0x9E3779B97F4A7C15))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


def top_p_keep(probs_desc: torch.Tensor, top_p: float) -> torch.Tensor:
    """Which of the descending-sorted probabilities top-p keeps: Hugging Face's TopPLogitsWarper drops a
    token when the ascending cumulative mass up to it is <= 1 - top_p, i.e. when the mass of the tokens
    ranked above it is >= top_p; the most likely token always stays."""
    above = probs_desc.cumsum(dim=-1) - probs_desc
    keep = above < top_p
    keep[..., 0] = True
    return keep


@dataclass
class Candidates:
    """Each row's next-token distribution: probabilities (rows, C) over the candidate tokens `tokens`
    (rows, C), or over the whole vocabulary when `tokens` is None (greedy keeps the logits there)."""

    probs: torch.Tensor
    tokens: torch.Tensor | None

    def take(self, rows: torch.Tensor) -> Candidates:
        return Candidates(self.probs[rows], None if self.tokens is None else self.tokens[rows])

    def put(self, rows: torch.Tensor, other: Candidates) -> None:
        self.probs[rows] = other.probs
        if self.tokens is not None:
            self.tokens[rows] = other.tokens

    def empty(self, rows: int) -> Candidates:
        """Room for `rows` rows shaped like these."""
        probs = self.probs.new_empty(rows, self.probs.shape[-1])
        return Candidates(probs, None if self.tokens is None else self.tokens.new_zeros(rows, self.tokens.shape[-1]))


def next_tokens(logits: torch.Tensor, params: SamplingParams, seeds: np.ndarray, steps: np.ndarray) -> torch.Tensor:
    """One token per row of `logits` (rows, vocab): see `candidates` and `draw`."""
    return draw(candidates(logits, params), params, seeds, steps)


def candidates(logits: torch.Tensor, params: SamplingParams) -> Candidates:
    """What `draw` takes. Greedy: the logits. With top-k: the k most likely tokens (and any tied with the
    k-th, as Hugging Face's TopKLogitsWarper keeps them), their temperature-scaled probabilities, the
    ones top-p drops set to 0. Without: the temperature-scaled probabilities of the whole vocabulary
    (top-p is applied when drawing)."""
    logits = logits.float()
    if params.greedy:
        return Candidates(logits, None)
    if params.temperature != 1.0:
        logits = logits / params.temperature
    vocab = logits.shape[-1]
    if not params.top_k or params.top_k >= vocab:
        return Candidates(torch.softmax(logits, dim=-1), None)
    values, tokens = logits.topk(min(vocab, params.top_k + TOP_K_TIES), dim=-1)
    values = values.masked_fill(values < values[:, params.top_k - 1 : params.top_k], float("-inf"))
    probs = torch.softmax(values, dim=-1)
    if params.top_p < 1.0:
        probs = probs * top_p_keep(probs, params.top_p)
    return Candidates(probs, tokens)


def draw(candidates: Candidates, params: SamplingParams, seeds: np.ndarray, steps: np.ndarray) -> torch.Tensor:
    """Greedy: the most likely token. Else a draw by inverse CDF with the row's own uniforms, from the
    candidates (top-k and top-p applied), or from the whole vocabulary truncated by top-p.

    Top-p over the whole vocabulary without sorting it: a draw from the whole distribution is kept when
    it lies in the nucleus (the mass of the tokens more likely than it is below top_p), else the row
    draws again. That is the nucleus distribution exactly; the nucleus holds at least top_p of the mass,
    so a row draws 1 / top_p times on average, and rows still outside after `REDRAWS` draws take the
    sorted path. Whether a draw lies in the nucleus is first bounded per block of the vocabulary
    (`VocabBlocks`); only a row the bounds leave open sums over its whole vocabulary."""
    if params.greedy:
        return candidates.probs.argmax(dim=-1)
    probs = candidates.probs
    everyone = torch.arange(len(probs), device=probs.device)
    u = torch.from_numpy(uniforms(seeds, steps)).to(probs.device)
    if candidates.tokens is not None:
        cumulative = probs.double().cumsum(dim=-1)
        position = torch.searchsorted(cumulative, (u * cumulative[:, -1])[:, None], right=True).clamp(
            max=probs.shape[-1] - 1
        )
        return candidates.tokens.gather(-1, position).squeeze(-1)
    blocks = VocabBlocks(probs)
    chosen = blocks.draw(everyone, u)
    if params.top_p >= 1.0:
        return chosen
    pending = everyone
    for attempt in range(1, REDRAWS + 1):
        pending = pending[blocks.outside_nucleus(pending, chosen[pending], params.top_p)]
        if not len(pending) or attempt == REDRAWS:
            break
        rows = pending.cpu().numpy()
        chosen[pending] = blocks.draw(
            pending, torch.from_numpy(uniforms(seeds[rows], steps[rows], attempt)).to(probs.device)
        )
    if len(pending):
        rows = pending.cpu().numpy()
        ordered, index = probs[pending].sort(dim=-1, descending=True)
        kept = ordered * top_p_keep(ordered, params.top_p)
        u = torch.from_numpy(uniforms(seeds[rows], steps[rows], REDRAWS + 1)).to(kept.device)
        position = VocabBlocks(kept).draw(torch.arange(len(kept), device=kept.device), u)
        chosen[pending] = index.gather(-1, position[:, None]).squeeze(-1)
    return chosen


class VocabBlocks:
    """Probabilities (rows, vocab; any non-negative mass) cut into blocks of `size` tokens, with each block's
    total and largest entry: an inverse-CDF draw touches the block totals and one block per row, never a
    cumulative sum over the whole vocabulary."""

    def __init__(self, probs: torch.Tensor, size: int = 256):
        rows, self.vocab = probs.shape
        self.size, self.probs = size, probs
        padding = (-self.vocab) % size
        self.blocks = (F.pad(probs, (0, padding)) if padding else probs).view(rows, -1, size)
        self.totals, self.largest = self.blocks.sum(dim=-1), self.blocks.amax(dim=-1)
        self.cumulative = self.totals.double().cumsum(dim=-1)

    def draw(self, rows: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Per row, the token where the cumulative mass first exceeds u times the row's total (float64)."""
        cumulative = self.cumulative[rows]
        target = u.double() * cumulative[:, -1]
        block = torch.searchsorted(cumulative, target[:, None], right=True).clamp(max=cumulative.shape[1] - 1)
        before = torch.where(block > 0, cumulative.gather(-1, (block - 1).clamp(min=0)), 0.0).squeeze(-1)
        inside = self.blocks[rows, block.squeeze(-1)].double().cumsum(dim=-1)
        # Rounding may put the target past the block's own sum: keep it inside the block's mass.
        target = torch.minimum(target - before, inside[:, -1] * (1 - 1e-12))
        within = torch.searchsorted(inside, target[:, None], right=True).squeeze(-1)
        return (block.squeeze(-1) * self.size + within).clamp(max=self.vocab - 1)

    def outside_nucleus(self, rows: torch.Tensor, tokens: torch.Tensor, top_p: float) -> torch.Tensor:
        """Whether each row's token lies outside its top-p nucleus: the mass of the tokens more likely than
        it reaches top_p. Bounded above by the totals of the blocks whose largest entry beats it; only the
        rows that bound leaves open are summed token by token."""
        probs = self.probs[rows, tokens]
        upper = torch.where(self.largest[rows] > probs[:, None], self.totals[rows], 0.0).sum(dim=-1)
        outside = torch.zeros(len(rows), dtype=torch.bool, device=probs.device)
        unsure = (upper >= top_p).nonzero().squeeze(-1)
        if len(unsure):
            mine = self.probs[rows[unsure]]
            above = torch.where(mine > probs[unsure, None], mine, 0.0).sum(dim=-1)
            outside[unsure] = above >= top_p
        return outside


# ------------------------------------------------------------------------------------------ interface
@dataclass
class Generation:
    """Generated token ids (rows, longest row), right-padded with `pad_id` after each row's end, and each
    row's length (its tokens up to and including its stop token)."""

    token_ids: torch.Tensor
    lengths: torch.Tensor


@dataclass
class ReadOut:
    """What `read` returns per sequence, in input order."""

    logits: np.ndarray | None = None  # (n, len(vocab)) at each sequence's position
    states: np.ndarray | None = None  # (n, hidden) the layer's state at the position, or mean-pooled
    span_logprobs: list[np.ndarray] = field(default_factory=list)  # log-probs of tokens[span_start:]


class Engine(ABC):
    """The teacher's forward passes. Embeddings in, tokens, log-probs and states out."""

    device: torch.device
    hidden_size: int
    precision: Precision

    @abstractmethod
    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings of token ids, in float32 (a soft prompt is concatenated to them)."""

    @abstractmethod
    def generate(
        self,
        prompt: torch.Tensor,
        seeds: Sequence[int] | np.ndarray,
        params: SamplingParams,
        pad_id: int,
        batch_size: int = 64,
    ) -> Generation:
        """Continuations of `prompt` (tokens, hidden), one row per seed."""

    @abstractmethod
    def score(self, prompt: torch.Tensor, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probs (n, T) float32, last hidden states (n, T, hidden)) of continuations (n, T) of `prompt`;
        differentiable with respect to `prompt` under grad mode."""

    @abstractmethod
    def read(
        self,
        sequences: list[list[int]],
        *,
        layer: int | None = None,
        vocab: Sequence[int] | None = None,
        positions: Sequence[int] | None = None,
        span_starts: Sequence[int] | None = None,
        mean_pool: bool = False,
        batch_size: int = 32,
    ) -> ReadOut:
        """Per sequence: the logits over `vocab` and the `layer` state (Hugging Face's `hidden_states[layer]`)
        at `positions` (default: the last token), or the state mean-pooled over all tokens; with
        `span_starts`, the log-probs of each sequence's tokens from its span start on."""


# ------------------------------------------------------------------------------------------ runners
class Cache:
    """Key/value slots of one runner: (slots, kv heads, capacity, head dim) per layer, and how far each
    slot is filled. `shared` caches hold one prefix that every row of a batch reads."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], lengths: torch.Tensor):
        self.keys, self.values, self.lengths = keys, values, lengths


class LeanRunner:
    """A Llama-family decoder (RMSNorm, rotary positions, grouped-query attention, gated MLP) run
    directly on its weights: q/k/v and gate/up fused into one matmul each, attention by one SDPA call.
    Used for every architecture `fits` accepts; the weights are views of the model's (its dtype) or
    one copy per other dtype."""

    def __init__(self, model, dtype: torch.dtype):
        config = model.config
        self.model, self.dtype = model, dtype
        self.layers = len(model.model.layers)
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.hidden_size = config.hidden_size
        self.scale = self.head_dim**-0.5
        self.eps = float(model.model.norm.variance_epsilon)
        self.device = next(model.parameters()).device
        self.weights = [self._layer_weights(layer) for layer in model.model.layers]
        self.norm = self._cast(model.model.norm.weight)
        self.lm_head = self._cast(model.get_output_embeddings().weight)
        self.rotary = model.model.rotary_emb
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None

    @staticmethod
    def fits(model) -> bool:
        """Whether `model` has the layout this runner computes (else the Hugging Face forward runs)."""
        config = model.config
        try:
            layers = model.model.layers
            attention, mlp = layers[0].self_attn, layers[0].mlp
            norms = (layers[0].input_layernorm, layers[0].post_attention_layernorm, model.model.norm)
            _ = model.model.rotary_emb, model.get_output_embeddings().weight
        except (AttributeError, IndexError, TypeError):
            return False
        plain_norms = all(
            type(norm).__name__.endswith("RMSNorm") and hasattr(norm, "variance_epsilon") for norm in norms
        )
        return (
            config.model_type in {"llama", "mistral", "qwen2"}
            and plain_norms
            and all(hasattr(attention, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj"))
            and not hasattr(attention, "q_norm")
            and all(hasattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj"))
            and mlp.down_proj.bias is None
            and getattr(config, "hidden_act", "silu") == "silu"
            and getattr(config, "sliding_window", None) is None
            and not getattr(config, "use_sliding_window", False)
            and not getattr(config, "o_proj_bias", False)
        )

    def _cast(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.detach().to(self.dtype)

    def _layer_weights(self, layer) -> tuple:
        """A layer's weights in the runner's dtype: q/k/v and gate/up concatenated, and each RMSNorm's scale
        folded into the matmul after it (norm(x) * w @ W.T == norm(x) @ (W * w).T), which saves two
        elementwise passes per layer."""
        attention, mlp = layer.self_attn, layer.mlp

        def fused(linears, norm) -> torch.Tensor:
            return (torch.cat([linear.weight for linear in linears]) * norm.weight[None, :]).detach().to(self.dtype)

        biases = [attention.q_proj.bias, attention.k_proj.bias, attention.v_proj.bias]
        qkv_bias = torch.cat(biases).detach().to(self.dtype) if all(b is not None for b in biases) else None
        o_bias = attention.o_proj.bias.detach().to(self.dtype) if attention.o_proj.bias is not None else None
        return (
            fused((attention.q_proj, attention.k_proj, attention.v_proj), layer.input_layernorm),
            qkv_bias,
            self._cast(attention.o_proj.weight),
            o_bias,
            fused((mlp.gate_proj, mlp.up_proj), layer.post_attention_layernorm),
            self._cast(mlp.down_proj.weight),
        )

    # ---------------------------------------------------------------------------- pieces
    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (*positions.shape, head dim) from the model's own rotary module (any rope type it has)."""
        needed = int(positions.max()) + 1 if positions.numel() else 1
        if self._rope is None or self._rope[0].shape[0] < needed:
            size = max(needed, 2 * (self._rope[0].shape[0] if self._rope else 256))
            probe = torch.zeros(1, dtype=self.dtype, device=self.device)
            cos, sin = self.rotary(probe, torch.arange(size, device=self.device)[None])
            self._rope = (cos[0], sin[0])
        return self._rope[0][positions], self._rope[1][positions]

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """RMSNorm without its scale (folded into the next matmul): as Hugging Face's LlamaRMSNorm, the
        statistics in float32, the result in the runner's dtype."""
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(self.dtype)

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, blocked: torch.Tensor | None
    ) -> torch.Tensor:
        """Grouped-query attention of q (B, heads, S, d) over k, v (B, kv heads, T, d); `mask` True where a
        query may look, (S, T) or (B, 1, S, T), `blocked` its negation; both None: causal. On CPUs, for
        short queries (decoding, reading), batched matmuls over the head groups: measured 1-12x faster
        there than the fused kernel, which wins on long queries and on GPUs."""
        batch, _, length, _ = q.shape
        if q.device.type != "cpu" or length > MATMUL_ATTENTION_MAX_QUERY:
            causal = mask is None and length > 1
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale, enable_gqa=self.kv_heads != self.heads
            )
        groups, span = self.heads // self.kv_heads, k.shape[2]
        grouped = q.reshape(batch, self.kv_heads, groups * length, self.head_dim)
        scores = (grouped @ k.transpose(-1, -2)).view(batch, self.kv_heads, groups, length, span).float() * self.scale
        if mask is None and length > 1:
            blocked = torch.ones(length, span, dtype=torch.bool, device=q.device).triu(span - length + 1)
        if blocked is not None:
            scores = scores.masked_fill(blocked if blocked.dim() == 2 else blocked.unsqueeze(2), float("-inf"))
        weights = torch.softmax(scores, dim=-1).to(v.dtype).view(batch, self.kv_heads, groups * length, span)
        return (weights @ v).view(batch, self.heads, length, self.head_dim)

    def logits(self, hidden: torch.Tensor, vocab: Sequence[int] | None = None) -> torch.Tensor:
        """Logits of final (normed) hidden states, over the whole vocabulary or the given token ids."""
        weight = self.lm_head if vocab is None else self.lm_head[list(vocab)]
        return hidden.to(self.dtype) @ weight.T

    # ---------------------------------------------------------------------------- forward
    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        *,
        cache: Cache | None = None,
        prefix: Cache | None = None,
        capture: int | None = None,
        record: Cache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run embeddings x (B, S, hidden) at `positions` (B, S) through the decoder.

        - `cache` (decoding): row b is slot b of the cache; its S new keys are written there at its
          positions, and it attends to its slot's keys up to its own position (a slot may hold older keys
          further on, of the row it held before).
        - `prefix` (reading, scoring): one shared prefix (1 slot) that every row attends to, then its own
          tokens causally; nothing is written, so the prefix serves any number of batches.
        - neither: causal attention over the rows' own tokens; `record` collects each layer's keys.
        Rows are right-padded: a real token never attends to the pads after it.
        Returns (final normed hidden states, the `capture` layer's states in Hugging Face's numbering:
        0 the embeddings, i the output of layer i, the last one normed)."""
        batch, length, _ = x.shape
        x = x.to(self.dtype)
        cos, sin = self.rope(positions)
        # (B, S, 1, d): q and k are rotated together, in the (B, S, heads, d) layout the projection gives.
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
        captured = x if capture == 0 else None
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        mask = None
        if cache is not None:
            span = int(positions.max()) + 1
            key_positions = torch.arange(span, device=x.device)
            mask = (key_positions[None, None, :] <= positions[:, :, None]).unsqueeze(1)
            slot_index = torch.arange(batch, device=x.device)[:, None].expand(batch, length)
        elif prefix is not None:
            base = prefix.keys[0].shape[2]
            mask = torch.ones(length, base + length, dtype=torch.bool, device=x.device)
            mask[:, base:] = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
        blocked = ~mask if mask is not None else None
        for index, (qkv_w, qkv_b, o_w, o_b, gate_up, down) in enumerate(self.weights):
            qkv = F.linear(self.normalise(x), qkv_w, qkv_b)
            qk = self.rotate(
                qkv[..., : q_size + kv_size].view(batch, length, self.heads + self.kv_heads, self.head_dim), cos, sin
            )
            q, k = qk[:, :, : self.heads].transpose(1, 2), qk[:, :, self.heads :].transpose(1, 2)
            v = qkv[..., q_size + kv_size :].view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
            if cache is not None:
                keys, values = cache.keys[index], cache.values[index]
                # (slot, position) <- the row's new key; advanced indices around a slice put the heads last.
                keys[slot_index, :, positions] = k.transpose(1, 2)
                values[slot_index, :, positions] = v.transpose(1, 2)
                k, v = keys[:, :, :span], values[:, :, :span]
            elif prefix is not None:
                k = torch.cat([prefix.keys[index].expand(batch, -1, -1, -1), k], dim=2)
                v = torch.cat([prefix.values[index].expand(batch, -1, -1, -1), v], dim=2)
            elif record is not None:
                record.keys.append(k)
                record.values.append(v)
            attended = self.attend(q, k, v, mask, blocked)
            x = x + F.linear(attended.transpose(1, 2).reshape(batch, length, q_size), o_w, o_b)
            gate, up = F.linear(self.normalise(x), gate_up).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, down)
            if capture == index + 1 and index + 1 < self.layers:
                captured = x
        x = self.norm * self.normalise(x)
        if capture == self.layers:
            captured = x
        return x, captured

    def prefill(self, x: torch.Tensor) -> tuple[Cache, torch.Tensor]:
        """A shared prefix (1, P, hidden): its keys and values (as a 1-slot cache) and its final hidden
        states. Under grad mode the keys keep their graph, so a soft prompt's gradient flows through them."""
        record = Cache([], [], torch.tensor([x.shape[1]], device=self.device))
        hidden, _ = self.forward(x, torch.arange(x.shape[1], device=self.device)[None], record=record)
        record.last = hidden[0, -1:]
        return record, hidden

    def slots(self, count: int, capacity: int) -> Cache:
        shape = (count, self.kv_heads, capacity, self.head_dim)
        return Cache(
            [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.layers)],
            [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.layers)],
            torch.zeros(count, dtype=torch.long, device=self.device),
        )

    @staticmethod
    def place(cache: Cache, prefix: Cache, slots: torch.Tensor) -> None:
        """Copy the prefix's keys into the given slots (a new row starts there)."""
        length = prefix.keys[0].shape[2]
        for mine, theirs in ((cache.keys, prefix.keys), (cache.values, prefix.values)):
            for layer, source in zip(mine, theirs):
                layer[slots, :, :length] = source
        cache.lengths[slots] = length

    @staticmethod
    def select(cache: Cache, slots: torch.Tensor) -> Cache:
        """A cache of the given slots only (each layer's keys copied once)."""
        return Cache([k[slots] for k in cache.keys], [v[slots] for v in cache.values], cache.lengths[slots])


def keep_freed_memory() -> None:
    """Ask glibc to keep freed blocks of up to 32 MiB in the heap instead of returning them to the system.

    Every decoding step allocates and frees vocabulary-sized tensors (128 rows x 49k tokens is 25 MB in
    float32); returned to the system, each one is faulted in again page by page on the next step. Kept,
    decoding ran 5-14% faster here (benchmarks/results/teacher_speed.md). Process-wide and harmless
    elsewhere; a no-op where glibc is not the allocator."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or os.name != "posix":
        return
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 32 * 1024 * 1024)
    mallopt(m_trim_threshold, 1 << 30)


class TorchEngine(Engine):
    """The engine on PyTorch: the lean runner for Llama-family teachers, the Hugging Face forward otherwise."""

    def __init__(self, model, precision: Precision):
        keep_freed_memory()
        self.model = model
        self.device = next(model.parameters()).device
        self.hidden_size = model.config.hidden_size
        self.lean = LeanRunner.fits(model)
        if not self.lean:
            # The Hugging Face forward runs in the weights' own dtype.
            dtype = next(model.parameters()).dtype
            precision = Precision(dtype, dtype, dtype)
        self.precision = precision
        self._runners: dict[torch.dtype, LeanRunner] = {}

    def runner(self, dtype: torch.dtype) -> LeanRunner:
        if dtype not in self._runners:
            self._runners[dtype] = LeanRunner(self.model, dtype)
        return self._runners[dtype]

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(token_ids.to(self.device)).float()

    # ---------------------------------------------------------------------------- generate
    @torch.no_grad()
    def generate(self, prompt, seeds, params, pad_id, batch_size=64):
        seeds = np.asarray(seeds, dtype=np.uint64)
        rows = len(seeds)
        tokens = torch.full((rows, params.max_new_tokens), pad_id, dtype=torch.long)
        lengths = torch.zeros(rows, dtype=torch.long)
        if rows:
            if self.lean:
                self._generate_lean(prompt, seeds, params, batch_size, tokens, lengths)
            else:
                self._generate_hf(prompt, seeds, params, batch_size, tokens, lengths)
        width = int(lengths.max()) if rows else 0
        return Generation(token_ids=tokens[:, :width].contiguous(), lengths=lengths)

    def _generate_lean(self, prompt, seeds, params, batch_size, tokens, lengths) -> None:
        """Continuous batching over fixed slots: each slot holds one row from its prompt to its stop token,
        then takes the next waiting row (the prompt's keys copied in, its first distribution known). Every
        step runs all slots; once no row waits and a quarter of the slots idle, the live rows move into
        fewer slots."""
        runner = self.runner(self.precision.decode)
        prefix, hidden = runner.prefill(prompt[None].to(self.device))
        first = candidates(runner.logits(hidden[:, -1]), params)  # every row's first distribution
        prompt_length = prompt.shape[0]
        capacity = prompt_length + params.max_new_tokens
        # A slot with nothing to feed runs at the last position: no row attends to that key before it
        # writes its own there.
        scratch = capacity - 1
        stop = torch.tensor(sorted(params.stop_ids))
        width = min(batch_size, len(seeds))
        cache = runner.slots(width, capacity)
        waiting = list(range(len(seeds)))[::-1]  # pop() takes the next row
        slot_row = np.full(width, -1)  # the row each slot holds, -1 idle
        steps = np.zeros(width, dtype=np.int64)  # tokens its row has so far
        upcoming = first.empty(width)  # each slot's next-token distribution
        embeddings = self.model.get_input_embeddings()

        def admit(free: np.ndarray) -> None:
            taken = free[: len(waiting)]
            if len(taken):
                slot_row[taken] = [waiting.pop() for _ in taken]
                steps[taken] = 0
                index = torch.from_numpy(taken).to(self.device)
                runner.place(cache, prefix, index)
                upcoming.put(index, first)

        admit(np.arange(width))
        while (slot_row >= 0).any():
            if not waiting and (slot_row >= 0).sum() < COMPACT_BELOW * len(slot_row):
                keep = np.flatnonzero(slot_row >= 0)
                index = torch.from_numpy(keep).to(self.device)
                cache, upcoming = runner.select(cache, index), upcoming.take(index)
                slot_row, steps = slot_row[keep], steps[keep]
            live = np.flatnonzero(slot_row >= 0)
            rows = slot_row[live]
            mine = upcoming if len(live) == len(slot_row) else upcoming.take(torch.from_numpy(live).to(self.device))
            chosen = draw(mine, params, seeds[rows], steps[live]).cpu()
            tokens[rows, steps[live]] = chosen
            steps[live] += 1
            lengths[rows] = torch.from_numpy(steps[live])
            finished = torch.isin(chosen, stop).numpy() | (steps[live] >= params.max_new_tokens)
            going = live[~finished]
            slot_row[live[finished]] = -1
            admit(live[finished])
            if not len(going):
                continue
            feed = torch.zeros(len(slot_row), dtype=torch.long)
            positions = torch.full((len(slot_row),), scratch, dtype=torch.long)
            feed[going] = chosen[~finished]
            positions[going] = torch.from_numpy(prompt_length + steps[going] - 1)
            hidden, _ = runner.forward(
                embeddings(feed.to(self.device))[:, None], positions.to(self.device)[:, None], cache=cache
            )
            index = torch.from_numpy(going).to(self.device)
            upcoming.put(index, candidates(runner.logits(hidden[index, -1]), params))

    def _generate_hf(self, prompt, seeds, params, batch_size, tokens, lengths) -> None:
        """Hugging Face's forward and cache: the prompt prefilled once and copied into each batch; a batch
        drops its finished rows once a quarter of it has finished."""
        from transformers import DynamicCache

        dtype = next(self.model.parameters()).dtype
        prefix = DynamicCache(config=self.model.config)
        out = self.model(
            inputs_embeds=prompt[None].to(self.device, dtype), past_key_values=prefix, use_cache=True, logits_to_keep=1
        )
        first_logits = out.logits[:, -1].float()
        stop = torch.tensor(sorted(params.stop_ids))
        embeddings = self.model.get_input_embeddings()
        for start in range(0, len(seeds), batch_size):
            rows = np.arange(start, min(start + batch_size, len(seeds)))
            cache = _expanded_hf_cache(prefix, self.model.config, len(rows))
            logits = first_logits.expand(len(rows), -1)
            done = np.zeros(len(rows), dtype=bool)
            for step in range(params.max_new_tokens):
                chosen = next_tokens(logits, params, seeds[rows], np.full(len(rows), step)).cpu()
                live = ~done
                tokens[rows[live], step] = chosen[torch.from_numpy(live)]
                lengths[rows[live]] = step + 1
                done |= torch.isin(chosen, stop).numpy()
                if done.all() or step + 1 == params.max_new_tokens:
                    break
                if (~done).sum() < COMPACT_BELOW * len(rows):
                    keep = np.flatnonzero(~done)
                    cache.batch_select_indices(torch.from_numpy(keep).to(self.device))
                    rows, done, chosen = rows[keep], done[keep], chosen[torch.from_numpy(keep)]
                feed = embeddings(chosen.to(self.device))[:, None].to(dtype)
                logits = (
                    self.model(inputs_embeds=feed, past_key_values=cache, use_cache=True, logits_to_keep=1)
                    .logits[:, -1]
                    .float()
                )

    # ---------------------------------------------------------------------------- score
    def score(self, prompt, token_ids):
        token_ids = token_ids.to(self.device)
        if not self.lean:
            return self._score_hf(prompt, token_ids)
        runner = self.runner(self.precision.score)
        rows, length = token_ids.shape
        prefix, prefix_hidden = runner.prefill(prompt[None].to(self.device))
        x = self.model.get_input_embeddings()(token_ids)
        positions = (prompt.shape[0] + torch.arange(length, device=self.device))[None].expand(rows, -1)
        hidden, _ = runner.forward(x, positions, prefix=prefix)
        # Token t is predicted from the position before it: the prompt's last one, then the continuation's.
        predicting = torch.cat([prefix_hidden[:, -1:].expand(rows, -1, -1), hidden[:, :-1]], dim=1)
        logits = runner.logits(predicting).float()
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)
        return logprobs, predicting

    def _score_hf(self, prompt, token_ids):
        rows, length = token_ids.shape
        dtype = next(self.model.parameters()).dtype
        embeds = torch.cat(
            [prompt[None].to(self.device, dtype).expand(rows, -1, -1), self.model.get_input_embeddings()(token_ids)],
            dim=1,
        )
        output = self.model(inputs_embeds=embeds, output_hidden_states=True)
        start = prompt.shape[0] - 1
        logits = output.logits[:, start : start + length].float()
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)
        return logprobs, output.hidden_states[-1][:, start : start + length]

    # ---------------------------------------------------------------------------- read
    @torch.no_grad()
    def read(
        self, sequences, *, layer=None, vocab=None, positions=None, span_starts=None, mean_pool=False, batch_size=32
    ):
        count = len(sequences)
        layers = self.model.config.num_hidden_layers
        capture = None if layer is None else layer % (layers + 1)
        positions = [len(s) - 1 for s in sequences] if positions is None else list(positions)
        # The shared token prefix: everything before the first position any sequence needs on its own.
        needed = [positions[i] if span_starts is None else min(positions[i], span_starts[i] - 1) for i in range(count)]
        shared = _common_prefix(sequences, max(0, min(needed, default=0))) if count > 1 and not mean_pool else 0
        out = ReadOut(
            logits=np.zeros((count, len(vocab)), np.float32) if vocab is not None else None,
            states=np.zeros((count, self.hidden_size), np.float32) if capture is not None else None,
            span_logprobs=[np.zeros(0, np.float32)] * count if span_starts is not None else [],
        )
        if not count:
            return out
        prefix = self._read_prefix(sequences[0][:shared]) if shared else None
        order = sorted(range(count), key=lambda i: len(sequences[i]))  # length batches: little padding
        for start in range(0, count, batch_size):
            chunk = order[start : start + batch_size]
            suffixes = [sequences[i][shared:] for i in chunk]
            width = max(map(len, suffixes))
            ids = torch.zeros((len(chunk), width), dtype=torch.long)
            real = torch.zeros((len(chunk), width), dtype=torch.bool)
            for row, suffix in enumerate(suffixes):
                ids[row, : len(suffix)] = torch.tensor(suffix)
                real[row, : len(suffix)] = True
            hidden, captured = self._read_forward(ids.to(self.device), prefix, shared, capture)
            rows = torch.arange(len(chunk))
            at = torch.tensor([positions[i] - shared for i in chunk])
            if vocab is not None:
                out.logits[chunk] = self._logits(hidden[rows, at], vocab).float().cpu().numpy()
            if capture is not None:
                if mean_pool:
                    weights = real.to(self.device).unsqueeze(-1).to(captured.dtype)
                    pooled = (captured * weights).sum(1) / weights.sum(1).clamp(min=1)
                    out.states[chunk] = pooled.float().cpu().numpy()
                else:
                    out.states[chunk] = captured[rows, at].float().cpu().numpy()
            if span_starts is not None:
                for row, i in enumerate(chunk):
                    begin, end = span_starts[i] - shared, len(sequences[i]) - shared
                    # A token is predicted at the position before it (the prefix's last one for the first suffix token).
                    states = hidden[row, max(begin - 1, 0) : end - 1]
                    if begin == 0:
                        states = torch.cat([prefix.last.to(states.dtype), states])
                    logprobs = torch.log_softmax(self._logits(states, None).float(), dim=-1)
                    targets = torch.tensor(sequences[i][span_starts[i] :], device=self.device)
                    out.span_logprobs[i] = logprobs.gather(-1, targets[:, None]).squeeze(-1).cpu().numpy()
        return out

    def _read_prefix(self, token_ids: list[int]):
        ids = torch.tensor([token_ids], device=self.device)
        if self.lean:
            return self.runner(self.precision.read).prefill(self.model.get_input_embeddings()(ids))[0]
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        out = self.model.base_model(input_ids=ids, past_key_values=cache, use_cache=True)
        cache.last = out.last_hidden_state[0, -1:]
        return cache

    def _read_forward(self, ids: torch.Tensor, prefix, shared: int, capture: int | None):
        if self.lean:
            runner = self.runner(self.precision.read)
            positions = (shared + torch.arange(ids.shape[1], device=self.device))[None].expand(ids.shape[0], -1)
            return runner.forward(self.model.get_input_embeddings()(ids), positions, prefix=prefix, capture=capture)
        cache = _expanded_hf_cache(prefix, self.model.config, ids.shape[0]) if prefix is not None else None
        out = self.model.base_model(
            input_ids=ids, past_key_values=cache, use_cache=cache is not None, output_hidden_states=capture is not None
        )
        return out.last_hidden_state, (out.hidden_states[capture] if capture is not None else None)

    def _logits(self, hidden: torch.Tensor, vocab: Sequence[int] | None) -> torch.Tensor:
        if self.lean:
            return self.runner(self.precision.read).logits(hidden, vocab)
        weight = self.model.get_output_embeddings().weight
        weight = weight if vocab is None else weight[list(vocab)]
        return hidden.to(weight.dtype) @ weight.T


def _expanded_hf_cache(prefix, config, rows: int):
    """A Hugging Face DynamicCache holding `prefix`'s keys for each of `rows` rows (the prefix stays as is)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    for index, layer in enumerate(prefix.layers):
        cache.update(
            layer.keys.expand(rows, -1, -1, -1).contiguous(), layer.values.expand(rows, -1, -1, -1).contiguous(), index
        )
    return cache


def _common_prefix(sequences: list[list[int]], limit: int) -> int:
    """Length of the token prefix all sequences share, at most `limit`."""
    first = sequences[0]
    length = min(limit, *(len(s) for s in sequences))
    for sequence in sequences[1:]:
        while length and sequence[:length] != first[:length]:
            # Shrink to the first mismatch.
            length = next((i for i in range(length) if sequence[i] != first[i]), length)
    return length


def build_engine(model, requested_dtype: str) -> TorchEngine:
    return TorchEngine(model, resolve_precision(requested_dtype, next(model.parameters()).device))


__all__ = [
    "Engine",
    "Generation",
    "Precision",
    "ReadOut",
    "SamplingParams",
    "TorchEngine",
    "build_engine",
    "load_dtype",
    "resolve_precision",
    "row_seeds",
]
