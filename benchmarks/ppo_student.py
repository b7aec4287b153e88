"""PPO that helps the student: does a student term in PPO's reward (`ppo.student_reward`) give a better student?

    .venv/bin/python benchmarks/ppo_student.py                                   # seeds 0 1 2, every definition
    .venv/bin/python benchmarks/ppo_student.py --seeds 0 --definitions targeted  # a part of it
    .venv/bin/python benchmarks/ppo_student.py --smoke                           # tiny budgets, end to end

Per seed (the few-shot draw, generation and the student's training), the job (`--job`, the demo by default: its
pool size, all dev rows) runs as (a) no PPO, (b) PPO with the reward as it is, and (c) PPO with the student term
for each definition asked (`--definitions`), whose student head learns from the soft labels at the job's
`teacher.soft_label_temperature`, as the store's. The runs share a runs folder (`--runs-dir`), so a seed's
prompt stage is trained once and every finished stage is reused, also by a rerun. Per seed and run: accuracy of
student + store, head alone and retrieval alone, the generated pool's label consistency (the share of kept
samples the teacher labels as the label they were generated for) and distinct-2, whether PPO kept the stage-1
prompt, and for (c) the exact McNemar test against (a) and against (b) on the dev rows. The mean over seeds, and
at the top of the JSON for the definition with the best mean (accuracy as fractions): `mean_gain_over_no_ppo`,
`mean_gain_over_ppo`, `min_seed_gain_over_no_ppo`. Writes benchmarks/results/ppo_student.{json,md} and
ppo_student_curves.png (PPO's reward terms per update); with `--smoke` the files go under the runs folder.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from quality import generated_pool, plot_ppo  # noqa: E402

from retrikt_ray.metrics import paired  # noqa: E402

DEFINITIONS = ("learnability", "usefulness", "targeted")
NO_PPO, PPO = "no_ppo", "ppo"
# Tiny budgets that run every stage of every variant on the packaged models in minutes: a check, not a figure.
SMOKE = [
    "prompt.epochs=1",
    "ppo.updates=2",
    "ppo.rollouts_per_update=8",
    "ppo.eval_samples_per_label=4",
    "ppo.max_new_tokens=24",
    "generate.samples_per_label=24",
    "generate.rows_per_task=24",
    "generate.max_new_tokens=24",
    "student.epochs=1",
    "data.dev_limit=48",
    "evaluate.latency_examples=2",
]
PLOT_KEYS = (
    "reward",
    "consistency_term",
    "diversity_term",
    "penalty_term",
    "student_term",
    "consistency_rate",
    "distinct_2",
    "student_labelled_accuracy",
)


def student_variant(definition: str) -> str:
    return f"student_{definition}"


def parse_weights(items: list[str], definitions: list[str]) -> dict[str, float]:
    """`--weight` items, each a weight for every definition or `definition=weight` for one, the later winning."""
    weights = dict.fromkeys(definitions, 1.0)
    for item in items:
        name, _, value = item.rpartition("=")
        if name and name not in DEFINITIONS:
            raise SystemExit(f"--weight {item}: {name} is not a definition (one of {', '.join(DEFINITIONS)})")
        try:
            weight = float(value)
        except ValueError:
            raise SystemExit(f"--weight {item}: expected a number or definition=number") from None
        weights.update({name: weight} if name else dict.fromkeys(definitions, weight))
    return {definition: weights[definition] for definition in definitions}


def variant_overrides(weights: dict[str, float], label_temperature: float) -> dict[str, list[str]]:
    """The runs of a seed, each as `--set` overrides of the job: (a), (b) and one (c) per definition, with its
    weight."""
    variants = {NO_PPO: ["ppo.enabled=false"], PPO: []}
    for definition, weight in weights.items():
        variants[student_variant(definition)] = [
            f"ppo.student_reward={definition}",
            f"ppo.student_reward_weight={weight}",
            f"ppo.student_label_temperature={label_temperature}",
        ]
    return variants


def seed_overrides(name: str, seed: int, runs_dir: Path) -> list[str]:
    """What every run of a seed sets: its name, the seed of the draw, generation and the student, the runs folder;
    and no teacher zero-shot scoring, which no row of the table needs."""
    return [
        f"name={name}",
        f"data.seed={seed}",
        f"generate.seed={seed}",
        f"student.seed={seed}",
        f"storage.runs_dir={runs_dir}",
        "evaluate.teacher_zero_shot=false",
    ]


def measure_run(run_dir: Path) -> tuple[dict, np.ndarray]:
    """A finished run's row of the table, and which dev rows its student + store gets right."""
    import pandas as pd

    from retrikt_ray.artifacts import read_manifest

    evaluation = read_manifest(run_dir / "evaluate")["metrics"]
    ppo = read_manifest(run_dir / "ppo")["metrics"]
    predictions = pd.read_parquet(run_dir / "evaluate" / "predictions.parquet")
    pool = generated_pool(run_dir)
    row = {
        "run": run_dir.name,
        "student_store": evaluation["accuracy_student_store"],
        "head_alone": evaluation["accuracy_student_head"],
        "retrieval_alone": evaluation["accuracy_retrieval_only"],
        "pool_label_consistency": pool["teacher_agreement"],
        "pool_distinct_2": pool["distinct_2"],
        "pool_kept": pool["kept"],
        "pool_generated": pool["generated"],
        "ppo_kept_stage1_prompt": ppo.get("kept_stage1_prompt", False),
        "ppo_history": ppo.get("history"),
        "dev_examples": evaluation["dev_examples"],
    }
    return row, (predictions["gold"] == predictions["predicted"]).to_numpy()


