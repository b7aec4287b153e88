"""What every Ray Train stage shares: launching a TorchTrainer with fault tolerance, the DeepSpeed
engine of the stage's trainable parameters, checkpoints that a restarted worker group resumes from,
data sharding by rank, and handing rank 0's output files back to the stage folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .config import JobSpec, ResourcesSpec
from .stage_contract import worker_spec as spec_in_worker
from .tracking import environment

if TYPE_CHECKING:
    from .artifacts import StageRun

OUTPUTS_METRICS = "train_metrics.json"
TRAIN_STORAGE = "_ray_train"
# Ray Train's controller polls its workers this often, and a worker's `ray.train.report` blocks until a poll
# takes it; Ray passes the driver's value on to the controller and the workers.
RAY_TRAIN_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
# Ray Train's preemption watcher: an actor (one more process per stage) that reacts to nodes being drained.
RAY_TRAIN_PREEMPTION_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
# DeepSpeed's checkpoint tag inside a Ray checkpoint folder, and each rank's loop state beside it.
ENGINE_TAG = "engine"
LOOP_STATE = "loop_state_rank{rank}.pt"


def set_threads(resources: ResourcesSpec, cpus: float) -> None:
    """torch threads in a worker: the spec's setting, else the CPUs Ray gave the worker."""
    torch.set_num_threads(resources.torch_threads or max(1, int(round(cpus))))


def worker_spec(config: dict) -> JobSpec:
    """The job spec inside a worker (stage_contract.worker_spec)."""
    return spec_in_worker(config["spec"])


def deepspeed_config(spec: JobSpec, stage: str, batch_size: int) -> dict:
    """The complete DeepSpeed config of a training stage, built on the driver from its settings.

    `batch_size` is the stage's examples per worker per step, the micro-batch unless one is set.
    """
    settings = spec.deepspeed_for(stage)
    if settings.config_file is not None:
        config = json.loads(Path(settings.config_file).expanduser().read_text(encoding="utf-8-sig"))
    else:
        offload = settings.offload_optimizer
        zero: dict[str, Any] = {"stage": settings.zero_stage}
        if offload:
            zero["offload_optimizer"] = {"device": "cpu"}
        if settings.offload_parameters:
            zero["offload_param"] = {"device": "cpu"}
        config = {
            # Learning rates and weight decay come with each parameter group.
            "optimizer": {"type": "AdamW", "params": {"torch_adam": not offload}},
            "zero_optimization": zero,
            "bf16": {"enabled": settings.precision == "bf16"},
            "fp16": {"enabled": settings.precision == "fp16"},
            "steps_per_print": 1_000_000_000,
        }
    # A config file sets these itself or leaves them to the stage (its spec fields stay at their defaults).
    config.setdefault("train_micro_batch_size_per_gpu", settings.micro_batch_size or batch_size)
    config.setdefault("gradient_accumulation_steps", settings.gradient_accumulation_steps)
    config.setdefault(
        "train_batch_size",
        config["train_micro_batch_size_per_gpu"] * config["gradient_accumulation_steps"] * spec.resources.num_workers,
    )
    return config


def ray_train_environment(resources: ResourcesSpec) -> dict[str, str]:
    """The Ray Train settings a stage trains under (Ray passes them on to its controller and workers): the report
    poll, and on the local in-process Ray (no address) the preemption watcher off, as that one node has no
    drain to react to and the watcher's process would only slow every stage's start."""
    settings = {RAY_TRAIN_POLL_ENV: str(resources.report_poll_s)}
    if resources.address is None:
        settings[RAY_TRAIN_PREEMPTION_ENV] = "0"
    return settings


def fit(
    loop: Callable[[dict], None], loop_config: dict, spec: JobSpec, stage: StageRun, batch_size: int
) -> dict[str, Any]:
    """Run `loop` in a TorchTrainer; copy the files rank 0 reported into the stage folder; return its metrics.

    The run's Ray storage is `<stage>/_ray_train/<stage hash>`: a re-run of an interrupted stage with the same
    inputs finds its checkpoints there (Ray Train restores the run) and resumes; it is removed when done.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage = stage.dir.resolve() / TRAIN_STORAGE
    resources = spec.resources
    trainer = TorchTrainer(
        loop,
        train_loop_config={
            **loop_config,
            "spec": spec.model_dump(mode="json"),
            "deepspeed": deepspeed_config(spec, stage.name, batch_size),
        },
        scaling_config=ScalingConfig(
            num_workers=resources.num_workers,
            use_gpu=resources.use_gpu,
            resources_per_worker={"CPU": resources.cpus_per_worker},
            placement_strategy=resources.placement.upper(),
        ),
        run_config=RunConfig(
            name=stage.stage_hash,
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=resources.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
        ),
    )
    with environment(ray_train_environment(resources), override=False):
        result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"{stage.name}: training ended without reporting its outputs")
    with result.checkpoint.as_directory() as outputs:
        if not (Path(outputs) / OUTPUTS_METRICS).exists():
            raise RuntimeError(f"{stage.name}: training ended without reporting its outputs")
        for path in Path(outputs).iterdir():
            target = stage.dir / path.name
            if path.is_dir():
                shutil.copytree(path, target, dirs_exist_ok=True)
            else:
                shutil.copy2(path, target)
    shutil.rmtree(storage, ignore_errors=True)
    return json.loads((stage.dir / OUTPUTS_METRICS).read_text())


def worker_context() -> tuple[int, int, torch.device]:
    """(rank, world size, device) inside a Ray Train worker."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    return context.get_world_rank(), context.get_world_size(), ray.train.torch.get_device()


