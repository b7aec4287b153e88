"""Stage 5: train the retrieval-aware student inside Ray Train.

For a store row x: z = S(x), its k neighbours in the store (itself excluded), w = softmax(cos/tau),
p = lam * sum_j w_j q_j + (1 - lam) * softmax(W z). Loss = L_kd (KL(q_T || p) over store rows)
+ a * L_ce (gold few-shot rows, oversampled into every batch) + b * L_rank (listwise distillation of
the teacher's similarities, cosines of the centred h_T, into the student's: over the batch, or over each
row's teacher-nearest and retrieved store rows, `student.rank_lists`). Keys are re-encoded after every epoch; the final
store (keys of the trained encoder) is saved beside the student, and that pair is what is served.
Before training, the store's soft labels are retrieved for the labelled examples; when they answer them
no better than their majority label, the student uses its head alone (`student.retrieval_gate`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..artifacts import StageResult, StageRun
from ..config import JobSpec
from ..metrics import accuracy, clearly_above_majority, majority_share
from ..stage_contract import Stage
from ..tasks import Example, Task, load_few_shot
from ..training import LoopState


def run(spec: JobSpec, stage: StageRun) -> StageResult:
    from ..training import fit

    metrics = fit(train_loop, {"store_dir": str(stage.inputs["store"].resolve())}, spec, stage, spec.student.batch_size)
    history = metrics["history"]
    last = history[-1] if history else {}
    return StageResult(
        metrics=metrics,
        counts={"store_rows": metrics["store_rows"], "gold_rows": metrics["gold_rows"]},
        summary=f"{len(history)} epochs; last loss {last.get('loss', float('nan')):.3f} "
        f"(kd {last.get('kd', float('nan')):.3f}, ce {last.get('ce', float('nan')):.3f}, "
        f"rank {last.get('rank', float('nan')):.3f})"
        + (
            f"; {describe_retrieval_on_labelled(metrics['retrieval_labelled'], spec)}"
            if metrics.get("retrieval_labelled")
            else ""
        ),
    )


STAGE = Stage(
    name="student",
    run=run,
    inputs=("store",),
    reads=("task", "data.train_file", "data.shots", "data.seed", "student"),
    files=("train",),
    trains=True,
)


def retrieval_on_labelled(task: Task, student, store, few_shot: list[Example]) -> dict[str, float | int | bool]:
    """How well the store's soft labels, retrieved by the student as it is, label the user's labelled
    examples (none of them is a store row), beside the share of their most common label."""
    from ..retrieval_student import predict_examples

    labels = np.array([example.label for example in few_shot])
    measured = {
        "retrieval_accuracy": accuracy(labels, predict_examples(task, student, store, few_shot)["p_ret"]),
        "majority_share": majority_share(labels),
        "examples": len(labels),
    }
    return {
        **measured,
        "informative": clearly_above_majority(
            measured["retrieval_accuracy"], measured["majority_share"], measured["examples"]
        ),
    }


def gates_retrieval(measured: dict, spec: JobSpec) -> bool:
    """Whether the student drops retrieval (lam = 0): the retrieved soft labels carry no task signal."""
    return spec.student.retrieval_gate and not measured["informative"]


def describe_retrieval_on_labelled(measured: dict, spec: JobSpec) -> str:
    line = (
        "the store's soft labels, retrieved by the untrained student, "
        f"label {measured['retrieval_accuracy']:.0%} of the"
        f" {measured['examples']} labelled examples right (majority label {measured['majority_share']:.0%})"
    )
    if gates_retrieval(measured, spec):
        line += (
            f": no better than always answering the majority label, so the student trains and predicts with its head"
            f" alone (lam 0, not {spec.student.lam:g}); student.retrieval_gate: false keeps retrieval"
        )
    return line


class StudentStep(torch.nn.Module):
    """One forward of training: store rows (self excluded) and gold rows, through the data-parallel
    wrapper so gradients are synchronised across workers."""

    def __init__(self, student):
        super().__init__()
        self.student = student

    def forward(self, store, rows, row_ids, gold_rows):
        z = self.student.encode(rows)
        out = self.student(z, store, exclude=row_ids)
        gold = self.student(self.student.encode(gold_rows), store) if gold_rows else None
        return z, out, gold


def rank_lists(teacher_nearest: np.ndarray, retrieved: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's L_rank list for `student.rank_lists: store`: its teacher-nearest store rows, then the
    rows the student retrieved for it. Returns (ids, valid), both (B, L + k): padding (-1) and repeats
    of an id earlier in the row are invalid, and their ids are set to 0 so they can index the store."""
    members = np.concatenate([teacher_nearest, retrieved], axis=1)
    valid = members >= 0
    for row in range(members.shape[0]):
        _, first = np.unique(members[row], return_index=True)
        repeated = np.ones(members.shape[1], dtype=bool)
        repeated[first] = False
        valid[row] &= ~repeated
    return np.where(valid, members, 0), valid


