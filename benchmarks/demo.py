"""Measure the demo job end to end and record it in benchmarks/results/demo.{json,md}.

    .venv/bin/python benchmarks/demo.py                 # runs jobs/demo.yaml from scratch (--force)
    .venv/bin/python benchmarks/demo.py --reuse         # only collects a finished run of the job

Wall time covers the whole `retrikt run` command (Ray start-up included), after set-up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from retrikt_ray.artifacts import read_manifest, run_dir_for  # noqa: E402
from retrikt_ray.config import load_spec  # noqa: E402
from retrikt_ray.pipeline import STAGE_NAMES  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", default="jobs/demo.yaml")
    parser.add_argument("--reuse", action="store_true", help="collect a finished run instead of re-running it")
    parser.add_argument("--out", default="benchmarks/results/demo")
    args = parser.parse_args()

    spec = load_spec(REPO / args.job)
    wall = None
    if not args.reuse:
        started = time.perf_counter()
        subprocess.run([sys.executable, "cli.py", "run", args.job, "--force"], cwd=REPO, check=True)
        wall = time.perf_counter() - started
    run_dir = REPO / run_dir_for(spec) if not Path(spec.storage.runs_dir).is_absolute() else run_dir_for(spec)
    manifests = {name: read_manifest(run_dir / name) for name in STAGE_NAMES}
    evaluation = manifests["evaluate"]["metrics"]
    generation = manifests["generate"]["counts"]
    ppo = manifests["ppo"]["metrics"]
    results = {
        "job": args.job,
        "task": spec.task.name,
        "shots_per_class": spec.data.shots,
        "teacher": spec.teacher.model,
        "student": spec.student.model,
        "dev_examples": evaluation["dev_examples"],
        "accuracy": {
            "student_store": evaluation["accuracy_student_store"],
            "student_head_alone": evaluation["accuracy_student_head"],
            "retrieval_alone": evaluation["accuracy_retrieval_only"],
            "teacher_zero_shot_calibrated": evaluation.get("accuracy_teacher_zero_shot"),
        },
        "student_store_agrees_with_teacher": evaluation.get("agreement_student_teacher"),
        "samples": {"generated": generation["generated"], "kept": generation["kept"], "counts": generation},
        "ppo": {
            key: {"before": ppo["before"][key], "after": ppo["after"][key]}
            for key in ("consistency_rate", "distinct_2", "mean_max_cos")
        }
        if ppo.get("history")
        else None,
        "student_lam": manifests["student"]["metrics"].get("lam"),
        "retrieval_labelled": manifests["student"]["metrics"].get("retrieval_labelled"),
        "seconds_per_stage": {name: manifests[name]["seconds"] for name in STAGE_NAMES},
        "wall_seconds": round(wall, 1) if wall is not None else None,
        "parameters": {
            "teacher": evaluation.get("params_teacher"),
            "student": evaluation["params_student"],
            "store_rows": evaluation["store_rows"],
        },
        "cpu_ms_per_example": {
            "teacher": evaluation.get("ms_per_example_teacher"),
            "student_store": evaluation["ms_per_example_student_store"],
        },
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "run_dir": str(run_dir.relative_to(REPO) if run_dir.is_relative_to(REPO) else run_dir),
    }
    out = REPO / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))


def markdown(results: dict) -> str:
    accuracy, params, latency = results["accuracy"], results["parameters"], results["cpu_ms_per_example"]
    lines = [
        f"# Demo: {results['task']}, {results['shots_per_class']} labelled examples per class, "
        f"{results['dev_examples']} dev examples",
        "",
        "| model | dev accuracy | parameters | CPU ms / example |",
        "|---|---|---|---|",
        f"| teacher, calibrated zero-shot | {accuracy['teacher_zero_shot_calibrated']:.3f} | {params['teacher']:,} | "
        f"{latency['teacher']:.1f} |",
        f"| student + store (RetriKT) | {accuracy['student_store']:.3f} | "
        f"{params['student']:,} + {params['store_rows']:,} store rows | {latency['student_store']:.1f} |",
        f"| student head alone | {accuracy['student_head_alone']:.3f} | {params['student']:,} | |",
        f"| retrieval alone | {accuracy['retrieval_alone']:.3f} | | |",
        "",
        f"Samples: {results['samples']['generated']} generated, {results['samples']['kept']} kept.",
        *(
            [
                f"Student + store answers what the teacher answers on "
                f"{results['student_store_agrees_with_teacher']:.1%} of the dev examples."
            ]
            if results.get("student_store_agrees_with_teacher") is not None
            else []
        ),
        *(
            [
                "The student stage's retrieval gate set lam to 0 (the store's soft labels, retrieved by the untrained"
                " student, labelled the labelled examples no better than the majority label): student + store"
                " predicts with its head alone in this run."
            ]
            if results.get("student_lam") == 0
            else []
        ),
        "",
        "| stage | seconds |",
        "|---|---|",
        *[f"| {name} | {seconds:.0f} |" for name, seconds in results["seconds_per_stage"].items()],
        "| whole `retrikt run` (wall, Ray start-up included) | "
        f"{'not measured (--reuse)' if results['wall_seconds'] is None else round(results['wall_seconds'])} |",
        "",
        f"Machine: {results['machine']['cpus']} CPUs, {results['machine']['platform']}.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
