"""Stage 3: knowledge extraction. The teacher with the tuned prompt writes N_y samples per label.

Ray Data maps (label, seed) rows over a pool of teacher replicas (autoscaling, or fixed and spread over
the nodes with `resources.placement: spread`; fractional CPUs on CPU nodes, `resources.gpus_per_replica` of a
GPU each on GPU nodes). Every finished row is written at once as its own Parquet shard, so an interrupted run
resumes where it stopped; each sample keeps the Ray node id, actor id and torch device of the replica that
wrote it (the manifest counts samples per node and names the replicas and devices). Then: parse, exact and
near-duplicate removal (student-embedding cosine within a label), and annotation with the calibrated teacher classifier
p_C and the teacher's state h_T (`teacher.state`: by default read in the same forward, where the teacher
reads off its answer) in a second Ray Data pass, which also resumes: each chunk of samples is saved as soon
as it is annotated. Every dropped sample is counted with its reason in the manifest.
"""

from __future__ import annotations

import json
import time
from collections import Counter

import numpy as np

from ..artifacts import StageResult, StageRun, write_parquet_atomic
from ..config import JobSpec
from ..samples import ANNOTATION_SHARDS, annotate, pool_options, replica_threads, save_samples, spread_work
from ..stage_contract import EMBEDDING_ONLY, Stage, worker_spec
from ..tasks import Task


def generation_rows(spec: JobSpec, task: Task) -> list[dict]:
    """One row per (label, chunk): enough chunks for samples_per_label, each with its own seed."""
    settings = spec.generate
    rows = []
    for label in range(task.num_labels):
        remaining, chunk = settings.samples_per_label, 0
        while remaining > 0:
            count = min(settings.rows_per_task, remaining)
            rows.append(
                {
                    "shard": f"{label}-{chunk:05d}",
                    "label": label,
                    "count": count,
                    "seed": settings.seed * 100_003 + label * 10_007 + chunk,
                }
            )
            remaining -= count
            chunk += 1
    return rows


class Generator:
    """A teacher replica with the tuned soft prompt (one per Ray Data actor)."""

    def __init__(self, spec_json: dict, soft_prompt: list, threads: int | None):
        import torch

        from ..teacher import Teacher

        self.spec = worker_spec(spec_json)
        if threads:
            torch.set_num_threads(threads)
        self.teacher = Teacher.from_spec(self.spec, Task.from_spec(self.spec.task))
        self.soft_prompt = torch.tensor(soft_prompt, device=self.teacher.device)

    def __call__(self, batch: dict) -> dict:
        import ray

        settings = self.spec.generate
        context = ray.get_runtime_context()
        node, replica, device = context.get_node_id(), context.get_actor_id(), str(self.teacher.device)
        precision = " ".join(f"{use}={dtype}" for use, dtype in self.teacher.engine.precision.names().items())
        out = {
            "shard": [],
            "label": [],
            "text": [],
            "tokens": [],
            "node": [],
            "replica": [],
            "device": [],
            "precision": [],
        }
        for shard, label, count, seed in zip(batch["shard"], batch["label"], batch["count"], batch["seed"]):
            n = int(count)
            # One call per row: each sample has its own seed, so the batch size changes speed, not samples.
            samples = self.teacher.sample(
                int(label),
                n,
                settings.max_new_tokens,
                settings.top_p,
                settings.temperature,
                int(seed),
                self.soft_prompt,
                settings.batch_size,
                top_k=settings.top_k,
            )
            out["shard"] += [shard] * n
            out["label"] += [int(label)] * n
            out["text"] += samples.texts
            out["tokens"] += samples.mask.sum(dim=1).tolist()
            out["node"] += [node] * n
            out["replica"] += [replica] * n
            out["device"] += [device] * n
            out["precision"] += [precision] * n
        return out


