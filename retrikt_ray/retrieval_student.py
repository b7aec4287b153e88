"""The retrieval-aware student (docs/method.md, stage 5) and its losses.

For an input x: z = S(x) (mean-pooled, L2-normalised); the top-k store neighbours are weighted by
w_j = softmax_j(cos(z, key_j) / tau); p_ret = sum_j w_j q_j; p_head = softmax(W z);
p = lam * p_ret + (1 - lam) * p_head.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from copy import deepcopy
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .knowledge_store import KnowledgeStore
from .packed_encoder import PackedBert
from .packed_encoder import supports as packed_supports

PROB_FLOOR = 1e-8
# Embeddings searched in the store per FAISS call (and per retrieval forward) when predicting.
SEARCH_BATCH = 1024


def compute_dtype(requested: str, device: torch.device | str) -> torch.dtype:
    """`student.dtype` -> the student's compute dtype: a named one, or for `auto` bfloat16 where the hardware
    has bf16 matmuls (engine.hardware_class) and float32 elsewhere."""
    from .engine import hardware_class

    if requested != "auto":
        return getattr(torch, requested)
    bf16 = hardware_class(torch.device(device)) in ("cuda-bf16", "cpu-amx", "cpu-avx512-bf16")
    return torch.bfloat16 if bf16 else torch.float32


def encoder_fingerprint(encoder: torch.nn.Module) -> str:
    """Short hash of every parameter's name, shape, dtype and bytes: any training step changes it.

    All bytes are hashed rather than a sample, because a step can change only a few rows of a large
    tensor (the embeddings of the tokens in a batch, under plain SGD).
    """
    digest = hashlib.sha256()
    for name, parameter in encoder.named_parameters():
        tensor = parameter.detach().contiguous().reshape(-1)
        digest.update(f"{name}:{tuple(parameter.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.view(torch.uint8).cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


class RetrievalStudent(torch.nn.Module):
    """An HF encoder with a linear head, predicting from its head and from the store's neighbours."""

    def __init__(
        self,
        encoder,
        tokenizer,
        num_labels: int,
        k: int = 16,
        tau: float = 0.05,
        lam: float = 0.5,
        max_length: int = 64,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.head = torch.nn.Linear(encoder.config.hidden_size, num_labels)
        self.k = k
        self.tau = tau
        self.lam = lam
        self.max_length = max_length
        self.dtype = dtype
        # The encoder's weights in `dtype` for encoding without gradient, with the parameters' (id, version)
        # they were copied from. A plain dict, so that the copy is not registered as a submodule.
        self._inference_copy: dict = {}

    @classmethod
    def from_spec(cls, student_spec, num_labels: int, dtype: str | None = None) -> RetrievalStudent:
        """An untrained student: the spec's encoder (pretrained weights) and a fresh head, computing in
        `dtype` (default `student.dtype`). The stages before the student's embed in float32 (their
        embeddings decide which samples are kept and PPO's diversity bonus), so that their results depend
        neither on `student.dtype` nor on the hardware's bf16 units."""
        from .models import load_encoder

        encoder, tokenizer = load_encoder(student_spec.model, student_spec.trust_remote_code)
        s = student_spec
        dtype = compute_dtype(dtype or s.dtype, "cuda" if torch.cuda.is_available() else "cpu")
        return cls(encoder, tokenizer, num_labels, s.k, s.tau, s.lam, s.max_length, dtype)

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    @property
    def num_labels(self) -> int:
        return self.head.out_features

    # --------------------------------------------------------------------------------- encoding
    def encode(self, inputs: list[tuple[str, str | None]]) -> torch.Tensor:
        """L2-normalised mean-pooled float32 embeddings (B, hidden) with gradient: the training path.

        The matmuls run under autocast in the student's dtype (the weights stay float32). Pairs and single
        texts are tokenized separately (a tokenizer takes either a list of pairs or no second texts), then
        put back in input order.
        """
        singles = [i for i, (_, text_b) in enumerate(inputs) if text_b is None]
        pairs = [i for i, (_, text_b) in enumerate(inputs) if text_b is not None]
        z = torch.empty(len(inputs), self.encoder.config.hidden_size, device=self.device)
        for rows, with_pairs in ((singles, False), (pairs, True)):
            if rows:
                text_a = [inputs[i][0] for i in rows]
                text_b = [inputs[i][1] for i in rows] if with_pairs else None
                batch = self.tokenizer(
                    text_a, text_b, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
                ).to(self.device)
                autocast = self.dtype != torch.float32 and self._weights_dtype() == torch.float32
                with torch.autocast(self.device.type, dtype=self.dtype, enabled=autocast):
                    pooled = self._pooled(self.encoder, batch)
                z = z.index_copy(0, torch.tensor(rows, device=self.device), pooled)
        return z

    def embed(self, inputs: list[tuple[str, str | None]], batch_size: int = 64, progress: bool = False) -> torch.Tensor:
        """The fast path: embeddings of all inputs (N, hidden) float32 as `encode` gives them, without
        gradient, in eval mode: the encoder's weights in the student's dtype, inputs of similar length
        batched together, and for a BERT the packed forward (no padding outside attention)."""
        features = self.token_ids(inputs)
        order = np.argsort([len(feature["input_ids"]) for feature in features], kind="stable")
        z = torch.zeros(len(inputs), self.encoder.config.hidden_size, device=self.device)
        with _eval_mode(self), torch.no_grad():
            inference = self._inference_state()
            for start in tqdm(range(0, len(inputs), batch_size), desc="embed", disable=not progress):
                rows = order[start : start + batch_size]
                if inference["packed"] is not None:
                    pooled = inference["packed"].embed([features[i] for i in rows], self.device)
                else:
                    batch = self.tokenizer.pad([features[i] for i in rows], return_tensors="pt").to(self.device)
                    pooled = self._pooled(inference["encoder"], batch)
                z[torch.from_numpy(rows).to(self.device)] = pooled
        return z

    def embed_all(
        self, inputs: list[tuple[str, str | None]], batch_size: int = 64, progress: bool = False
    ) -> np.ndarray:
        """`embed` as a float32 numpy array (N, hidden)."""
        return self.embed(inputs, batch_size, progress).cpu().numpy().astype(np.float32, copy=False)

    def token_ids(self, inputs: list[tuple[str, str | None]]) -> list[dict]:
        """Each input's token ids (truncated, unpadded), in input order; singles and pairs tokenized apart."""
        features: list[dict] = [{}] * len(inputs)
        for with_pairs in (False, True):
            rows = [i for i, (_, text_b) in enumerate(inputs) if (text_b is not None) == with_pairs]
            if rows:
                text_a = [inputs[i][0] for i in rows]
                text_b = [inputs[i][1] for i in rows] if with_pairs else None
                encoded = self.tokenizer(text_a, text_b, truncation=True, max_length=self.max_length)
                for position, row in enumerate(rows):
                    features[row] = {name: values[position] for name, values in encoded.items()}
        return features

    @staticmethod
    def _pooled(encoder, batch) -> torch.Tensor:
        hidden = encoder(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
        return F.normalize(pooled, dim=-1)

    def _weights_dtype(self) -> torch.dtype:
        return next(self.encoder.parameters()).dtype

    def _inference_encoder(self) -> torch.nn.Module:
        """The encoder with its weights in the student's dtype (the encoder itself when they already are)."""
        return self._inference_state()["encoder"]

    def _inference_state(self) -> dict:
        """The encoder in the compute dtype and, for a BERT, its packed forward (packed_encoder.py): the
        encoder itself or a copy, made again whenever a parameter has changed since (an optimiser step bumps
        versions)."""
        state = tuple((id(parameter), parameter._version) for parameter in self.encoder.parameters())
        if self._inference_copy.get("state") != state:
            self._inference_copy.clear()  # free the old copy before making the new one
            encoder = self.encoder
            if self._weights_dtype() != self.dtype:
                encoder = deepcopy(self.encoder).to(self.dtype).eval()
                encoder.requires_grad_(False)
            packed = PackedBert(encoder) if packed_supports(encoder) else None
            self._inference_copy.update(state=state, encoder=encoder, packed=packed)
        return self._inference_copy

    # ------------------------------------------------------------------------------- prediction
    def head_probs(self, z: torch.Tensor) -> torch.Tensor:
        # The head may be bf16/fp16 (DeepSpeed training precision); probabilities are float32.
        return torch.softmax(self.head(z.to(self.head.weight.dtype)).float(), dim=-1)

    def retrieval_probs(
        self, z: torch.Tensor, store: KnowledgeStore, exclude: np.ndarray | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(p_ret (B, C), weights (B, k), ids (B, k)) from the store's top-k neighbours of z.

        FAISS only picks the neighbours; their cosines are recomputed in torch so that the gradient
        reaches z. Padding ids (-1, a store smaller than k) get weight 0.
        """
        _, ids = store.search(z.detach().float().cpu().numpy(), self.k, exclude)
        rows = np.maximum(ids, 0)
        keys = torch.from_numpy(store.keys[rows]).to(device=z.device, dtype=z.dtype)
        soft_labels = torch.from_numpy(store.soft_labels[rows]).to(device=z.device, dtype=z.dtype)
        ids = torch.from_numpy(ids).to(z.device)
        cosines = torch.einsum("bd,bkd->bk", F.normalize(z, dim=-1), keys)
        weights = torch.softmax((cosines / self.tau).masked_fill(ids < 0, float("-inf")), dim=-1)
        p_ret = torch.einsum("bk,bkc->bc", weights, soft_labels)
        return p_ret, weights, ids

    def forward(self, z: torch.Tensor, store: KnowledgeStore, exclude: np.ndarray | None = None) -> dict:
        p_ret, weights, ids = self.retrieval_probs(z, store, exclude)
        p_head = self.head_probs(z)
        p = self.lam * p_ret + (1 - self.lam) * p_head
        return {"p": p, "p_ret": p_ret, "p_head": p_head, "weights": weights, "ids": ids}

    def predict(
        self, inputs: list[tuple[str, str | None]], store: KnowledgeStore, batch_size: int = 64
    ) -> dict[str, np.ndarray]:
        """p, p_ret and p_head (each (N, C) float32) for all inputs, without gradient, in eval mode."""
        parts = {name: [np.zeros((0, self.num_labels), dtype=np.float32)] for name in ("p", "p_ret", "p_head")}
        z = self.embed(inputs, batch_size)
        with _eval_mode(self), torch.no_grad():
            for start in range(0, len(inputs), SEARCH_BATCH):
                out = self(z[start : start + SEARCH_BATCH], store)
                for name, chunks in parts.items():
                    chunks.append(out[name].float().cpu().numpy())
        return {name: np.concatenate(chunks) for name, chunks in parts.items()}

    # ---------------------------------------------------------------------------------- on disk
    def save(self, folder) -> None:
        """folder/encoder (HF encoder and tokenizer), student.safetensors (head), student.json."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.encoder.save_pretrained(folder / "encoder")
        self.tokenizer.save_pretrained(folder / "encoder")
        head = {name: tensor.detach().cpu().contiguous() for name, tensor in self.head.state_dict().items()}
        save_file(head, folder / "student.safetensors")
        config = {
            "num_labels": self.num_labels,
            "k": self.k,
            "tau": self.tau,
            "lam": self.lam,
            "max_length": self.max_length,
        }
        (folder / "student.json").write_text(json.dumps(config, indent=2) + "\n")

    @classmethod
    def load(cls, folder, trust_remote_code: bool = False, dtype: str = "float32") -> RetrievalStudent:
        """A saved student, on the CPU, computing in `dtype` (`student.dtype`: a name or auto)."""
        from transformers import AutoModel, AutoTokenizer

        folder = Path(folder)
        config = json.loads((folder / "student.json").read_text())
        encoder = AutoModel.from_pretrained(folder / "encoder", trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(folder / "encoder", trust_remote_code=trust_remote_code)
        student = cls(encoder, tokenizer, **config, dtype=compute_dtype(dtype, "cpu"))
        student.head.load_state_dict(load_file(folder / "student.safetensors"))
        return student


@contextmanager
def _eval_mode(module: torch.nn.Module):
    """Eval mode inside the block; every submodule's own mode restored after."""
    modes = {sub: sub.training for sub in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for sub, training in modes.items():
            sub.train(training)


# ------------------------------------------------------------------------------------------ losses
def kd_loss(q_teacher: torch.Tensor, p: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over rows of KL(q || p), with 0 log 0 = 0 and p floored at 1e-8; with `weights`, their weighted mean
    (0 when every weight is 0)."""
    q_teacher = q_teacher.to(device=p.device, dtype=p.dtype)
    kl = (torch.xlogy(q_teacher, q_teacher) - q_teacher * torch.log(p.clamp_min(PROB_FLOOR))).sum(dim=-1)
    if weights is None:
        return kl.mean()
    weights = weights.to(device=p.device, dtype=p.dtype)
    return (weights * kl).sum() / weights.sum().clamp_min(PROB_FLOOR)


def confidence_weights(q_teacher: torch.Tensor) -> torch.Tensor:
    """Per row, how far the soft label is from uniform: (max q - 1/C) / (1 - 1/C), 0 at uniform, 1 when one-hot."""
    chance = 1.0 / q_teacher.shape[-1]
    return ((q_teacher.max(dim=-1).values - chance) / (1.0 - chance)).clamp_min(0.0)


def ce_loss(targets: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of the gold labels under p (floored at 1e-8)."""
    targets = torch.as_tensor(targets, dtype=torch.long, device=p.device)
    gold = p.gather(1, targets.unsqueeze(1)).squeeze(1)
    return -torch.log(gold.clamp_min(PROB_FLOOR)).mean()


def rank_loss(h_teacher: torch.Tensor, z: torch.Tensor, tau_teacher: float, tau_student: float) -> torch.Tensor:
    """Listwise ranking distillation (RankCSE), mean over i of
    KL(softmax_{j != i}(cos(h_i, h_j) / tau_T) || softmax_{j != i}(cos(z_i, z_j) / tau_S)).

    A batch of one has no pairs to rank: its loss is 0.
    """
    size = z.shape[0]
    if size < 2:
        return z.sum() * 0.0
    h = F.normalize(h_teacher.to(device=z.device, dtype=torch.float32), dim=-1)
    zs = F.normalize(z.float(), dim=-1)
    others = ~torch.eye(size, dtype=torch.bool, device=z.device)
    return _listwise_kl(h @ h.T, zs @ zs.T, others, tau_teacher, tau_student)


def store_rank_loss(
    h_rows: torch.Tensor,
    h_lists: torch.Tensor,
    z: torch.Tensor,
    keys_lists: torch.Tensor,
    valid: torch.Tensor,
    tau_teacher: float,
    tau_student: float,
) -> torch.Tensor:
    """Listwise ranking distillation over store lists: row i's list is given by its members' teacher
    states h_lists[i] (L, d) and store keys keys_lists[i] (L, d); mean over i of
    KL(softmax_j(cos(h_i, h_ij) / tau_T) || softmax_j(cos(z_i, key_ij) / tau_S)) over the valid members.

    The student scores a list the way it retrieves: its embedding against the store's keys.
    """
    h = F.normalize(h_rows.to(device=z.device, dtype=torch.float32), dim=-1)
    members = F.normalize(h_lists.to(device=z.device, dtype=torch.float32), dim=-1)
    keys = keys_lists.to(device=z.device, dtype=torch.float32)
    zs = F.normalize(z.float(), dim=-1)
    teacher = torch.einsum("bd,bld->bl", h, members)
    student = torch.einsum("bd,bld->bl", zs, keys)
    return _listwise_kl(teacher, student, valid.to(z.device), tau_teacher, tau_student)


def _listwise_kl(
    teacher: torch.Tensor, student: torch.Tensor, valid: torch.Tensor, tau_teacher: float, tau_student: float
) -> torch.Tensor:
    """Mean over rows of KL(softmax(teacher / tau_T) || softmax(student / tau_S)), both over the row's
    valid entries; a row with no valid entry adds 0."""
    with torch.no_grad():
        q = torch.softmax((teacher / tau_teacher).masked_fill(~valid, float("-inf")), dim=-1).nan_to_num(0.0)
    log_p = torch.log_softmax((student / tau_student).masked_fill(~valid, float("-inf")), dim=-1)
    # invalid entries have q = 0 and log p = -inf; zeroing log p there keeps 0 * -inf out of the sum
    kl = torch.xlogy(q, q) - q * log_p.masked_fill(~valid, 0.0)
    return kl.sum() / student.shape[0]


def teacher_neighbours(states: torch.Tensor, count: int, chunk: int = 1024) -> np.ndarray:
    """(N, min(count, N - 1)) ids of each row's nearest other rows by cosine of its teacher state."""
    count = min(count, states.shape[0] - 1)
    normed = F.normalize(states.float(), dim=-1)
    parts = [np.zeros((0, count), dtype=np.int64)]
    for start in range(0, normed.shape[0], chunk):
        scores = normed[start : start + chunk] @ normed.T
        scores[torch.arange(scores.shape[0]), torch.arange(start, start + scores.shape[0])] = float("-inf")
        parts.append(scores.topk(count, dim=-1).indices.cpu().numpy())
    return np.concatenate(parts)


def predict_examples(
    task, student: RetrievalStudent, store: KnowledgeStore, examples, batch_size: int = 64
) -> dict[str, np.ndarray]:
    """Task-level p, p_ret and p_head (each (n, num_labels)) for examples: what evaluation and serving return.

    Choice tasks score each alternative's row as right or wrong; the alternatives' p(right) are
    renormalised over the example's alternatives.
    """
    rows = [task.student_inputs(example) for example in examples]
    flat = student.predict([row for example_rows in rows for row in example_rows], store, batch_size)
    return {name: example_probs(task, probs, len(examples)) for name, probs in flat.items()}


def example_probs(task, row_probs: np.ndarray, count: int) -> np.ndarray:
    """Task-level (count, num_labels) probabilities from the student rows' (rows, classes) probabilities:
    the rows themselves, or each alternative's p(right) renormalised over its example's alternatives."""
    if task.kind == "classification":
        return row_probs
    right = row_probs[:, 1].reshape(count, -1)
    return (right / np.clip(right.sum(axis=1, keepdims=True), 1e-12, None)).astype(np.float32)


def predict_neighbors(
    task, student: RetrievalStudent, store: KnowledgeStore, examples, batch_size: int = 64
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per example, the store rows that each of its student rows retrieved: (ids, weights), each (rows, k).

    One student row for a classification task, one per alternative for a choice task. Id -1 (weight 0)
    pads a store smaller than k. Serving returns these as an example's neighbours.
    """
    rows = [task.student_inputs(example) for example in examples]
    flat = [row for example_rows in rows for row in example_rows]
    ids, weights = [np.zeros((0, student.k), dtype=np.int64)], [np.zeros((0, student.k), dtype=np.float32)]
    z = student.embed(flat, batch_size)
    with _eval_mode(student), torch.no_grad():
        for start in range(0, len(flat), SEARCH_BATCH):
            _, batch_weights, batch_ids = student.retrieval_probs(z[start : start + SEARCH_BATCH], store)
            ids.append(batch_ids.cpu().numpy())
            weights.append(batch_weights.float().cpu().numpy())
    ids, weights = np.concatenate(ids), np.concatenate(weights)
    bounds = np.cumsum([0] + [len(example_rows) for example_rows in rows])
    return [(ids[start:end], weights[start:end]) for start, end in zip(bounds[:-1], bounds[1:])]
