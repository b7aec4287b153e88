"""Stage 2: PPO on the soft prompt (this project's own PPO; TRL has none for prompt tuning).

Policy = frozen teacher + trainable prompt P (from stage 1; with `per_label_prompt`, one copy per
label, saved as (labels, m, hidden)); reference = the same teacher with the stage-1 prompt, so the
teacher's weights are shared, never copied. A value head (one linear layer on
the last hidden state) is the critic. Sequence reward per sample:
  alpha * log p_C(y | x)  +  beta * (1 - max cos(e(x), B_y))  -  gamma * [malformed]  (+ w * s(x))
with a per-token KL penalty to the reference, GAE, the clipped surrogate and a clipped value loss.
The student term s (`ppo.student_reward`, off by default) comes from a linear head on the frozen student
encoder that is refitted on the memory bank's samples after every update (rl.StudentHead, docs/method.md).
Every reward term is logged per update; `ppo_curves.png` plots them. What PPO changed is measured on
fixed draws (`eval_samples_per_label` per label, the same seeds) from the stage-1 and the final prompt:
the manifest's `before` and `after`. When the final prompt scores a lower mean reward on them than the
stage-1 prompt, the stage passes on the stage-1 prompt and says so (`ppo.keep_stage1_when_worse`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..artifacts import StageResult, StageRun
from ..config import TEACHER_CLASSIFIER, JobSpec
from ..metrics import accuracy, clearly_above_majority, majority_share
from ..stage_contract import EMBEDDING_ONLY, Stage
from ..tasks import load_few_shot
from ..training import LoopState

if TYPE_CHECKING:
    from ..rl import MemoryBank, StudentHead

# log p_C is floored so that a valid but off-label sample never scores below a malformed one.
CONSISTENCY_FLOOR = 1e-2
# Seeds of the fixed draws that measure a prompt, apart from every rollout seed (1_000_003 * update + ...).
EVAL_SEED = 7
SOFT_PROMPT = "soft_prompt.safetensors"
# Below this share of the stage-1 prompt's fixed draws parsing, PPO has too few valid samples to learn from.
FEW_PARSED_DRAWS = 0.25


def run(spec: JobSpec, stage: StageRun) -> StageResult:
    import shutil

    from safetensors.torch import load_file

    from ..training import fit

    initial = stage.inputs["prompt"] / SOFT_PROMPT
    if not spec.ppo.enabled or spec.ppo.updates == 0:
        shutil.copy2(initial, stage.dir / SOFT_PROMPT)
        return StageResult(metrics={"enabled": False}, summary="PPO off: the stage-1 prompt is used as is")
    prompt = load_file(str(initial))["soft_prompt"]
    metrics = fit(train_loop, {"initial_prompt": prompt.tolist()}, spec, stage, spec.ppo.minibatch_size)
    plot_curves(metrics["history"], stage.dir / "ppo_curves.png")
    before, after = metrics["before"], metrics["after"]
    kept = f"; {describe_kept_prompt(before, after, spec)}" if metrics["kept_stage1_prompt"] else ""
    if spec.ppo.student_reward != "off":
        term = f"{before['student_term']:.3f} -> {after['student_term']:.3f}"
        kept = f", student term ({spec.ppo.student_reward}) {term}{kept}"
    return StageResult(
        metrics=metrics,
        counts={"rollouts": metrics["rollouts"]},
        summary=(
            f"label consistency {before['consistency_rate']:.2f} -> {after['consistency_rate']:.2f}, "
            f"distinct-2 {before['distinct_2']:.2f} -> {after['distinct_2']:.2f}, "
            f"draws parsed {before['valid_rate']:.2f} -> {after['valid_rate']:.2f}{kept}; "
            f"{describe_teacher_on_labelled(metrics)}"
        ),
    )


STAGE = Stage(
    name="ppo",
    run=run,
    inputs=("prompt",),
    reads=(
        "task",
        "data.train_file",
        "data.shots",
        "data.seed",
        *TEACHER_CLASSIFIER,
        "student.model",
        "student.max_length",
        "student.trust_remote_code",
        "generate.min_words",
        "generate.max_words",
        "ppo",
    ),
    files=("train",),
    trains=True,
    ignores=EMBEDDING_ONLY,
)


def keeps_stage1_prompt(before: dict[str, float], after: dict[str, float], spec: JobSpec) -> bool:
    """Whether PPO passes on the stage-1 prompt: the final one scored a lower mean reward on the same fixed draws."""
    return spec.ppo.keep_stage1_when_worse and after["reward"] < before["reward"]


def describe_kept_prompt(before: dict[str, float], after: dict[str, float], spec: JobSpec) -> str:
    return (
        "the stage-1 prompt is kept: the final one scored a lower mean reward on the fixed draws "
        f"({after['reward']:.3f} against"
        f" {before['reward']:.3f}; parsed {after['valid_rate']:.2f} against {before['valid_rate']:.2f}); smaller steps"
        f" (ppo.lr, now {spec.ppo.lr:g}) may let PPO improve on it"
    )


def teacher_on_labelled(probs: np.ndarray, labels: np.ndarray) -> dict[str, float | int]:
    """How well the calibrated teacher classifier p_C, the labeller of the reward and of the store,
    labels the user's labelled examples, beside the share of their most common label."""
    return {
        "teacher_accuracy_labelled": accuracy(labels, probs),
        "labelled_majority_share": majority_share(labels),
        "labelled_examples": len(labels),
    }


