"""The frozen teacher LM with an optional soft prompt: sampling, calibrated classification, hidden states.

One implementation serves PPO rollouts, sharded generation, annotation and evaluation; its forward
passes run in the teacher engine (engine.py). A soft prompt is a (m, hidden) tensor placed in front of
the token embeddings of the generation prompt, or a (labels, m, hidden) tensor whose row `y` goes in
front of label y's prompt (`ppo.per_label_prompt`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .config import JobSpec
from .engine import Engine
from .tasks import Example, Task


@dataclass
class Samples:
    """Sampled continuations: right-padded new token ids, their mask, and the decoded texts."""

    label: int
    token_ids: torch.Tensor  # (n, T)
    mask: torch.Tensor  # (n, T) 1 on generated tokens, up to and including the stop token
    texts: list[str]


def calibrate(probs: np.ndarray, reference_mean: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Divide by the mean predicted distribution of a reference set and renormalise (docs/method.md);
    a temperature below 1 then sharpens the result (p ** (1 / T), renormalised)."""
    scaled = (probs / np.clip(reference_mean, 1e-12, None)) ** (1.0 / temperature)
    return (scaled / scaled.sum(axis=-1, keepdims=True)).astype(np.float32)


def calibration_reference(
    spec: JobSpec, pool_raw: np.ndarray, teacher: Teacher | None = None, task: Task | None = None
) -> np.ndarray:
    """The reference mean distribution `calibrate` divides by, as `teacher.calibration` says: `pool`, the mean
    raw p_C of the inputs being classified (`pool_raw`); `content_free`, the teacher's mean raw p_C over
    content-free inputs (`teacher`, or the spec's teacher for `task` loaded here when none is given)."""
    if spec.teacher.calibration == "content_free":
        if teacher is None:
            teacher = Teacher.from_spec(spec, task)
        return teacher.content_free_reference()
    return pool_raw.mean(axis=0)