def summarise(seeds: dict[int, dict[str, dict]], definitions: list[str]) -> dict:
    """Means over seeds of every run's numbers, and each definition's gains over (a) and (b)."""
    variants = [NO_PPO, PPO, *map(student_variant, definitions)]
    keys = ("student_store", "head_alone", "retrieval_alone", "pool_label_consistency", "pool_distinct_2")
    means = {
        variant: {key: float(np.mean([runs[variant][key] for runs in seeds.values()])) for key in keys}
        for variant in variants
    }
    gains = {}
    for definition in definitions:
        ours = student_variant(definition)
        over_no_ppo = [runs[ours]["student_store"] - runs[NO_PPO]["student_store"] for runs in seeds.values()]
        over_ppo = [runs[ours]["student_store"] - runs[PPO]["student_store"] for runs in seeds.values()]
        gains[definition] = {
            "mean_gain_over_no_ppo": float(np.mean(over_no_ppo)),
            "mean_gain_over_ppo": float(np.mean(over_ppo)),
            "min_seed_gain_over_no_ppo": float(np.min(over_no_ppo)),
            "pool_label_consistency_gain_over_no_ppo": means[ours]["pool_label_consistency"]
            - means[NO_PPO]["pool_label_consistency"],
        }
    return {"means": means, "gains": gains}


def targets(gains: dict) -> dict[str, bool]:
    """The issue's targets for one definition's gains."""
    return {
        "mean_at_least_1.5_points_above_no_ppo": gains["mean_gain_over_no_ppo"] >= 0.015,
        "mean_above_ppo": gains["mean_gain_over_ppo"] > 0,
        "no_seed_below_no_ppo": gains["min_seed_gain_over_no_ppo"] >= 0,
        "pool_label_consistency_not_below_no_ppo": gains["pool_label_consistency_gain_over_no_ppo"] >= 0,
    }