def shard(items: list, rank: int, world: int) -> list:
    """Rank's share of the items (round robin, so every rank sees different rows)."""
    return items[rank::world]


class Optimiser:
    """The stage's trainable parameters under a DeepSpeed engine (ZeRO stage, precision, accumulation).

    `model` is the engine: call it for the forward passes whose gradients are reduced across workers.
    `micro_batch_size` is what the loop feeds per step.
    """

    def __init__(self, model: torch.nn.Module, param_groups: list[dict], config: dict):
        import deepspeed

        config = dict(config)
        self.micro_batch_size = int(config["train_micro_batch_size_per_gpu"])
        self.zero_stage = int(config.get("zero_optimization", {}).get("stage", 0))
        self.trainable = [parameter for group in param_groups for parameter in group["params"]]
        # A config file without an optimizer: ours (AdamW over the groups) is handed to DeepSpeed.
        optimizer = None
        if "optimizer" not in config:
            optimizer = torch.optim.AdamW(param_groups)
            config["zero_allow_untested_optimizer"] = True
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            model_parameters=param_groups if optimizer is None else None,
            config=config,
        )
        self.model = self.engine
        # This rank's loss at every step (6 significant digits), resumed with the checkpoints; the stage's
        # metrics keep rank 0's as `loss_per_step` (report_outputs), which tracking logs step by step.
        self.losses: list[float] = []

    @property
    def precision(self) -> str:
        """The precision the engine trains in, as DeepSpeed set it up."""
        if self.engine.bfloat16_enabled():
            return "bf16"
        return "fp16" if self.engine.fp16_enabled() else "fp32"

    def step(self, loss: torch.Tensor) -> None:
        """Backward and (at an accumulation boundary) an optimizer step."""
        self.engine.backward(loss)
        self.engine.step()
        self.losses.append(float(f"{loss.item():.6g}"))

    def gathered(self, parameters: list[torch.nn.Parameter] | None = None):
        """Context in which the parameters (default: the trainable ones) are whole on every rank.

        Only ZeRO-3 partitions parameters; use it wherever they are read outside a forward pass.
        """
        if self.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(parameters if parameters is not None else self.trainable)

    def trainable_digest(self) -> str:
        """sha256 of the trainable parameters' bytes: equal on every rank when they are in sync."""
        digest = hashlib.sha256()
        with self.gathered():
            for parameter in self.trainable:
                digest.update(parameter.detach().float().cpu().numpy().tobytes())
        return digest.hexdigest()[:16]