class Teacher:
    """The task's view of the teacher: prompts, verbalisers and soft prompts in, samples, log-probs and
    p_C out. Every forward pass goes through its engine (engine.py); a soft prompt is always passed
    explicitly to the call that uses it."""

    def __init__(self, engine: Engine, tokenizer, task: Task, chat_template: bool = True):
        self.engine = engine
        self.model = engine.model
        self.tokenizer = tokenizer
        self.task = task
        self.chat_template = chat_template and bool(getattr(tokenizer, "chat_template", None))
        self.device = engine.device
        self.stop_ids = sorted({tokenizer.eos_token_id, *tokenizer("\n", add_special_tokens=False).input_ids[-1:]})
        self.verbaliser_ids = [
            tokenizer(" " + word, add_special_tokens=False).input_ids[0] for word in task.verbalisers
        ]

    @classmethod
    def from_spec(cls, spec: JobSpec, task: Task, device: str | torch.device | None = None) -> Teacher:
        """Load the spec's teacher (frozen) onto `device` (default: cuda when resources.use_gpu), its
        precision per use resolved from `teacher.dtype` for that device."""
        from .engine import TorchEngine, load_dtype, resolve_precision
        from .models import load_teacher

        teacher = spec.teacher
        device = torch.device(device or ("cuda" if spec.resources.use_gpu else "cpu"))
        model, tokenizer = load_teacher(
            teacher.model, spec.storage.cache_dir, load_dtype(teacher.dtype, device), teacher.trust_remote_code
        )
        model.to(device)
        return cls(TorchEngine(model, resolve_precision(teacher.dtype, device)), tokenizer, task, teacher.chat_template)

    def classification_text(self, example: Example) -> str:
        """The question as the teacher's user turn (chat template) or plain text, then the answer prefix."""
        question = self.task.classification_prompt(example)
        prefix = self.task.spec.answer_prefix or ""
        if self.chat_template:
            turn = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
            )
            return turn + prefix
        return f"{question}\n{prefix}"

    # ---------------------------------------------------------------------------------- generation
    def prompt_embeddings(self, label: int, soft_prompt: torch.Tensor | None) -> torch.Tensor:
        """(m + L, hidden): the soft prompt (its row `label` when it is per label) before the embedded
        generation prompt of `label`."""
        ids = self.tokenizer(self.task.generation_prompt(label), return_tensors="pt").input_ids[0]
        tokens = self.engine.embed(ids)
        if soft_prompt is None:
            return tokens
        soft_prompt = torch.as_tensor(soft_prompt, device=self.device)
        if soft_prompt.dim() == 3:
            soft_prompt = soft_prompt[label]
        return torch.cat([soft_prompt.to(tokens.dtype), tokens], dim=0)

    def sample(
        self,
        label: int,
        n: int,
        max_new_tokens: int,
        top_p: float,
        temperature: float,
        seed: int,
        soft_prompt: torch.Tensor | None = None,
        batch_size: int = 64,
        greedy: bool = False,
        top_k: int = 0,
    ) -> Samples:
        """n continuations of the label's generation prompt behind `soft_prompt`. Row i draws from its own
        seed (`row_seeds(seed, n)[i]`), so it is the same whatever `batch_size` (rows generated together)."""
        from .engine import SamplingParams, row_seeds

        params = SamplingParams(max_new_tokens, tuple(self.stop_ids), top_p, temperature, greedy, top_k)
        with torch.no_grad():
            prompt = self.prompt_embeddings(label, soft_prompt)
        generation = self.engine.generate(prompt, row_seeds(seed, n), params, self.tokenizer.pad_token_id, batch_size)
        token_ids = generation.token_ids
        mask = (torch.arange(token_ids.shape[1])[None] < generation.lengths[:, None]).long()
        texts = [
            self.tokenizer.decode(row[: int(length)], skip_special_tokens=True).split("\n")[0].strip()
            for row, length in zip(token_ids, generation.lengths)
        ]
        return Samples(label=label, token_ids=token_ids, mask=mask, texts=texts)

    def continuation_outputs(self, label: int, token_ids: torch.Tensor, soft_prompt: torch.Tensor | None):
        """(log-probs (n, T), last hidden states (n, T, hidden)) of given continuations under a prompt;
        differentiable with respect to `soft_prompt` under grad mode."""
        return self.engine.score(self.prompt_embeddings(label, soft_prompt), token_ids)

    # ------------------------------------------------------------------------------ classification
    def classify_raw(self, examples: list[Example], batch_size: int = 32) -> np.ndarray:
        """Uncalibrated p_C(. | x): (n, num_labels); choice tasks: over alternatives."""
        return self.read(examples, batch_size)[0]

    def read(
        self, examples: list[Example], batch_size: int = 32, state_layer: int | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """p_C(. | x) as in `classify_raw` and, given `state_layer`, that layer's hidden state where the
        teacher reads off its answer, (n, hidden): the classification prompt's last token (choice
        tasks: the shared context's last token). Both come from the same forward passes."""
        if self.task.kind == "choice":
            return self._choice_probs(examples, batch_size, state_layer)
        sequences = self._token_ids([self.classification_text(example) for example in examples])
        out = self.engine.read(sequences, layer=state_layer, vocab=self.verbaliser_ids, batch_size=batch_size)
        # Softmax over the verbalisers' logits: p_C renormalised over the label words.
        probs = torch.softmax(torch.from_numpy(out.logits), dim=-1).numpy()
        return probs.astype(np.float32), out.states

    def annotate(
        self, examples: list[Example], state: str, layer: int, batch_size: int = 32
    ) -> tuple[np.ndarray, np.ndarray]:
        """(raw p_C, h_T) of the examples; `state` as `teacher.state`: 'answer' (one pass, see `read`) or
        'mean_pool' (the example's generation text alone, see `hidden_states`)."""
        if state == "answer":
            return self.read(examples, batch_size, layer)
        texts = [self.task.example_text(example) for example in examples]
        return self.classify_raw(examples, batch_size), self.hidden_states(texts, layer, batch_size)

    def _choice_probs(
        self, examples: list[Example], batch_size: int, state_layer: int | None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Mean token log-likelihood of each alternative after its context, softmax over alternatives;
        with `state_layer`, the state at the context's last token (the same for every alternative)."""
        pairs = [pair for example in examples for pair in self.task.choice_contexts(example)]
        alternatives = len(pairs) // max(1, len(examples))
        contexts = [self.tokenizer(context).input_ids for context, _ in pairs]
        continuations = [self.tokenizer(cont, add_special_tokens=False).input_ids for _, cont in pairs]
        sequences = [c + d for c, d in zip(contexts, continuations)]
        out = self.engine.read(
            sequences,
            layer=state_layer,
            positions=[len(c) - 1 for c in contexts],
            span_starts=[len(c) for c in contexts],
            batch_size=batch_size,
        )
        scores = np.array([logprobs.mean() for logprobs in out.span_logprobs], dtype=np.float64)
        per_example = scores.reshape(len(examples), -1)
        per_example = np.exp(per_example - per_example.max(axis=1, keepdims=True))
        probs = (per_example / per_example.sum(axis=1, keepdims=True)).astype(np.float32)
        states = out.states[::alternatives] if state_layer is not None else None
        return probs, states

    def content_free_reference(self) -> np.ndarray:
        """Mean raw p_C over content-free inputs (every field 'N/A', '' and '[MASK]')."""
        fields = [*self.task.spec.text_fields, *(self.task.spec.choice_fields or [])]
        examples = []
        for filler in ("N/A", "", "[MASK]"):
            values = {field: filler for field in fields}
            if self.task.spec.question_field:
                values[self.task.spec.question_field] = next(iter(self.task.spec.connectives))
            examples.append(Example(fields=values, label=-1))
        return self.classify_raw(examples).mean(axis=0)

    def hidden_states(self, texts: list[str], layer: int = -1, batch_size: int = 32) -> np.ndarray:
        """h_T(x): the layer's hidden states mean-pooled over the text's tokens, (n, hidden)."""
        return self.engine.read(self._token_ids(texts), layer=layer, mean_pool=True, batch_size=batch_size).states

    def _token_ids(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, truncation=True, max_length=512).input_ids if texts else []
