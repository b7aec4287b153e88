"""Throughput with 1 and 2 workers on this machine; recorded in benchmarks/results/scaling.{json,md}.

    .venv/bin/python benchmarks/scaling.py                       # packaged SmolLM2 teacher, MiniLM student
    .venv/bin/python benchmarks/scaling.py --workers 1 2 4       # on a bigger machine

The job is jobs/demo.yaml with small budgets (see BUDGETS), run through the real pipeline on a local
Ray. One full run first makes the upstream stages and warms the caches; then, for each worker count:
- generation: the generate stage re-run from no shards with a fixed pool of N teacher replicas
  (1 CPU each); tokens/s of its generation pass (replica start-up included), from its manifest.
- student training: the student stage run with N Ray Train workers (1 CPU each), under DeepSpeed ZeRO 0
  and ZeRO 2, for a short and a long number of epochs; examples/s = extra examples / extra seconds, so
  Ray Train's fixed start-up cost (about 25 s) cancels out. An epoch includes re-encoding the store's
  keys, which every worker does.
A GPU row is recorded only when this machine has a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from retrikt_ray import pipeline  # noqa: E402
from retrikt_ray.artifacts import read_manifest, run_dir_for  # noqa: E402
from retrikt_ray.config import DeepSpeedSpec, JobSpec, load_spec  # noqa: E402

BUDGETS = [
    "prompt.epochs=1",
    "ppo.enabled=false",
    "generate.samples_per_label=48",
    "generate.rows_per_task=8",
    "generate.batch_size=8",
    "generate.max_new_tokens=24",
    "student.batch_size=16",
    "data.dev_limit=64",
    "evaluate.teacher_zero_shot=false",
    "evaluate.latency_examples=4",
    "resources.placement=spread",
    "resources.cpus_per_worker=1",
    "resources.cpus_per_replica=1",
]


def with_resources(spec: JobSpec, workers: int, epochs: int | None = None, zero_stage: int | None = None) -> JobSpec:
    changed = spec.model_copy(deep=True)
    changed.resources.num_workers = workers
    changed.resources.generation_replicas = workers
    if epochs is not None:
        changed.student.epochs = epochs
    if zero_stage is not None:  # the student's own section: the upstream stages stay reusable
        changed.student.deepspeed = DeepSpeedSpec(zero_stage=zero_stage)
    return changed


def measure_generation(spec: JobSpec, replicas: int) -> dict:
    """The generate stage from no shards with `replicas` teacher replicas."""
    changed = with_resources(spec, replicas)
    shutil.rmtree(run_dir_for(changed) / "generate" / "shards", ignore_errors=True)
    pipeline.run(changed, only="generate", force=True)
    metrics = read_manifest(run_dir_for(changed) / "generate")["metrics"]
    return {
        "workers": replicas,
        "tokens": metrics["tokens_generated"],
        "seconds": metrics["generation_seconds"],
        "tokens_per_s": round(metrics["generation_tokens_per_s"], 2),
        "samples_by_node": metrics["samples_by_node"],
    }


def student_examples(metrics: dict, spec: JobSpec) -> int:
    """Store rows trained on by all workers together (each rank runs ceil(rows / (batch * world)) steps)."""
    batch, world = spec.student.batch_size, metrics["workers"]
    return len(metrics["history"]) * math.ceil(metrics["store_rows"] / (batch * world)) * batch * world


def measure_training(spec: JobSpec, workers: int, epochs: tuple[int, int], zero_stage: int) -> dict:
    """The student stage with `workers` workers under ZeRO `zero_stage` for a short and a long run;
    throughput of the difference."""
    runs = {}
    for count in epochs:
        changed = with_resources(spec, workers, count, zero_stage)
        lines: list[str] = []
        pipeline.run(changed, log=lines.append)  # upstream stages reused; the student trains unless finished before
        if not any(re.match(r"\[student\] \d+s: ", line) for line in lines):
            pipeline.run(changed, only="student", force=True)
        manifest = read_manifest(run_dir_for(changed) / "student")
        runs[count] = {"seconds": manifest["seconds"], "examples": student_examples(manifest["metrics"], changed)}
    short, long = runs[epochs[0]], runs[epochs[1]]
    extra_seconds = long["seconds"] - short["seconds"]
    return {
        "workers": workers,
        "zero_stage": zero_stage,
        "runs": {str(count): run for count, run in runs.items()},
        "examples_per_s": round((long["examples"] - short["examples"]) / extra_seconds, 2)
        if extra_seconds > 0
        else None,
        "worker_nodes": read_manifest(run_dir_for(with_resources(spec, workers, epochs[1], zero_stage)) / "student")[
            "metrics"
        ]["worker_nodes"],
    }


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", default="jobs/demo.yaml")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--epochs", type=int, nargs=2, default=[1, 3], help="short and long student runs")
    parser.add_argument("--zero", type=int, nargs="+", default=[0, 2], help="DeepSpeed ZeRO stages of student training")
    parser.add_argument("--runs-dir", default="runs/scaling")
    parser.add_argument("--out", default="benchmarks/results/scaling")
    args = parser.parse_args()

    spec = load_spec(REPO / args.job, [*BUDGETS, f"storage.runs_dir={(REPO / args.runs_dir).resolve()}"])
    load_at_start = os.getloadavg()[0]
    pipeline.run(with_resources(spec, max(args.workers)))
    results = {
        "job": args.job,
        "budgets": BUDGETS,
        "teacher": spec.teacher.model,
        "student": spec.student.model,
        "device": "cpu",
        "generation": [measure_generation(spec, workers) for workers in args.workers],
        "training": [
            measure_training(spec, workers, tuple(args.epochs), zero) for zero in args.zero for workers in args.workers
        ],
        "gpu": "measured on a GPU machine: not run here" if torch.cuda.is_available() else "not run: no GPU lent",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        # Other processes on the machine change every figure above: the 1-minute load average says how busy it was.
        "load_average_1m": {"start": round(load_at_start, 2), "end": round(os.getloadavg()[0], 2)},
    }
    out = REPO / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))


def markdown(results: dict) -> str:
    def speedup(rows: list[dict], key: str, row: dict) -> str:
        first = rows[0][key]
        return f"{row[key] / first:.2f}x" if first and row[key] else "-"

    generation, training = results["generation"], results["training"]
    lines = [
        f"# Scaling on one machine: {results['teacher']} teacher, {results['student']} student",
        "",
        f"Budgets over `{results['job']}`: {', '.join(f'`{item}`' for item in results['budgets'])}.",
        "",
        "| work | workers | throughput | vs 1 worker (ZeRO 0) | measured over |",
        "|---|---|---|---|---|",
        *[
            f"| generation (CPU) | {row['workers']} | {row['tokens_per_s']:.1f} tokens/s | "
            f"{speedup(generation, 'tokens_per_s', row)} "
            f"| {row['tokens']} tokens in {row['seconds']:.1f} s |"
            for row in generation
        ],
        *[
            f"| student training (CPU), ZeRO {row['zero_stage']} | {row['workers']} | "
            + (f"{row['examples_per_s']:.1f} examples/s" if row["examples_per_s"] else "not measurable")
            + f" | {speedup(training, 'examples_per_s', row)} | "
            + ", ".join(
                f"{epochs} epochs: {run['examples']} examples in {run['seconds']:.1f} s"
                for epochs, run in row["runs"].items()
            )
            + " |"
            for row in training
        ],
        f"| GPU | | {results['gpu']} | | |",
        "",
        "Generation: tokens/s of the generate stage's generation pass with a fixed pool of that many teacher",
        "replicas (1 CPU each, replica start-up included). Student training: extra examples / extra seconds",
        "between the two epoch counts, so Ray Train's start-up cancels out; an epoch includes re-encoding the",
        "store's keys on every worker. ZeRO 2 shards optimizer state and gradients over the workers (with one",
        "worker it only adds DeepSpeed's partitioning work).",
        "",
        f"Machine: {results['machine']['cpus']} CPUs, {results['machine']['platform']}; 1-minute load average "
        f"{results['load_average_1m']['start']} at the start, {results['load_average_1m']['end']} at the end.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