def markdown(results: dict) -> str:
    settings, summary = results["settings"], results["summary"]
    lines = [
        f"# PPO with a student term in its reward: {settings['task']}, seeds {', '.join(map(str, settings['seeds']))}",
        "",
        f"Job `{settings['job']}`{' with smoke budgets' if settings['smoke'] else ''}, all "
        f"{settings['dev_examples']} dev rows scored. (a) `no_ppo`: the stage-1 prompt generates; (b) `ppo`: PPO "
        "with the reward as it is; (c) `student_<definition>`: PPO with the student term "
        f"(`ppo.student_reward`, weights {', '.join(f'{d} {w:g}' for d, w in settings['weights'].items())}; "
        "the head's soft labels at temperature "
        f"{settings['label_temperature']:g}). Accuracy in %; 'pool labels': the share of the kept samples the "
        "teacher labels as the label they were generated for; the last columns compare (c) row by row with (a) "
        "and with (b): dev rows only the other gets right / only (c) gets right, exact McNemar p.",
        "",
        "| seed | run | student+store | head alone | retrieval alone | pool labels | pool distinct-2 | kept of "
        "generated | stage-1 prompt kept | vs (a) | p | vs (b) | p |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for seed, runs in results["seeds"].items():
        for variant, row in runs.items():
            versus = []
            for key in ("against_no_ppo", "against_ppo"):
                test = row.get(key)
                versus += (
                    ["-", "-"]
                    if test is None
                    else [f"{test['only_baseline_right']} / {test['only_variant_right']}", f"{test['p_value']:.3f}"]
                )
            lines.append(
                f"| {seed} | {variant} | {100 * row['student_store']:.1f} | {100 * row['head_alone']:.1f} | "
                f"{100 * row['retrieval_alone']:.1f} | {100 * row['pool_label_consistency']:.1f} | "
                f"{row['pool_distinct_2']:.3f} | {row['pool_kept']} of {row['pool_generated']} | "
                f"{'yes' if row['ppo_kept_stage1_prompt'] else 'no'} | {' | '.join(versus)} |"
            )
    lines += [
        "",
        "## Mean over seeds",
        "",
        "| run | student+store | head alone | retrieval alone | pool labels | pool distinct-2 |",
        "|---|---|---|---|---|---|",
    ]
    for variant, mean in summary["means"].items():
        lines.append(
            f"| {variant} | {100 * mean['student_store']:.1f} | {100 * mean['head_alone']:.1f} | "
            f"{100 * mean['retrieval_alone']:.1f} | {100 * mean['pool_label_consistency']:.1f} | "
            f"{mean['pool_distinct_2']:.3f} |"
        )
    lines += [
        "",
        "## Gains of student + store (points)",
        "",
        "| definition | mean over (a) | mean over (b) | worst seed over (a) | pool labels over (a) | targets met |",
        "|---|---|---|---|---|---|",
    ]
    for definition, gains in summary["gains"].items():
        met = targets(gains)
        lines.append(
            f"| {definition} | {100 * gains['mean_gain_over_no_ppo']:+.1f} | {100 * gains['mean_gain_over_ppo']:+.1f} "
            f"| {100 * gains['min_seed_gain_over_no_ppo']:+.1f} | "
            f"{100 * gains['pool_label_consistency_gain_over_no_ppo']:+.1f} | {sum(met.values())} of {len(met)} |"
        )
    best = results["best_definition"]
    lines += [
        "",
        f"Best mean: `{best}`. Targets for it: "
        + "; ".join(f"{name} {'met' if ok else 'NOT met'}" for name, ok in results["targets"].items())
        + ".",
        "",
        f"Curves: `{results['curves']}` (PPO's reward terms per update, every PPO run). "
        f"Machine: {results['machine']['cpus']} CPUs; {results['wall_seconds']:.0f} s for this invocation.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", default=str(REPO / "jobs" / "demo.yaml"), help="The job every run starts from")
    parser.add_argument("--seeds", nargs="+", type=int, help="Seeds to run (default 0 1 2; with --smoke, 0)")
    parser.add_argument("--definitions", nargs="+", choices=DEFINITIONS, default=list(DEFINITIONS))
    parser.add_argument(
        "--weight",
        nargs="+",
        default=[],
        metavar="[DEFINITION=]WEIGHT",
        help="ppo.student_reward_weight of the (c) runs: one for all, or per definition (default 1)",
    )
    parser.add_argument(
        "--label-temperature",
        type=float,
        help="ppo.student_label_temperature of the (c) runs (default: the job's teacher.soft_label_temperature)",
    )
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="Job overrides")
    parser.add_argument("--runs-dir", default=str(REPO / "runs" / "ppo_student"))
    parser.add_argument("--out", help="Results path without suffix (default: benchmarks/results/ppo_student)")
    parser.add_argument("--smoke", action="store_true", help="Tiny budgets: checks that every run goes through")
    args = parser.parse_args()

    from retrikt_ray.config import SpecError, load_spec
    from retrikt_ray.pipeline import run
    from retrikt_ray.ray_session import ray_session

    runs_dir = Path(args.runs_dir).resolve()
    if args.seeds is None:
        args.seeds = [0] if args.smoke else [0, 1, 2]
    default_out = runs_dir / "ppo_student_smoke" if args.smoke else REPO / "benchmarks" / "results" / "ppo_student"
    out = Path(args.out) if args.out else default_out
    job_overrides = [*(SMOKE if args.smoke else []), *args.set]
    try:
        base = load_spec(args.job, job_overrides)
    except SpecError as error:
        sys.exit(f"{args.job}: {error}")
    temperature = args.label_temperature if args.label_temperature is not None else base.teacher.soft_label_temperature
    weights = parse_weights(args.weight, args.definitions)
    variants = variant_overrides(weights, temperature)
    started = time.perf_counter()
    seeds: dict[int, dict[str, dict]] = {}
    histories: dict[str, list[dict]] = {}
    with ray_session(base):
        for seed in args.seeds:
            runs, correct = {}, {}
            for variant, overrides in variants.items():
                name = f"{base.name}-ppo-student-s{seed}-{variant}"
                spec = load_spec(args.job, [*job_overrides, *seed_overrides(name, seed, runs_dir), *overrides])
                run_dir = run(spec, log=lambda line, tag=f"s{seed} {variant}": print(f"[{tag}] {line}", flush=True))
                runs[variant], correct[variant] = measure_run(run_dir)
                if runs[variant]["ppo_history"]:
                    histories[f"s{seed} {variant}"] = runs[variant]["ppo_history"]
            for definition in args.definitions:
                ours = student_variant(definition)
                runs[ours]["against_no_ppo"] = paired(correct[NO_PPO], correct[ours])
                runs[ours]["against_ppo"] = paired(correct[PPO], correct[ours])
            seeds[seed] = runs
            print(f"[ppo_student] seed {seed}: " + ", ".join(f"{v} {r['student_store']:.3f}" for v, r in runs.items()))
    summary = summarise(seeds, args.definitions)
    best = max(args.definitions, key=lambda definition: summary["means"][student_variant(definition)]["student_store"])
    curves = out.parent / f"{out.name}_curves.png"
    results = {
        **summary["gains"][best],
        "best_definition": best,
        "targets": targets(summary["gains"][best]),
        "settings": {
            "job": os.path.relpath(args.job, REPO),
            "task": base.task.name,
            "seeds": args.seeds,
            "definitions": args.definitions,
            "weights": weights,
            "label_temperature": temperature,
            "overrides": job_overrides,
            "smoke": args.smoke,
            "dev_examples": next(iter(next(iter(seeds.values())).values()))["dev_examples"],
        },
        "summary": summary,
        "seeds": {
            str(seed): {variant: {k: v for k, v in row.items() if k != "ppo_history"} for variant, row in runs.items()}
            for seed, runs in seeds.items()
        },
        "histories": histories,
        "curves": curves.name,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    out.with_suffix(".md").write_text(markdown(results))
    plot_ppo(histories, curves, PLOT_KEYS)
    print(markdown(results))


if __name__ == "__main__":
    main()
