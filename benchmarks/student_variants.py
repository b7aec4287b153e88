"""Variants of one finished run (student settings, PPO, pool size), compared row by row on dev with the first variant.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/student_variants.py --run runs/<a finished run>

Each variant is the run's job with a few `--set` overrides (benchmarks/student_variants.yaml): it
reruns only the stages its overrides reach (for student fields, student and evaluate; the earlier
stages are reused by hash from the run's folder). Against the baseline (the first variant), the
table counts the dev rows only the baseline gets right and only the variant gets right, with the
exact McNemar test's two-sided p-value on them. Per variant it also records the generated pool's
share whose teacher label is the intended one, the store's rows, and the dev rows on which
student+store answers what the teacher's zero-shot classifier answers. Writes
benchmarks/results/student_variants.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from retrikt_ray.metrics import paired  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--run", type=Path, required=True, help="A run directory whose stages have finished (its job.yaml is the base)"
    )
    parser.add_argument(
        "--variants",
        type=Path,
        default=REPO / "benchmarks" / "student_variants.yaml",
        help="name: [section.field=value, ...]; the first is the baseline",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO / "benchmarks" / "results" / "student_variants",
        help="Results path without suffix",
    )
    args = parser.parse_args()

    import pandas as pd

    from retrikt_ray.artifacts import read_manifest
    from retrikt_ray.config import SpecError, load_spec
    from retrikt_ray.metrics import teacher_agreement
    from retrikt_ray.pipeline import run

    variants = yaml.safe_load(args.variants.read_text())
    base = load_spec(args.run / "job.yaml")
    rows, correct = [], {}
    for name, overrides in variants.items():
        try:
            spec = load_spec(
                args.run / "job.yaml",
                [*overrides, f"name={base.name}-{name}", f"storage.runs_dir={args.run.resolve().parent}"],
            )
        except SpecError as error:
            sys.exit(f"{args.variants}: variant {name}: {error}")
        run_dir = run(spec, log=lambda line, name=name: print(f"[{name}] {line}", flush=True))
        metrics = read_manifest(run_dir / "evaluate")["metrics"]
        predictions = pd.read_parquet(run_dir / "evaluate" / "predictions.parquet")
        correct[name] = (predictions["gold"] == predictions["predicted"]).to_numpy()
        agreement = teacher_agreement(predictions)
        last = read_manifest(run_dir / "student")["metrics"]["history"][-1]
        pool = read_manifest(run_dir / "generate")["counts"]
        annotated = pool["kept"] + pool.get("dropped_teacher_disagrees", 0)
        baseline = next(iter(correct))
        rows.append(
            {
                "variant": name,
                "overrides": overrides,
                "run": run_dir.name,
                "pool_teacher_agrees_with_intended_label": 1 - pool["teacher_disagrees"] / annotated,
                "store_rows": metrics["store_rows"],
                **{
                    key: metrics[key]
                    for key in ("accuracy_student_store", "accuracy_student_head", "accuracy_retrieval_only")
                },
                "teacher_agreement": agreement,
                "last_epoch": {key: last[key] for key in ("kd", "ce", "rank")},
                "against_baseline": None if name == baseline else paired(correct[baseline], correct[name]),
            }
        )
        print(rows[-1], flush=True)
    settings = {
        "run": args.run.name,
        "task": base.task.name,
        "teacher": base.teacher.model,
        "student": base.student.model,
        "dev_examples": len(next(iter(correct.values()))),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(rows, settings))
    print(args.out.with_suffix(".md").read_text())


def markdown(rows: list[dict], settings: dict) -> str:
    baseline = rows[0]["variant"]
    lines = [
        f"# Variants of `{settings['run']}`",
        "",
        f"{settings['task']}, all {settings['dev_examples']} dev rows; "
        f"teacher {settings['teacher']}, student {settings['student']}. "
        "Each variant reruns the stages its overrides reach "
        "(student fields: the student and evaluate stages on the run's store) and reuses the earlier ones by hash. "
        "The last columns compare each variant "
        f"with `{baseline}` row by row: rows only one of the two gets right, and the exact McNemar p-value. "
        "'pool labels': the share of the generated samples whose teacher label is the label they were generated for; "
        "'agrees with teacher': the dev rows on which student+store answers what the teacher's calibrated "
        "zero-shot classifier answers.",
        "",
        "| variant | overrides | pool labels | store rows | student+store | head alone | retrieval alone | "
        "agrees with teacher | last epoch kd / ce / rank | only baseline right / only variant right | p |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        paired_cells = (
            "- | -"
            if row["against_baseline"] is None
            else "{only_baseline_right} / {only_variant_right} | {p_value:.3f}".format(**row["against_baseline"])
        )
        last = row["last_epoch"]
        agreement = "-" if row["teacher_agreement"] is None else f"{100 * row['teacher_agreement']:.1f}"
        lines.append(
            f"| {row['variant']} | {' '.join(f'`{override}`' for override in row['overrides']) or 'as run'} | "
            f"{100 * row['pool_teacher_agrees_with_intended_label']:.1f} | {row['store_rows']} | "
            f"{100 * row['accuracy_student_store']:.1f} | "
            f"{100 * row['accuracy_student_head']:.1f} | {100 * row['accuracy_retrieval_only']:.1f} | {agreement} | "
            f"{last['kd']:.3f} / {last['ce']:.3f} / {last['rank']:.3f} | {paired_cells} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