def describe_teacher_on_labelled(measured: dict[str, float | int]) -> str:
    """One line; it warns when the teacher is not clearly better than always answering the majority
    label: within one standard error of that guesser's accuracy on this many examples."""
    accuracy, majority, count = (
        measured["teacher_accuracy_labelled"],
        measured["labelled_majority_share"],
        measured["labelled_examples"],
    )
    line = f"the teacher labels {accuracy:.0%} of the {count} labelled examples right (majority label {majority:.0%})"
    if not clearly_above_majority(accuracy, majority, count):
        line += (
            ": not clearly better than always answering the majority label, so the soft labels it gives the store"
            " carry little task signal; a larger teacher may be needed"
        )
    return line


def describe_stage1_draws(before: dict[str, float], draws: int, spec: JobSpec) -> str:
    """One line on how many of the stage-1 prompt's fixed draws parse; when few do, it says what to change:
    every draw that does not parse scores the same penalty, so PPO cannot tell them apart."""
    parsed = round(before["valid_rate"] * draws)
    line = f"the stage-1 prompt writes {parsed} of {draws} fixed draws in the task's template"
    if before["valid_rate"] < FEW_PARSED_DRAWS:
        line += (
            ": PPO learns little from draws that do not parse; train the stage-1 prompt longer"
            f" (prompt.epochs, now {spec.prompt.epochs}) or give the teacher more tokens"
            f" (ppo.max_new_tokens, now {spec.ppo.max_new_tokens})"
        )
    return line


class PromptPolicy(torch.nn.Module):
    """The trainable part: the soft prompt and the value head. The teacher is passed in, not owned,
    so data-parallel wrappers never replicate or synchronise its frozen weights."""

    def __init__(self, initial_prompt: torch.Tensor, labels: int | None = None):
        """`labels`: one copy of `initial_prompt` (m, hidden) per label; None: a single shared prompt."""
        super().__init__()
        prompt = initial_prompt if labels is None else initial_prompt.expand(labels, -1, -1)
        self.soft_prompt = torch.nn.Parameter(prompt.clone())
        self.value_head = torch.nn.Linear(initial_prompt.shape[-1], 1)
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.zeros_(self.value_head.bias)

    def forward(self, teacher, label: int, token_ids: torch.Tensor):
        logprobs, hidden = teacher.continuation_outputs(label, token_ids, self.soft_prompt)
        return logprobs, self.value_head(hidden.to(self.value_head.weight.dtype)).float().squeeze(-1)