# Batches per group of `length_grouped`: 8 cut the demo store's padding from 1.69x its tokens to 1.11x.
LENGTH_GROUP_BATCHES = 8


def length_grouped(ids: list[int], token_counts: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[int]:
    """ids reordered so that each batch holds rows of similar length (less padding, the same rows per
    epoch), as HF Trainer's `group_by_length`: groups of LENGTH_GROUP_BATCHES batches in the shuffled order,
    each sorted by length and cut into batches; the full batches then in an order drawn from `rng` (so that
    the epoch does not run from long rows to short ones), a last partial batch last."""
    size = LENGTH_GROUP_BATCHES * batch_size
    batches = []
    for start in range(0, len(ids), size):
        group = sorted(ids[start : start + size], key=lambda row: -token_counts[row])
        batches += [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
    full = [batch for batch in batches if len(batch) == batch_size]
    partial = [batch for batch in batches if len(batch) < batch_size]
    return [row for index in rng.permutation(len(full)) for row in full[index]] + [row for b in partial for row in b]


@dataclass
class StudentLoop(LoopState):
    """The student loop's state between steps, besides the engine's: the generator that draws each epoch's
    permutation and the gold rows of every batch, this rank's rows of the running epoch in their order, the running
    epoch's loss totals and the finished epochs' history, the rows seen in the first epoch, and the store's keys as
    re-encoded at the end of the last finished epoch (None before the first)."""

    generator: np.random.Generator
    mine: list[int] = field(default_factory=list)
    totals: dict[str, float] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    seen: set[int] = field(default_factory=set)
    keys: tuple[np.ndarray, str] | None = None


def kd_term(settings, soft_rows, p):
    """L_kd of a batch: KL from each row's soft label (bootstrapped with the student's own prediction when
    student.kd_bootstrap > 0) to the student's p, weighed as student.kd_weighting says."""
    from ..retrieval_student import confidence_weights, kd_loss

    target = soft_rows
    if settings.kd_bootstrap:
        target = (1 - settings.kd_bootstrap) * soft_rows + settings.kd_bootstrap * p.detach().to(soft_rows.dtype)
    weights = confidence_weights(soft_rows) if settings.kd_weighting == "confidence" else None
    return kd_loss(target, p, weights)


def train_loop(config: dict) -> None:
    from tqdm import tqdm

    from ..knowledge_store import KnowledgeStore
    from ..retrieval_student import (
        RetrievalStudent,
        ce_loss,
        encoder_fingerprint,
        rank_loss,
        store_rank_loss,
        teacher_neighbours,
    )
    from ..training import Checkpoints, Optimiser, report_outputs, set_threads, shard, worker_context, worker_spec

    spec = worker_spec(config)
    settings = spec.student
    set_threads(spec.resources, spec.resources.cpus_per_worker)
    rank, world, device = worker_context()
    torch.manual_seed(settings.seed)
    task, few_shot = load_few_shot(spec)
    store = KnowledgeStore.load(config["store_dir"])
    student = RetrievalStudent.from_spec(settings, task.student_num_labels).to(device)
    retrieval_labelled = retrieval_on_labelled(task, student, store, few_shot) if settings.lam > 0 else None
    if retrieval_labelled is not None:
        if rank == 0:
            print(f"[student] {describe_retrieval_on_labelled(retrieval_labelled, spec)}", flush=True)
        if gates_retrieval(retrieval_labelled, spec):
            student.lam = 0.0
    gold_inputs = [row for example in few_shot for row in task.student_inputs(example)]
    gold_targets = [target for example in few_shot for target in task.row_targets(example)]
    head = list(student.head.parameters())
    head_ids = {id(parameter) for parameter in head}
    groups = [
        {
            "params": [p for p in student.parameters() if id(p) not in head_ids],
            "lr": settings.lr,
            "weight_decay": settings.weight_decay,
        },
        {"params": head, "lr": settings.head_lr, "weight_decay": 0.0},
    ]
    optimiser = Optimiser(StudentStep(student), groups, config["deepspeed"])
    checkpoints = Checkpoints(optimiser, spec.resources.checkpoint_every_steps, rank)
    batch_size = optimiser.micro_batch_size

    soft = torch.from_numpy(store.soft_labels).to(device)
    states = None
    if store.teacher_states is not None:
        # A decoder's states share one large direction: raw cosines are all near 1 (0.985 on average for
        # SmolLM2's answer states on SST-2), so softmax(cos / tau_T) is nearly flat and L_rank would teach
        # the student to push every pair apart. Centred on the store's mean, the targets rank by content.
        states = torch.from_numpy(store.teacher_states - store.teacher_states.mean(axis=0)).to(device)
    nearest = (
        teacher_neighbours(states, settings.rank_list_size)
        if states is not None and settings.b > 0 and settings.rank_lists == "store"
        else None
    )
    token_counts = (
        np.array([len(feature["input_ids"]) for feature in student.token_ids(store.inputs)])
        if settings.length_grouped_batches
        else None
    )
    steps = math.ceil(len(store.inputs) / (batch_size * world))
    state = StudentLoop(generator=np.random.default_rng(settings.seed))
    position = 0
    resumed = checkpoints.restore()
    if resumed is not None:
        state.load_state_dict(resumed)
        if state.keys is not None:
            store = store.with_keys(*state.keys)
        position = checkpoints.resumed_from
    bar = tqdm(total=settings.epochs * steps, initial=position, desc="student", disable=rank != 0)
    loop_started, first_position = time.perf_counter(), position
    student.train()
    while position < settings.epochs * steps:
        epoch, step = divmod(position, steps)
        if step == 0:
            # Same permutation on every rank (same seed), then each rank takes its own slice of it.
            state.mine = shard(list(state.generator.permutation(len(store.inputs))), rank, world)
            if settings.length_grouped_batches:
                # Its own draws (seed, epoch, rank), so that the loop's generator stays the same on every rank.
                batch_order = np.random.default_rng([settings.seed, epoch, rank])
                state.mine = length_grouped(state.mine, token_counts, batch_size, batch_order)
            state.totals = {"loss": 0.0, "kd": 0.0, "ce": 0.0, "rank": 0.0}
        ids = np.array([state.mine[(step * batch_size + i) % len(state.mine)] for i in range(batch_size)])
        if epoch == 0:  # one pass: each rank's slice of the permutation
            state.seen.update(int(i) for i in ids)
        gold = (
            state.generator.choice(len(gold_inputs), size=min(settings.gold_per_batch, len(gold_inputs)), replace=False)
            if settings.gold_per_batch and settings.a > 0
            else []
        )
        z, out, gold_out = optimiser.model(store, [store.inputs[i] for i in ids], ids, [gold_inputs[i] for i in gold])
        l_kd = kd_term(settings, soft[ids], out["p"])
        l_ce = (
            ce_loss(torch.tensor([gold_targets[i] for i in gold], device=device), gold_out["p"])
            if gold_out is not None
            else z.new_zeros(())
        )
        if states is None or settings.b == 0:
            l_rank = z.new_zeros(())
        elif nearest is None:
            l_rank = rank_loss(states[ids], z, settings.tau_teacher, settings.tau_student)
        else:
            members, valid = rank_lists(nearest[ids], out["ids"].cpu().numpy())
            rows = torch.from_numpy(members)
            keys = torch.from_numpy(store.keys[members])
            l_rank = store_rank_loss(
                states[ids], states[rows], z, keys, torch.from_numpy(valid), settings.tau_teacher, settings.tau_student
            )
        loss = l_kd + settings.a * l_ce + settings.b * l_rank
        optimiser.step(loss)
        for key, value in (("loss", loss), ("kd", l_kd), ("ce", l_ce), ("rank", l_rank)):
            state.totals[key] += value.item() / steps
        position += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step == steps - 1:
            store = store.with_keys(
                student.embed_all(store.inputs, batch_size=spec.store.encode_batch_size),
                encoder_fingerprint(student.encoder),
            )
            state.keys = (store.keys, store.encoder_fingerprint)
            state.history.append({"epoch": epoch, **state.totals})
        if checkpoints.due(position):
            checkpoints.save(position, state.state_dict(), {"loss": loss.item()})
    bar.close()
    loop_seconds = time.perf_counter() - loop_started

    def write(folder: Path) -> None:
        student.save(folder / "model")
        served_store = store
        if student.head.weight.dtype != torch.float32:
            # Trained in bf16/fp16: served in float32, so the keys come from the float32 encoder.
            served = RetrievalStudent.load(folder / "model", settings.trust_remote_code, settings.dtype).float()
            served.save(folder / "model")
            keys = served.embed_all(store.inputs, batch_size=spec.store.encode_batch_size)
            served_store = store.with_keys(keys, encoder_fingerprint(served.encoder))
        served_store.save(folder / "store")

    history = state.history
    metrics = {
        "history": history,
        "store_rows": len(store.inputs),
        "gold_rows": len(gold_inputs),
        "steps": position,
        "resumed_from_step": checkpoints.resumed_from,
        "final_loss": history[-1]["loss"] if history else None,
        "retrieval_labelled": retrieval_labelled,
        "lam": student.lam,
        "compute_dtype": str(student.dtype).removeprefix("torch."),
        # The training loop alone (steps and re-encoding the keys), without start-up, loading and saving.
        "loop_seconds": loop_seconds,
        "loop_examples_per_second": (position - first_position) * batch_size * world / loop_seconds
        if loop_seconds > 0
        else None,
    }
    report_outputs(metrics, write, optimiser, state.seen)
