"""What every Ray Train stage shares: launching a TorchTrainer, the optimiser (DeepSpeed when the spec
gives a config), data sharding by rank, and handing a worker's output files back to the stage folder.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from .config import JobSpec, ResourcesSpec

OUTPUTS_METRICS = "train_metrics.json"


def set_threads(resources: ResourcesSpec, cpus: float) -> None:
    """torch threads in a worker: the spec's setting, else the CPUs Ray gave the worker."""
    torch.set_num_threads(resources.torch_threads or max(1, int(round(cpus))))


def fit(loop: Callable[[dict], None], loop_config: dict, spec: JobSpec, stage_dir: Path) -> dict[str, Any]:
    """Run `loop` in a TorchTrainer; copy the files rank 0 reported into stage_dir; return its metrics."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage = Path(stage_dir).resolve() / "_ray_train"
    resources = spec.resources
    trainer = TorchTrainer(
        loop,
        train_loop_config={**loop_config, "spec": spec.model_dump(mode="json")},
        scaling_config=ScalingConfig(
            num_workers=resources.num_workers,
            use_gpu=resources.use_gpu,
            resources_per_worker={"CPU": resources.cpus_per_worker},
            placement_strategy=resources.placement.upper(),
        ),
        run_config=RunConfig(name=Path(stage_dir).name, storage_path=str(storage)),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"{Path(stage_dir).name}: training ended without reporting its outputs")
    with result.checkpoint.as_directory() as outputs:
        for path in Path(outputs).iterdir():
            target = Path(stage_dir) / path.name
            if path.is_dir():
                shutil.copytree(path, target, dirs_exist_ok=True)
            else:
                shutil.copy2(path, target)
    shutil.rmtree(storage, ignore_errors=True)
    return json.loads((Path(stage_dir) / OUTPUTS_METRICS).read_text())


def report_outputs(metrics: dict[str, Any], write: Callable[[Path], None]) -> None:
    """Called by every rank at the end of a loop: rank 0 writes its files via `write(folder)`.

    The metrics gain `worker_nodes`: the Ray node id of every rank, in rank order (where the work ran).
    """
    import ray
    import ray.train

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    node = ray.get_runtime_context().get_node_id()
    worker_nodes = [node] * world
    if world > 1:
        torch.distributed.all_gather_object(worker_nodes, node)
    metrics = {**metrics, "worker_nodes": worker_nodes}
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if rank == 0:
            write(Path(folder))
            (Path(folder) / OUTPUTS_METRICS).write_text(json.dumps(metrics, indent=2, default=float))
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report({key: value for key, value in metrics.items() if isinstance(value, (int, float))}, checkpoint=checkpoint)


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
    """AdamW over the trainable parameters, through DeepSpeed when a config is given.

    `model` is returned wrapped (DDP or DeepSpeed engine) for the forward passes that must sync
    gradients; with one worker and no DeepSpeed it is the model itself.
    """

    def __init__(self, model: torch.nn.Module, param_groups: list[dict], deepspeed_config, batch_size: int, world: int):
        self.engine = None
        if deepspeed_config:
            import deepspeed

            config = _deepspeed_config(deepspeed_config, batch_size, world)
            # DeepSpeed builds the optimizer its config names; else ours is handed to it.
            optimizer = None if "optimizer" in config else torch.optim.AdamW(param_groups)
            self.engine, self.optimizer, _, _ = deepspeed.initialize(
                model=model, optimizer=optimizer, model_parameters=param_groups if optimizer is None else None, config=config
            )
            self.model = self.engine
        else:
            self.optimizer = torch.optim.AdamW(param_groups)
            self.model = model
            if world > 1:
                from ray.train.torch import prepare_model

                # Encoders carry parameters mean pooling never uses (BERT's pooler): DDP must expect them gradient-free.
                self.model = prepare_model(model, move_to_device=False, parallel_strategy_kwargs={"find_unused_parameters": True})

    def step(self, loss: torch.Tensor) -> None:
        if self.engine is not None:
            self.engine.backward(loss)
            self.engine.step()
        else:
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()


def _deepspeed_config(config, batch_size: int, world: int) -> dict:
    loaded = json.loads(Path(config).expanduser().read_text()) if isinstance(config, str) else dict(config)
    loaded.setdefault("train_micro_batch_size_per_gpu", batch_size)
    loaded.setdefault("gradient_accumulation_steps", 1)
    loaded.setdefault(
        "train_batch_size",
        loaded["train_micro_batch_size_per_gpu"] * loaded["gradient_accumulation_steps"] * world,
    )
    return loaded