class RewardModel:
    """Scores samples: calibrated label consistency, diversity against a per-label memory bank, form, and with
    `ppo.student_reward` the student term, from a student head (`student`) that `refresh_student` refits on the
    bank's samples after every update."""

    def __init__(self, spec: JobSpec, teacher, task, encoder, reference_mean: np.ndarray, labelled=None):
        """`labelled`: the labelled examples, which the student term's head is measured on (needed when on)."""
        from ..rl import MemoryBank, StudentHead

        self.spec, self.teacher, self.task, self.encoder = spec, teacher, task, encoder
        self.reference_mean = reference_mean
        self.bank = MemoryBank(task.num_labels, spec.ppo.memory_bank_size)
        self.student: StudentHead | None = None
        if spec.ppo.student_reward != "off":
            self.student = StudentHead(
                encoder.encoder.config.hidden_size, task.student_num_labels, task.num_labels, spec.ppo.memory_bank_size
            )
            rows = [task.student_inputs(example) for example in labelled]
            self.labelled = torch.from_numpy(encoder.embed_all([row for example in rows for row in example]))
            self.labelled_targets = torch.tensor([t for example in labelled for t in task.row_targets(example)])

    def parse(self, text: str, label: int):
        words = len(text.split())
        if not self.spec.generate.min_words <= words <= self.spec.generate.max_words:
            return None
        return self.task.parse_generation(text, label)

    def score(self, label: int, texts: list[str], remember: bool = True) -> dict[str, np.ndarray]:
        """Reward terms of each text; `remember`: add the valid ones to the label's memory bank."""
        from ..rl import diversity_reward, max_cosine_to_others
        from ..teacher import calibrate

        settings = self.spec.ppo
        parsed = [self.parse(text, label) for text in texts]
        valid = np.array([example is not None for example in parsed])
        consistency = np.full(len(texts), math.log(CONSISTENCY_FLOOR))
        agrees = np.zeros(len(texts), dtype=bool)
        diversity = np.zeros(len(texts))
        max_cos = np.full(len(texts), np.nan)
        embeddings = np.zeros((0, 0), dtype=np.float32)
        student = np.zeros(len(texts))
        kept = [example for example in parsed if example is not None]
        if kept:
            raw = self.teacher.classify_raw(kept)
            probs = calibrate(raw, self.reference_mean)
            consistency[valid] = np.log(np.clip(probs[:, label], CONSISTENCY_FLOOR, 1.0))
            if settings.malformed_consistency == "valid_mean":
                consistency[~valid] = consistency[valid].mean()
            agrees[valid] = probs.argmax(axis=1) == label
            embeddings = self.encoder.embed_all([(texts[i], None) for i in np.flatnonzero(valid)])
            bonus = diversity_reward(
                self.bank, [label] * len(kept), torch.from_numpy(embeddings), [remember] * len(kept)
            ).numpy()
            diversity[valid] = bonus
            max_cos[valid] = 1.0 - bonus
            if self.student is not None:
                # Fixed draws (not remembered) are measured among themselves, as their diversity is.
                novelty = bonus if remember else 1.0 - max_cosine_to_others(torch.from_numpy(embeddings)).numpy()
                student[valid] = self.student_term(label, kept, raw, novelty, remember)
        penalty = (~valid).astype(float)
        reward = settings.alpha * consistency + settings.beta * diversity - settings.gamma * penalty
        if self.student is not None:
            reward = reward + settings.student_reward_weight * student
        return {
            "reward": reward,
            "consistency": settings.alpha * consistency,
            "diversity": settings.beta * diversity,
            "penalty": -settings.gamma * penalty,
            "student": settings.student_reward_weight * student,
            "agrees": agrees,
            "valid": valid,
            "max_cos": max_cos,
            "embeddings": embeddings,  # of the valid texts, in order
        }

    def student_term(self, label: int, kept: list, raw: np.ndarray, novelty: np.ndarray, remember: bool) -> np.ndarray:
        """The student term (unweighted) of each valid sample of `label` (`kept`, with the teacher's raw p_C
        `raw` and their `novelty`) by `ppo.student_reward`, from the head and the bank as they were before this
        batch; `remember`: then add the samples' rows and soft labels to the head's bank."""
        from ..rl import learnability, targeted, usefulness
        from ..teacher import calibrate

        settings = self.spec.ppo
        soft = calibrate(raw, self.reference_mean, settings.student_label_temperature)
        rows = [self.task.student_inputs(example) for example in kept]
        owner = torch.tensor([i for i, sample_rows in enumerate(rows) for _ in sample_rows])
        z = torch.from_numpy(self.encoder.embed_all([row for sample_rows in rows for row in sample_rows]))
        q = torch.from_numpy(np.concatenate([self.task.row_soft_labels(sample_soft) for sample_soft in soft]))
        labelled, targets, tau = self.labelled, self.labelled_targets, settings.student_reward_tau
        if settings.student_reward == "learnability":
            term = learnability(q, self.student.probs(z), owner, torch.as_tensor(novelty))
        elif settings.student_reward == "targeted":
            term = targeted(z, q, owner, len(kept), labelled, targets, self.student.probs(labelled), tau)
        else:
            term = usefulness(z, q, owner, len(kept), *self.student.rows(), labelled, targets, tau)
        if remember:
            for i in range(len(kept)):
                self.student.add(label, z[owner == i], q[owner == i])
        return term.numpy()

    def refresh_student(self) -> dict[str, float]:
        """Refit the student head on the bank (after an update's rollouts); its accuracy on the labelled rows.
        Nothing (an empty dict) when the student term is off."""
        if self.student is None:
            return {}
        self.student.refit(self.spec.ppo.student_head_steps)
        predicted = self.student.probs(self.labelled).argmax(dim=1)
        return {"student_labelled_accuracy": float((predicted == self.labelled_targets).float().mean())}


