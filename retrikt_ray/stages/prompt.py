"""Stage 1: tune a soft prompt P in front of the frozen teacher on the few labelled examples.

Loss: mean token NLL of each example's text given `[P] Task: <description>. Label: <v(y)>. Text:`.
Only P is trained (PEFT prompt tuning), by a DeepSpeed engine in Ray Train workers, with checkpoints.
Outputs: `soft_prompt.safetensors` (m x hidden), the PEFT adapter, and the loss per epoch.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..artifacts import StageResult, StageRun
from ..config import JobSpec
from ..stage_contract import Stage
from ..tasks import load_few_shot
from ..training import LoopState


def run(spec: JobSpec, stage: StageRun) -> StageResult:
    from ..training import fit

    metrics = fit(train_loop, {}, spec, stage, spec.prompt.batch_size)
    losses = metrics["loss_per_epoch"]
    return StageResult(
        metrics=metrics,
        counts={"few_shot_examples": metrics["examples"]},
        summary=f"soft prompt of {spec.prompt.num_virtual_tokens} tokens; loss {losses[0]:.3f} -> {losses[-1]:.3f}"
        if losses
        else "soft prompt initialised (0 epochs)",
    )


STAGE = Stage(
    name="prompt",
    run=run,
    reads=(
        "task",
        "data.train_file",
        "data.shots",
        "data.seed",
        "teacher.model",
        "teacher.dtype",
        "teacher.trust_remote_code",
        "prompt",
    ),
    files=("train",),
    trains=True,
)


def training_items(task, examples, tokenizer, max_length: int) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per example: the loss covers the example's text, not the prompt."""
    items = []
    for example in examples:
        prompt = tokenizer(task.generation_prompt(example.label)).input_ids
        target = tokenizer(task.generation_text(example) + "\n", add_special_tokens=False).input_ids
        ids = (prompt + target)[:max_length]
        labels = ([-100] * len(prompt) + target)[:max_length]
        items.append((ids, labels))
    return items


def collate(items, pad_id: int, device) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in items)
    input_ids = torch.full((len(items), width), pad_id)
    labels = torch.full((len(items), width), -100)
    attention = torch.zeros((len(items), width), dtype=torch.long)
    for row, (ids, target) in enumerate(items):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(target)] = torch.tensor(target)
        attention[row, : len(ids)] = 1
    return {"input_ids": input_ids.to(device), "labels": labels.to(device), "attention_mask": attention.to(device)}


@dataclass
class PromptLoop(LoopState):
    """The prompt-tuning loop's state between steps, besides the engine's: this rank's share of the examples in
    its current order and the generator that shuffles it every epoch, the loss of each finished epoch and of the
    running one, and the examples seen."""

    mine: list[int]
    order: random.Random
    losses: list[float] = field(default_factory=list)
    epoch_loss: float = 0.0
    seen: set[int] = field(default_factory=set)


def train_loop(config: dict) -> None:
    from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model
    from safetensors.torch import save_file
    from tqdm import tqdm

    from ..engine import load_dtype
    from ..models import load_teacher, teacher_path
    from ..training import Checkpoints, Optimiser, report_outputs, set_threads, shard, worker_context, worker_spec

    spec = worker_spec(config)
    set_threads(spec.resources, spec.resources.cpus_per_worker)
    rank, world, device = worker_context()
    settings = spec.prompt
    torch.manual_seed(spec.data.seed)
    task, few_shot = load_few_shot(spec)
    dtype = load_dtype(spec.teacher.dtype, device, training=spec.deepspeed_for(STAGE.name).precision)
    model, tokenizer = load_teacher(spec.teacher.model, spec.storage.cache_dir, dtype, spec.teacher.trust_remote_code)
    peft_config = PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=settings.num_virtual_tokens,
        prompt_tuning_init=PromptTuningInit.TEXT if settings.init_from_description else PromptTuningInit.RANDOM,
        prompt_tuning_init_text=task.description,
        tokenizer_name_or_path=teacher_path(spec.teacher.model, spec.storage.cache_dir),
    )
    model = get_peft_model(model, peft_config).to(device)
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimiser = Optimiser(model, [{"params": trainable, "lr": settings.lr}], config["deepspeed"])
    checkpoints = Checkpoints(optimiser, spec.resources.checkpoint_every_steps, rank)
    batch_size = optimiser.micro_batch_size

    items = training_items(task, few_shot, tokenizer, settings.max_length)
    # Every rank takes the same number of steps, or the gradient all-reduce would wait forever.
    steps = math.ceil(len(few_shot) / (batch_size * world))
    state = PromptLoop(mine=shard(list(range(len(items))), rank, world), order=random.Random(spec.data.seed + rank))
    position = 0
    resumed = checkpoints.restore()
    if resumed is not None:
        state.load_state_dict(resumed)
        position = checkpoints.resumed_from
    bar = tqdm(total=settings.epochs * steps, initial=position, desc="prompt tuning", disable=rank != 0)
    while position < settings.epochs * steps:
        step = position % steps
        if step == 0:
            state.order.shuffle(state.mine)
            state.epoch_loss = 0.0
        chosen = [state.mine[(step * batch_size + i) % len(state.mine)] for i in range(batch_size)]
        state.seen.update(chosen)
        loss = optimiser.model(**collate([items[i] for i in chosen], tokenizer.pad_token_id, device)).loss
        optimiser.step(loss)
        state.epoch_loss += loss.item() / steps
        position += 1
        if position % steps == 0:
            state.losses.append(state.epoch_loss)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if checkpoints.due(position):
            checkpoints.save(position, state.state_dict(), {"loss": loss.item()})
    bar.close()

    def write(folder: Path) -> None:
        prompt = model.get_prompt_embedding_to_save("default").detach().float().cpu().contiguous()
        save_file({"soft_prompt": prompt}, str(folder / "soft_prompt.safetensors"))
        model.save_pretrained(str(folder / "adapter"))

    metrics = {
        "loss_per_epoch": state.losses,
        "examples": len(few_shot),
        "steps": position,
        "resumed_from_step": checkpoints.resumed_from,
    }
    report_outputs(metrics, write, optimiser, state.seen)