def run(spec: JobSpec, stage: StageRun) -> StageResult:
    import pandas as pd
    import ray
    from safetensors.torch import load_file
    from tqdm import tqdm

    task = Task.from_spec(spec.task)
    shards_dir = stage.dir / "shards"
    shards_dir.mkdir(exist_ok=True)
    rows = generation_rows(spec, task)
    todo = [row for row in rows if not (shards_dir / f"{row['shard']}.parquet").exists()]
    prompt = load_file(str(stage.inputs["ppo"] / "soft_prompt.safetensors"))["soft_prompt"].tolist()
    spec_json = spec.model_dump(mode="json")
    started, new_tokens = time.perf_counter(), 0
    if todo:
        dataset = ray.data.from_items(todo, override_num_blocks=len(todo)).map_batches(
            Generator,
            fn_constructor_kwargs={"spec_json": spec_json, "soft_prompt": prompt, "threads": replica_threads(spec)},
            batch_size=1,
            **pool_options(spec),
        )
        dataset = spread_work(dataset, spec)
        with tqdm(total=sum(row["count"] for row in todo), desc="generating", unit="sample") as bar:
            for batch in dataset.iter_batches(batch_size=None, batch_format="pandas"):
                for shard, frame in batch.groupby("shard"):
                    write_parquet_atomic(frame, shards_dir / f"{shard}.parquet")
                    new_tokens += int(frame["tokens"].sum())
                    bar.update(len(frame))
    generation_seconds = time.perf_counter() - started
    generated = pd.concat([pd.read_parquet(shards_dir / f"{row['shard']}.parquet") for row in rows], ignore_index=True)

    kept, dropped = filter_samples(spec, task, generated)
    annotated, chunks_resumed = annotate(spec, task, kept, spec_json, stage.dir / ANNOTATION_SHARDS)
    annotated["teacher_agrees"] = [
        int(np.argmax(soft)) == label for soft, label in zip(annotated["soft_label"], annotated["label"])
    ]
    disagreeing = int((~annotated["teacher_agrees"]).sum())
    if spec.generate.on_disagreement == "drop":
        annotated = annotated[annotated["teacher_agrees"]].reset_index(drop=True)
        dropped["teacher_disagrees"] = disagreeing
    save_samples(stage.dir, annotated)

    counts = {
        "generated": len(generated),
        "kept": len(annotated),
        **{f"dropped_{reason}": count for reason, count in sorted(dropped.items())},
        "teacher_disagrees": disagreeing,
        **{
            f"kept_label_{task.label_names[label]}": int((annotated["label"] == label).sum())
            for label in range(task.num_labels)
        },
    }
    tokens = int(generated["tokens"].sum())
    return StageResult(
        metrics={
            "tokens_generated": tokens,
            "teacher_agreement": float(annotated["teacher_agrees"].mean()) if len(annotated) else 0.0,
            # This run's generation pass alone (replica start-up included); a resumed run counts only its new shards.
            "generation_seconds": round(generation_seconds, 3),
            "generation_tokens_per_s": new_tokens / generation_seconds if new_tokens else 0.0,
            "annotation_chunks_resumed": chunks_resumed,
            "samples_by_node": {
                node: int(count) for node, count in generated["node"].value_counts().sort_index().items()
            },
            # Shards written before these columns existed count under no replica.
            "replicas": int(generated["replica"].nunique()) if "replica" in generated else 0,
            "replica_devices": sorted(generated["device"].dropna().unique().tolist()) if "device" in generated else [],
            # The teacher's dtype per use in the replicas (teacher.dtype: auto resolves on their hardware).
            "teacher_precision": sorted(generated["precision"].dropna().unique().tolist())
            if "precision" in generated
            else [],
        },
        counts=counts,
        summary=f"{len(generated)} generated, {len(annotated)} kept "
        f"({', '.join(f'{k} {v}' for k, v in dropped.items())}); teacher disagrees on {disagreeing}",
    )


STAGE = Stage(
    name="generate",
    run=run,
    inputs=("ppo",),
    reads=("task", "teacher", "student.model", "student.max_length", "student.trust_remote_code", "generate"),
    ignores=EMBEDDING_ONLY,
)


def filter_samples(spec: JobSpec, task: Task, generated) -> tuple:
    """Parse, length bounds, exact and near duplicates. Returns (kept frame, Counter of drop reasons).

    A sample that does not parse and used all `max_new_tokens` counts as `cut_off` rather than
    `unparseable`: the budget, not the teacher's form, is then what to change."""
    import pandas as pd

    settings = spec.generate
    dropped: Counter = Counter()
    records, seen = [], set()
    for text, label, tokens in zip(generated["text"], generated["label"], generated["tokens"]):
        words = len(text.split())
        if words < settings.min_words:
            dropped["too_short"] += 1
            continue
        if words > settings.max_words:
            dropped["too_long"] += 1
            continue
        example = task.parse_generation(text, int(label))
        if example is None:
            dropped["cut_off" if tokens >= settings.max_new_tokens else "unparseable"] += 1
            continue
        key = (int(label), " ".join(text.lower().split()))
        if key in seen:
            dropped["exact_duplicate"] += 1
            continue
        seen.add(key)
        records.append({"label": int(label), "text": text, "fields": json.dumps(example.fields)})
    frame = pd.DataFrame(records, columns=["label", "text", "fields"])
    keep = near_duplicate_mask(spec, frame)
    dropped["near_duplicate"] = int((~keep).sum())
    return frame[keep].reset_index(drop=True), dropped


def near_duplicate_mask(spec: JobSpec, frame) -> np.ndarray:
    """False for a sample whose student embedding is within the threshold of an earlier kept one of its label."""
    import faiss

    from ..retrieval_student import RetrievalStudent

    keep = np.ones(len(frame), dtype=bool)
    if len(frame) == 0:
        return keep
    student = RetrievalStudent.from_spec(spec.student, 2, dtype="float32")
    embeddings = student.embed_all([(text, None) for text in frame["text"]], progress=True)
    for label in np.unique(frame["label"]):
        index = faiss.IndexFlatIP(embeddings.shape[1])
        for row in np.flatnonzero(frame["label"].to_numpy() == label):
            vector = embeddings[row : row + 1]
            if index.ntotal and index.search(vector, 1)[0][0, 0] > spec.generate.near_duplicate_cosine:
                keep[row] = False
            else:
                index.add(vector)
    return keep