def measure_prompt(teacher, rewards: RewardModel, prompt: torch.Tensor) -> dict[str, float]:
    """What `prompt` generates on fixed seeds: the same draws for the stage-1 and the final prompt.
    Diversity is within the draws (each valid sample's max cosine to the others of its label), so the
    memory bank neither scores nor keeps these samples."""
    from ..rl import max_cosine_to_others

    settings = rewards.spec.ppo
    prompt = prompt.detach().clone()
    scores, texts = [], []
    for label in range(rewards.task.num_labels):
        samples = teacher.sample(
            label,
            settings.eval_samples_per_label,
            settings.max_new_tokens,
            settings.top_p,
            settings.temperature,
            EVAL_SEED + label,
            prompt,
            top_k=settings.top_k,
        )
        scores.append(rewards.score(label, samples.texts, remember=False))
        texts.extend(samples.texts)
    max_cos = np.concatenate([max_cosine_to_others(torch.from_numpy(score["embeddings"])).numpy() for score in scores])
    within = float(max_cos.mean()) if max_cos.size else 0.0
    summary = rollout_summary(scores, texts, float("nan"))
    diversity = settings.beta * (1.0 - within)
    reward = summary["consistency_term"] + diversity + summary["penalty_term"]
    if rewards.student is not None:
        reward += summary["student_term"]
    return {**summary, "mean_max_cos": within, "diversity_term": diversity, "reward": reward}


def rollout_summary(scores: list[dict], texts: list[str], kl: float) -> dict[str, float]:
    from ..rl import distinct_n

    def mean(key):
        return float(np.nanmean(np.concatenate([score[key] for score in scores]).astype(float)))

    return {
        "reward": mean("reward"),
        "consistency_term": mean("consistency"),
        "diversity_term": mean("diversity"),
        "penalty_term": mean("penalty"),
        "student_term": mean("student"),
        "consistency_rate": mean("agrees"),
        "valid_rate": mean("valid"),
        "mean_max_cos": mean("max_cos") if any(np.isfinite(s["max_cos"]).any() for s in scores) else 0.0,
        "distinct_2": distinct_n(texts, 2),
        "kl": kl,
    }