@dataclasses.dataclass
class LoopState:
    """A training loop's state between steps, in one object as torchtune's recipes keep theirs: a checkpoint
    saves `state_dict()` and resuming restores it with `load_state_dict()`. A subclass is a dataclass whose fields
    are that state, each saved under its name; a field holding an object with a `state_dict` of its own (PPO's
    memory bank) is saved as that and restored in place, so whatever holds the object too sees the restored one.
    """

    def state_dict(self) -> dict[str, Any]:
        return {name: _saved(value) for name, value in self._fields()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Every saved field; a field the state lacks (a checkpoint made before the field existed) keeps its value."""
        for name, value in self._fields():
            if name not in state:
                continue
            if hasattr(value, "load_state_dict"):
                value.load_state_dict(state[name])
            else:
                setattr(self, name, state[name])

    def _fields(self):
        return ((field.name, getattr(self, field.name)) for field in dataclasses.fields(self))


def _saved(value: Any) -> Any:
    return value.state_dict() if hasattr(value, "state_dict") else value


class Checkpoints:
    """Periodic checkpoints of a training loop through `ray.train.report`, and resuming from them.

    A checkpoint holds the DeepSpeed engine's state (trainable parameters, optimizer, ZeRO partitions)
    and, per rank, the loop's state (data position, history) and the RNG states. After a worker
    failure (FailureConfig) or an interrupted run, `restore` returns the loop state to continue from.
    """

    def __init__(self, optimiser: Optimiser, every: int | None, rank: int):
        self.optimiser, self.every, self.rank = optimiser, every, rank
        self.resumed_from: int | None = None

    def restore(self) -> dict | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as folder:
            state_file = Path(folder) / LOOP_STATE.format(rank=self.rank)
            if not state_file.exists():  # the final outputs, not a training state
                return None
            self.optimiser.engine.load_checkpoint(folder, tag=ENGINE_TAG, load_module_strict=False)
            saved = torch.load(state_file, weights_only=False)
        torch.set_rng_state(saved["torch_rng"])
        random.setstate(saved["python_rng"])
        np.random.set_state(saved["numpy_rng"])
        if torch.cuda.is_available() and saved.get("cuda_rng") is not None:
            torch.cuda.set_rng_state_all(saved["cuda_rng"])
        self.resumed_from = saved["position"]
        self.optimiser.losses = list(saved.get("losses", []))
        return saved["loop"]

    def due(self, position: int) -> bool:
        """Whether to checkpoint after `position` steps (or updates) in all; never inside a gradient
        accumulation, whose partial gradients a checkpoint does not hold."""
        engine = self.optimiser.engine
        at_boundary = engine.micro_steps % engine.gradient_accumulation_steps() == 0
        return bool(self.every) and position % self.every == 0 and at_boundary

    def save(self, position: int, loop_state: dict, metrics: dict[str, float]) -> None:
        """Every rank calls this at the same position; Ray Train merges the ranks' files into one checkpoint."""
        import ray.train

        with tempfile.TemporaryDirectory() as folder:
            # The frozen teacher is the job's input, not training state: only what trains is saved.
            self.optimiser.engine.save_checkpoint(folder, tag=ENGINE_TAG, exclude_frozen_parameters=True)
            torch.save(
                {
                    "position": position,
                    "loop": loop_state,
                    "torch_rng": torch.get_rng_state(),
                    "python_rng": random.getstate(),
                    "numpy_rng": np.random.get_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                    "losses": self.optimiser.losses,
                },
                Path(folder) / LOOP_STATE.format(rank=self.rank),
            )
            ray.train.report({**metrics, "position": position}, checkpoint=ray.train.Checkpoint.from_directory(folder))


def report_outputs(metrics: dict[str, Any], write: Callable[[Path], None], optimiser: Optimiser, seen: list) -> None:
    """Called by every rank at the end of a loop: rank 0 writes its files via `write(folder)`.

    The metrics gain, gathered from all ranks in rank order: `worker_nodes` (the Ray node of each rank),
    `worker_devices` (the torch device each rank trained on), `weights_digest` (a digest of each rank's
    trainable parameters: all equal when in sync), `items_seen` (how many distinct data items each rank
    trained on, from `seen`) and `items_shared` (items that more
    than one rank saw: 0 when the data was split); `precision`, the engine's; and `loss_per_step`, rank 0's loss
    at every optimizer step (Optimiser.losses). `write` runs with the trainable parameters gathered.
    """
    import ray
    import ray.train

    rank, world, device = worker_context()
    mine = {
        "node": ray.get_runtime_context().get_node_id(),
        "device": str(device),
        "digest": optimiser.trainable_digest(),
        "seen": sorted({str(item) for item in seen}),
    }
    everyone = [mine] * world
    if world > 1:
        torch.distributed.all_gather_object(everyone, mine)
    counts: dict[str, int] = {}
    for entry in everyone:
        for item in entry["seen"]:
            counts[item] = counts.get(item, 0) + 1
    metrics = {
        **metrics,
        "workers": world,
        "worker_nodes": [entry["node"] for entry in everyone],
        "worker_devices": [entry["device"] for entry in everyone],
        "precision": optimiser.precision,
        "weights_digest": [entry["digest"] for entry in everyone],
        "items_seen": [len(entry["seen"]) for entry in everyone],
        "items_shared": sum(1 for count in counts.values() if count > 1),
        "loss_per_step": optimiser.losses,
    }
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        with optimiser.gathered():
            if rank == 0:
                write(Path(folder))
        if rank == 0:
            (Path(folder) / OUTPUTS_METRICS).write_text(json.dumps(metrics, indent=2, default=float))
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(
            {key: value for key, value in metrics.items() if isinstance(value, (int, float))}, checkpoint=checkpoint
        )
