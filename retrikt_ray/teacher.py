"""The frozen teacher LM with an optional soft prompt: sampling, calibrated classification, hidden states.

One implementation serves PPO rollouts, sharded generation, annotation and evaluation. A soft prompt
is a (m, hidden) tensor placed in front of the token embeddings of the generation prompt, or a
(labels, m, hidden) tensor whose row `y` goes in front of label y's prompt (`ppo.per_label_prompt`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .config import JobSpec
from .tasks import Example, Task


@dataclass
class Samples:
    """Sampled continuations: right-padded new token ids, their mask, and the decoded texts."""

    label: int
    token_ids: torch.Tensor  # (n, T)
    mask: torch.Tensor  # (n, T) 1 on generated tokens, up to and including the stop token
    texts: list[str]


def calibrate(probs: np.ndarray, reference_mean: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Divide by the mean predicted distribution of a reference set and renormalise (METHOD.md);
    a temperature below 1 then sharpens the result (p ** (1 / T), renormalised)."""
    scaled = (probs / np.clip(reference_mean, 1e-12, None)) ** (1.0 / temperature)
    return (scaled / scaled.sum(axis=-1, keepdims=True)).astype(np.float32)


class Teacher:
    def __init__(self, model, tokenizer, task: Task, soft_prompt: torch.Tensor | None = None, chat_template: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.task = task
        self.soft_prompt = soft_prompt
        self.chat_template = chat_template and bool(getattr(tokenizer, "chat_template", None))
        self.device = next(model.parameters()).device
        self.stop_ids = sorted(
            {tokenizer.eos_token_id, *tokenizer("\n", add_special_tokens=False).input_ids[-1:]}
        )
        self.verbaliser_ids = [tokenizer(" " + word, add_special_tokens=False).input_ids[0] for word in task.verbalisers]

    @classmethod
    def from_spec(cls, spec: JobSpec, task: Task, soft_prompt=None, device: str | torch.device | None = None) -> "Teacher":
        """Load the spec's teacher (frozen) onto `device` (default: cuda when resources.use_gpu)."""
        from .models import load_teacher

        teacher = spec.teacher
        model, tokenizer = load_teacher(teacher.model, spec.storage.cache_dir, teacher.dtype, teacher.trust_remote_code)
        device = device or ("cuda" if spec.resources.use_gpu else "cpu")
        model.to(device)
        if soft_prompt is not None:
            soft_prompt = torch.as_tensor(soft_prompt, device=device)
        return cls(model, tokenizer, task, soft_prompt, teacher.chat_template)

    def classification_text(self, example: Example) -> str:
        """The question as the teacher's user turn (chat template) or plain text, then the answer prefix."""
        question = self.task.classification_prompt(example)
        prefix = self.task.spec.answer_prefix or ""
        if self.chat_template:
            turn = self.tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
            return turn + prefix
        return f"{question}\n{prefix}"

    # ---------------------------------------------------------------------------------- generation
    def prompt_ids(self, label: int) -> torch.Tensor:
        return self.tokenizer(self.task.generation_prompt(label), return_tensors="pt").input_ids.to(self.device)

    def prompt_embeddings(self, label: int, n: int, soft_prompt: torch.Tensor | None) -> torch.Tensor:
        """(n, m + L, hidden): the soft prompt followed by the embedded generation prompt."""
        tokens = self.model.get_input_embeddings()(self.prompt_ids(label))
        if soft_prompt is not None:
            if soft_prompt.dim() == 3:
                soft_prompt = soft_prompt[label]
            tokens = torch.cat([soft_prompt.to(tokens.dtype).unsqueeze(0), tokens], dim=1)
        return tokens.expand(n, -1, -1)

    @torch.no_grad()
    def sample(self, label: int, n: int, max_new_tokens: int, top_p: float, temperature: float, seed: int) -> Samples:
        """n continuations of the label's generation prompt; all rows share the prompt, so no padding."""
        torch.manual_seed(seed)
        embeds = self.prompt_embeddings(label, n, self.soft_prompt)
        attention = torch.ones(embeds.shape[:2], dtype=torch.long, device=self.device)
        output = self.model.generate(
            inputs_embeds=embeds,
            attention_mask=attention,
            do_sample=True,
            top_p=top_p,
            temperature=temperature,
            max_new_tokens=max_new_tokens,
            eos_token_id=self.stop_ids,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        token_ids = output  # with inputs_embeds, generate returns only the new tokens
        mask = _mask_after_stop(token_ids, self.stop_ids)
        token_ids = token_ids.masked_fill(mask == 0, self.tokenizer.pad_token_id)
        texts = [
            self.tokenizer.decode(row[: int(length)], skip_special_tokens=True).split("\n")[0].strip()
            for row, length in zip(token_ids, mask.sum(dim=1))
        ]
        return Samples(label=label, token_ids=token_ids, mask=mask, texts=texts)

    def continuation_outputs(self, label: int, token_ids: torch.Tensor, soft_prompt: torch.Tensor | None):
        """(log-probs (n, T), last hidden states (n, T, hidden)) of given continuations under a prompt."""
        n, length = token_ids.shape
        prefix = self.prompt_embeddings(label, n, soft_prompt)
        embeds = torch.cat([prefix, self.model.get_input_embeddings()(token_ids)], dim=1)
        output = self.model(inputs_embeds=embeds, output_hidden_states=True)
        start = prefix.shape[1] - 1
        logits = output.logits[:, start : start + length].float()
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)
        return logprobs, output.hidden_states[-1][:, start : start + length]

    # ------------------------------------------------------------------------------ classification
    def classify_raw(self, examples: list[Example], batch_size: int = 32) -> np.ndarray:
        """Uncalibrated p_C(. | x): (n, num_labels); choice tasks: over alternatives."""
        return self.read(examples, batch_size)[0]

    @torch.no_grad()
    def read(self, examples: list[Example], batch_size: int = 32, state_layer: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """p_C(. | x) as in `classify_raw` and, given `state_layer`, that layer's hidden state where the
        teacher reads off its answer, (n, hidden): the classification prompt's last token (choice
        tasks: the shared context's last token). Both come from the same forward passes."""
        if self.task.kind == "choice":
            return self._choice_probs(examples, batch_size, state_layer)
        prompts = [self.classification_text(example) for example in examples]
        probs = [np.zeros((0, self.task.num_labels), np.float32)]
        states = [np.zeros((0, self.model.config.hidden_size), np.float32)]
        for start in range(0, len(prompts), batch_size):
            batch = self._tokenize(prompts[start : start + batch_size])
            # Only the last position's logits are needed: skip the vocabulary projection elsewhere.
            output = self.model(**batch, logits_to_keep=1, output_hidden_states=state_layer is not None)
            final = torch.log_softmax(output.logits[:, -1].float(), dim=-1)
            probs.append(torch.softmax(final[:, self.verbaliser_ids], dim=-1).cpu().numpy())
            if state_layer is not None:
                states.append(output.hidden_states[state_layer][:, -1].float().cpu().numpy())
        return np.concatenate(probs), np.concatenate(states) if state_layer is not None else None

    def annotate(self, examples: list[Example], state: str, layer: int, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
        """(raw p_C, h_T) of the examples; `state` as `teacher.state`: 'answer' (one pass, see `read`) or
        'mean_pool' (the example's generation text alone, see `hidden_states`)."""
        if state == "answer":
            return self.read(examples, batch_size, layer)
        texts = [self.task.example_text(example) for example in examples]
        return self.classify_raw(examples, batch_size), self.hidden_states(texts, layer, batch_size)

    def _choice_probs(self, examples: list[Example], batch_size: int, state_layer: int | None) -> tuple[np.ndarray, np.ndarray | None]:
        """Mean token log-likelihood of each alternative after its context, softmax over alternatives;
        with `state_layer`, the state at the context's last token (the same for every alternative)."""
        pairs = [pair for example in examples for pair in self.task.choice_contexts(example)]
        alternatives = len(pairs) // max(1, len(examples))
        scores, states = [], [np.zeros((0, self.model.config.hidden_size), np.float32)]
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            contexts = [self.tokenizer(context).input_ids for context, _ in chunk]
            continuations = [self.tokenizer(cont, add_special_tokens=False).input_ids for _, cont in chunk]
            sequences = [c + d for c, d in zip(contexts, continuations)]
            width = max(map(len, sequences))
            ids = torch.full((len(sequences), width), self.tokenizer.pad_token_id)
            attention = torch.zeros_like(ids)
            for row, sequence in enumerate(sequences):
                ids[row, : len(sequence)] = torch.tensor(sequence)
                attention[row, : len(sequence)] = 1
            output = self.model(input_ids=ids.to(self.device), attention_mask=attention.to(self.device), output_hidden_states=state_layer is not None)
            logprobs = torch.log_softmax(output.logits.float(), -1)
            for row, (context, continuation) in enumerate(zip(contexts, continuations)):
                positions = torch.arange(len(context) - 1, len(context) + len(continuation) - 1)
                token_logprobs = logprobs[row, positions, torch.tensor(continuation)]
                scores.append(token_logprobs.mean().item())
                if state_layer is not None and (start + row) % alternatives == 0:
                    states.append(output.hidden_states[state_layer][row, len(context) - 1].float().cpu().numpy()[None])
        per_example = np.array(scores, dtype=np.float64).reshape(len(examples), -1)
        per_example = np.exp(per_example - per_example.max(axis=1, keepdims=True))
        probs = (per_example / per_example.sum(axis=1, keepdims=True)).astype(np.float32)
        return probs, np.concatenate(states) if state_layer is not None else None

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

    @torch.no_grad()
    def hidden_states(self, texts: list[str], layer: int = -1, batch_size: int = 32) -> np.ndarray:
        """h_T(x): the layer's hidden states mean-pooled over the text's tokens, (n, hidden)."""
        out = [np.zeros((0, self.model.config.hidden_size), np.float32)]
        for start in range(0, len(texts), batch_size):
            batch = self._tokenize(texts[start : start + batch_size])
            out.append(_mean_pool(self.model(**batch, logits_to_keep=1, output_hidden_states=True).hidden_states[layer], batch["attention_mask"]))
        return np.concatenate(out)

    def _tokenize(self, texts: list[str]) -> dict:
        """Left-padded batch (so the last position is every row's last token) with matching positions."""
        self.tokenizer.padding_side = "left"
        batch = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=512)
        batch["position_ids"] = (batch["attention_mask"].cumsum(dim=1) - 1).clamp(min=0)
        return {key: value.to(self.device) for key, value in batch.items()}


def _mean_pool(states: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    weights = mask.unsqueeze(-1).to(states.dtype)
    return ((states * weights).sum(1) / weights.sum(1).clamp(min=1)).float().cpu().numpy()


def _mask_after_stop(token_ids: torch.Tensor, stop_ids: list[int]) -> torch.Tensor:
    """1 up to and including each row's first stop token, 0 after it."""
    is_stop = torch.isin(token_ids, torch.tensor(stop_ids, device=token_ids.device)).long()
    stops_before = torch.cumsum(is_stop, dim=1) - is_stop
    return (stops_before == 0).long()