@dataclass
class PPOLoop(LoopState):
    """PPO's state between updates, besides the engine's: the reward's memory bank, the student head of the
    student term (None when it is off), the stage-1 prompt's measure on the fixed draws (rank 0's; None on the
    others), the summary of every update, and the texts drawn."""

    bank: MemoryBank
    student: StudentHead | None = None
    before: dict[str, float] | None = None
    history: list[dict] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)


def train_loop(config: dict) -> None:
    from safetensors.torch import save_file
    from tqdm import tqdm

    from ..retrieval_student import RetrievalStudent
    from ..rl import approx_kl, gae, policy_loss, token_rewards, value_loss, whiten
    from ..teacher import Teacher, calibrate, calibration_reference
    from ..training import Checkpoints, Optimiser, report_outputs, set_threads, worker_context, worker_spec

    spec = worker_spec(config)
    settings = spec.ppo
    set_threads(spec.resources, spec.resources.cpus_per_worker)
    rank, world, device = worker_context()
    torch.manual_seed(spec.data.seed + rank)
    task, few_shot = load_few_shot(spec)
    teacher = Teacher.from_spec(spec, task, device=device)
    encoder = RetrievalStudent.from_spec(spec.student, task.student_num_labels, dtype="float32")
    raw_labelled = teacher.classify_raw(few_shot, spec.teacher.classify_batch_size)
    reference_mean = calibration_reference(spec, raw_labelled, teacher)
    labelled = teacher_on_labelled(
        calibrate(raw_labelled, reference_mean), np.array([example.label for example in few_shot])
    )
    if rank == 0:
        print(f"[ppo] {describe_teacher_on_labelled(labelled)}", flush=True)
    rewards = RewardModel(spec, teacher, task, encoder, reference_mean, few_shot)
    reference_prompt = torch.tensor(config["initial_prompt"], device=device)
    policy = PromptPolicy(reference_prompt, task.num_labels if settings.per_label_prompt else None).to(device)
    optimiser = Optimiser(policy, [{"params": list(policy.parameters()), "lr": settings.lr}], config["deepspeed"])
    checkpoints = Checkpoints(optimiser, spec.resources.checkpoint_every_updates, rank)
    minibatch_size = optimiser.micro_batch_size
    # Each rank draws its own share of the rollouts (its own seeds): the data-parallel split of PPO's data.
    per_label = max(1, settings.rollouts_per_update // (task.num_labels * world))

    def collect(update: int):
        with optimiser.gathered():
            prompt = policy.soft_prompt.detach().clone()
        groups, scores, texts = [], [], []
        for label in range(task.num_labels):
            seed = 1_000_003 * (update + 1) + 101 * label + rank
            samples = teacher.sample(
                label,
                per_label,
                settings.max_new_tokens,
                settings.top_p,
                settings.temperature,
                seed,
                prompt,
                top_k=settings.top_k,
            )
            groups.append(samples)
            scores.append(rewards.score(label, samples.texts))
            texts.extend(samples.texts)
        return groups, scores, texts

    def measure(prompt: torch.Tensor) -> dict[str, float] | None:
        """Rank 0 measures the prompt; the others get None."""
        return measure_prompt(teacher, rewards, prompt) if rank == 0 else None

    state, start = PPOLoop(bank=rewards.bank, student=rewards.student), 0
    resumed = checkpoints.restore()
    if resumed is not None:
        state.load_state_dict(resumed)  # the bank and the student head in place: the reward model's
        start = checkpoints.resumed_from
    else:
        state.before = measure(reference_prompt)
    before = state.before
    if before is not None:
        print(
            f"[ppo] {describe_stage1_draws(before, settings.eval_samples_per_label * task.num_labels, spec)}",
            flush=True,
        )
    bar = tqdm(total=settings.updates, initial=start, desc="ppo", disable=rank != 0)
    for update in range(start, settings.updates):
        groups, scores, texts = collect(update)
        student = rewards.refresh_student()  # on this update's bank, for the next update's rewards
        state.seen.update(texts)
        batches, kls = [], []
        with torch.no_grad():
            for samples, score in zip(groups, scores):
                ids, mask = samples.token_ids.to(device), samples.mask.to(device).float()
                old_logprobs, old_values = policy(teacher, samples.label, ids)
                ref_logprobs, _ = teacher.continuation_outputs(samples.label, ids, reference_prompt)
                per_token = token_rewards(
                    torch.tensor(score["reward"], device=device, dtype=torch.float32),
                    old_logprobs,
                    ref_logprobs,
                    mask,
                    settings.kl_coef,
                )
                advantages, returns = gae(per_token, old_values, mask, settings.discount, settings.gae_lambda)
                batches.append((samples.label, ids, mask, old_logprobs, old_values, whiten(advantages, mask), returns))
                kls.append(approx_kl(old_logprobs, ref_logprobs, mask).item())
        clip_fractions, policy_losses, value_losses = [], [], []
        for _ in range(settings.ppo_epochs):
            for label, ids, mask, old_logprobs, old_values, advantages, returns in batches:
                for first in range(0, len(ids), minibatch_size):
                    part = slice(first, first + minibatch_size)
                    logprobs, values = optimiser.model(teacher, label, ids[part])
                    loss_pg, clipped = policy_loss(
                        logprobs, old_logprobs[part], advantages[part], mask[part], settings.clip_eps
                    )
                    loss_v = value_loss(values, old_values[part], returns[part], mask[part], settings.value_clip)
                    optimiser.step(loss_pg + settings.value_coef * loss_v)
                    clip_fractions.append(clipped.item())
                    policy_losses.append(loss_pg.item())
                    value_losses.append(loss_v.item())
        entry = {
            "update": update,
            **rollout_summary(scores, texts, float(np.mean(kls))),
            "clip_fraction": float(np.mean(clip_fractions)),
            "policy_loss": float(np.mean(policy_losses)),
            "value_loss": float(np.mean(value_losses)),
            **student,
        }
        state.history.append(entry)
        bar.update(1)
        bar.set_postfix(reward=f"{entry['reward']:.2f}", consistency=f"{entry['consistency_rate']:.2f}")
        if checkpoints.due(update + 1):
            checkpoints.save(update + 1, state.state_dict(), {"reward": entry["reward"]})
    bar.close()
    if rewards.student is not None:
        # The student term of a prompt depends on the student: both prompts are measured by the final one.
        before = measure(reference_prompt)
    with optimiser.gathered():
        after = measure(policy.soft_prompt)
    keep_stage1 = after is not None and keeps_stage1_prompt(before, after, spec)
    if keep_stage1:
        print(f"[ppo] {describe_kept_prompt(before, after, spec)}", flush=True)

    def write(folder: Path) -> None:
        final = reference_prompt if keep_stage1 else policy.soft_prompt
        save_file({"soft_prompt": final.detach().float().cpu().contiguous()}, str(folder / SOFT_PROMPT))
        save_file(
            {k: v.detach().float().cpu().contiguous() for k, v in policy.value_head.state_dict().items()},
            str(folder / "value_head.safetensors"),
        )

    report_outputs(
        {
            "history": state.history,
            "before": before,
            "after": after,
            "rollouts": settings.updates * per_label * task.num_labels * world,
            "updates": settings.updates,
            "resumed_from_update": checkpoints.resumed_from,
            "kept_stage1_prompt": keep_stage1,
            "teacher_precision": teacher.engine.precision.names(),
            **labelled,
        },
        write,
        optimiser,
        state.seen,
    )


def plot_curves(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    updates = [entry["update"] for entry in history]
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for key in ("reward", "consistency_term", "diversity_term", "penalty_term", "student_term"):
        axes[0].plot(updates, [entry.get(key, np.nan) for entry in history], marker="o", label=key)
    axes[0].set_title("reward terms per update")
    for key in ("consistency_rate", "distinct_2", "mean_max_cos", "kl", "student_labelled_accuracy"):
        if any(key in entry for entry in history):
            axes[1].plot(updates, [entry.get(key, np.nan) for entry in history], marker="o", label=key)
    axes[1].set_title("sample quality per update")
    for axis in axes:
        axis.set_xlabel("PPO update")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
