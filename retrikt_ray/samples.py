"""The annotated samples of the generate and unlabelled stages, which the store stage reads: the teacher
replica pool both stages map over with Ray Data, the annotation pass (calibrated p_C and h_T, resumable
from the chunks it saved), and the stage's samples file.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

from .artifacts import write_parquet_atomic
from .config import JobSpec
from .stage_contract import worker_spec
from .tasks import Example, Task

SAMPLES = "samples.parquet"
# Annotated chunks of ANNOTATION_CHUNK samples, kept until the stage's SAMPLES file is written.
ANNOTATION_SHARDS = "annotation_shards"
ANNOTATION_CHUNK = 64
# How long a spread pool may take to start all its replicas before the stage fails.
POOL_START_TIMEOUT_S = 600


class Annotator:
    """A teacher replica without prompt: raw verbaliser probabilities and hidden states."""

    def __init__(self, spec_json: dict, threads: int | None):
        import torch

        from .teacher import Teacher

        self.spec = worker_spec(spec_json)
        if threads:
            torch.set_num_threads(threads)
        self.task = Task.from_spec(self.spec.task)
        self.teacher = Teacher.from_spec(self.spec, self.task)

    def __call__(self, batch: dict) -> dict:
        from .tasks import Example

        examples = [
            Example(fields=json.loads(fields), label=int(label))
            for fields, label in zip(batch["fields"], batch["label"])
        ]
        batch_size = self.spec.teacher.classify_batch_size
        probs, states = self.teacher.annotate(
            examples, self.spec.teacher.state, self.spec.teacher.hidden_layer, batch_size
        )
        return {**batch, "raw_probs": list(probs), "teacher_state": list(states)}


def pool_options(spec: JobSpec) -> dict:
    """`map_batches` options of a pool of teacher replicas, as `resources` places and sizes them."""
    from ray.data import ActorPoolStrategy

    resources = spec.resources
    options = {"num_cpus": resources.cpus_per_replica}
    if resources.placement == "spread":
        # A fixed pool: an autoscaling one may never start the replica that would go to a second node.
        options["compute"] = ActorPoolStrategy(size=resources.generation_replicas)
    else:
        options["compute"] = ActorPoolStrategy(min_size=1, max_size=resources.generation_replicas)
    if resources.use_gpu:
        options["num_gpus"] = resources.gpus_per_replica
    return options


def spread_work(dataset, spec: JobSpec):
    """With spread placement, replicas are scheduled SPREAD, and no row is handed out before every replica
    has started: else the first replica up (on the driver's node) could take all the work of a small job."""
    if spec.resources.placement == "spread":
        # SPREAD is Ray Data's default today; set so the placement does not hang on that default. Through the
        # dataset's context, as Ray 2.64 drops map_batches' free-form remote arguments.
        dataset.context.scheduling_strategy = "SPREAD"
        dataset.context.wait_for_min_actors_s = POOL_START_TIMEOUT_S
    return dataset


def replica_threads(spec: JobSpec) -> int | None:
    """Torch threads of each teacher replica."""
    return spec.resources.torch_threads or max(1, int(round(spec.resources.cpus_per_replica)))


def annotate(spec: JobSpec, task: Task, frame, spec_json: dict, shards_dir: Path):
    """Soft labels q_T (calibrated p_C) and h_T for every row of `frame`, through a Ray Data actor pool.

    Each chunk of ANNOTATION_CHUNK rows is saved under `shards_dir` as soon as its rows are annotated, named
    by its position and a digest of its inputs; a chunk already saved there is not annotated again, so an
    interrupted stage resumes. Returns (annotated frame, chunks found already saved)."""
    import pandas as pd
    import ray
    from tqdm import tqdm

    from .teacher import calibrate, calibration_reference

    if len(frame) == 0:
        return frame.assign(soft_label=[], teacher_state=[]), 0
    shards_dir.mkdir(exist_ok=True)
    chunks = {}
    for start in range(0, len(frame), ANNOTATION_CHUNK):
        chunk = frame.iloc[start : start + ANNOTATION_CHUNK]
        digest = hashlib.sha256(json.dumps([chunk["fields"].tolist(), chunk["label"].tolist()]).encode()).hexdigest()[
            :12
        ]
        chunks[f"{start // ANNOTATION_CHUNK:06d}-{digest}"] = chunk
    todo = {name: chunk for name, chunk in chunks.items() if not (shards_dir / f"{name}.parquet").exists()}
    if todo:
        dataset = ray.data.from_pandas([chunk.assign(chunk=name) for name, chunk in todo.items()]).map_batches(
            Annotator,
            fn_constructor_kwargs={"spec_json": spec_json, "threads": replica_threads(spec)},
            batch_size=ANNOTATION_CHUNK,
            **pool_options(spec),
        )
        dataset = spread_work(dataset, spec)
        arrived: dict[str, list] = {}
        with tqdm(
            total=len(frame),
            initial=len(frame) - sum(len(chunk) for chunk in todo.values()),
            desc="annotating",
            unit="sample",
        ) as bar:
            for batch in dataset.iter_batches(batch_size=None, batch_format="pandas"):
                for name, part in batch.groupby("chunk"):
                    arrived.setdefault(name, []).append(part)
                    if sum(len(piece) for piece in arrived[name]) == len(todo[name]):
                        write_parquet_atomic(
                            pd.concat(arrived.pop(name)).drop(columns="chunk"), shards_dir / f"{name}.parquet"
                        )
                bar.update(len(batch))
    annotated = pd.concat([pd.read_parquet(shards_dir / f"{name}.parquet") for name in chunks], ignore_index=True)
    raw = np.stack(annotated["raw_probs"].to_numpy())
    reference = calibration_reference(spec, raw, task=task)
    annotated["soft_label"] = list(calibrate(raw, reference, spec.teacher.soft_label_temperature))
    return annotated.drop(columns=["raw_probs"]), len(chunks) - len(todo)


def save_samples(stage_dir: Path, samples) -> None:
    """The stage's annotated samples; the annotation shards, all of them in it now, go."""
    write_parquet_atomic(samples, stage_dir / SAMPLES)
    shutil.rmtree(stage_dir / ANNOTATION_SHARDS, ignore_errors=True)


def read_samples(stage_dir: Path):
    import pandas as pd

    return pd.read_parquet(Path(stage_dir) / SAMPLES)


def store_rows(task: Task, samples) -> dict:
    """Student rows of the annotated samples: inputs, labels, soft labels, h_T, source example id."""
    inputs, labels, soft, states, example_ids = [], [], [], [], []
    for example_id, (fields, label, soft_label, state) in enumerate(
        zip(samples["fields"], samples["label"], samples["soft_label"], samples["teacher_state"])
    ):
        example = Example(fields=json.loads(fields), label=int(label))
        rows = task.student_inputs(example)
        targets = task.row_targets(example)
        soft_label = np.asarray(soft_label, dtype=np.float32)
        for row, (row_input, target) in enumerate(zip(rows, targets)):
            inputs.append(row_input)
            labels.append(target)
            # choice tasks: the soft label of "alternative i is right" is the teacher's p(i).
            soft.append(
                soft_label
                if task.kind == "classification"
                else np.array([1 - soft_label[row], soft_label[row]], np.float32)
            )
            states.append(np.asarray(state, dtype=np.float32))
            example_ids.append(example_id)
    return {
        "inputs": inputs,
        "labels": np.array(labels, dtype=np.int64),
        "soft_labels": np.stack(soft) if soft else np.zeros((0, task.student_num_labels), np.float32),
        "teacher_states": np.stack(states) if states else None,
        "example_ids": np.array(example_ids, dtype=np.int64),
    }
