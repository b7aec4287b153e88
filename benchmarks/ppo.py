"""PPO on the soft prompt: what its learning rate does to the samples the teacher generates.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/ppo.py --lr 0.001 0.01 0.03

Starts from the stage-1 prompt of the quality benchmark's full run (profile, task and seed as given;
the prompt stage is reused when that run finished it) and runs the PPO stage once per learning rate.
Each PPO stage measures the stage-1 and its final prompt on the same fixed draws (the manifest's
`before` / `after`), so the table compares prompts, not sampling luck. Finished runs are reused.
Writes benchmarks/results/ppo.{json,md} and ppo_curves.png (reward terms, consistency, KL per update).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from quality import load_profile, variant_specs  # noqa: E402

from retrikt_ray.artifacts import read_manifest  # noqa: E402


def plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ("reward", "consistency_term", "diversity_term", "consistency_rate", "distinct_2", "kl")
    figure, axes = plt.subplots(2, 3, figsize=(12, 6))
    for axis, key in zip(axes.flat, keys):
        for lr, result in results.items():
            history = result["history"]
            axis.plot(
                [entry["update"] for entry in history], [entry[key] for entry in history], marker="o", label=f"lr {lr}"
            )
        axis.set_title(f"{key} (rollouts of each update)")
        axis.set_xlabel("PPO update")
    axes.flat[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def markdown(results: dict[str, dict], settings: dict, curves: str) -> str:
    lines = [
        f"# PPO on the soft prompt: {settings['task']}, seed {settings['seed']}, profile `{settings['profile']}`",
        "",
        f"{settings['updates']} updates of {settings['rollouts']} rollouts from the same stage-1 prompt, "
        f"diversity weight beta = {settings['beta']:g}, GAE lambda {settings['gae_lambda']:g}, "
        f"{'one prompt per label' if settings['per_label_prompt'] else 'one prompt shared by the labels'}, "
        f"a malformed sample's consistency term: {settings['malformed_consistency']}. Before / after: "
        f"the stage-1 and the final prompt on the same fixed draws ({settings['eval_samples']} per label), "
        "scored by the teacher's calibrated classifier.",
        "",
        "| lr | label consistency before -> after | log p_C(y given x) before -> after | distinct-2 before -> after | "
        "max cos within the draws before -> after | valid before -> after | KL at the last update | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for lr, result in results.items():
        before, after = result["before"], result["after"]

        def pair(key: str) -> str:
            return f"{before[key]:.3f} -> {after[key]:.3f}"  # noqa: B023 called only within this iteration

        lines.append(
            f"| {lr} | {pair('consistency_rate')} | {pair('consistency_term')} | {pair('distinct_2')} | "
            f"{pair('mean_max_cos')} | "
            f"{pair('valid_rate')} | {result['history'][-1]['kl']:.3f} | {result['seconds']:.0f} |"
        )
    lines += ["", f"Curves: `{curves}`.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lr", nargs="+", type=float, required=True, help="PPO learning rates to compare")
    parser.add_argument("--profile", default="cpu-small", help="Profile of benchmarks/quality.yaml the run starts from")
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--updates", type=int, default=6)
    parser.add_argument("--rollouts", type=int, default=16, help="Rollouts per update")
    parser.add_argument("--beta", type=float, help="Weight of the diversity reward (default: the profile's)")
    parser.add_argument("--gae-lambda", type=float, help="GAE lambda (default: the profile's)")
    parser.add_argument("--per-label-prompt", action="store_true", help="Tune one copy of the stage-1 prompt per label")
    parser.add_argument(
        "--malformed-consistency",
        choices=("valid_mean", "floor"),
        help="Consistency term of a malformed sample (default: the profile's)",
    )
    parser.add_argument("--eval-samples", type=int, default=48, help="Fixed draws per label for before / after")
    parser.add_argument("--runs-dir", default=str(REPO / "runs" / "ppoexp"))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "ppo"))
    args = parser.parse_args()

    from retrikt_ray import pipeline
    from retrikt_ray.ray_session import ray_session

    profile = load_profile(REPO / "benchmarks" / "quality.yaml", args.profile)
    base = variant_specs(profile, args.profile, args.task, args.seed, Path(args.runs_dir))["full"]
    results = {}
    with ray_session(base):
        for lr in args.lr:
            spec = base.model_copy(deep=True)
            spec.name = f"ppoexp-lr{lr:g}"
            spec.ppo.lr = lr
            spec.ppo.updates = args.updates
            spec.ppo.rollouts_per_update = args.rollouts
            if args.beta is not None:
                spec.ppo.beta = args.beta
            if args.gae_lambda is not None:
                spec.ppo.gae_lambda = args.gae_lambda
            spec.ppo.per_label_prompt = spec.ppo.per_label_prompt or args.per_label_prompt
            if args.malformed_consistency is not None:
                spec.ppo.malformed_consistency = args.malformed_consistency
            spec.ppo.eval_samples_per_label = args.eval_samples
            pipeline.run(spec, only="prompt")
            run_dir = pipeline.run(spec, only="ppo")
            manifest = read_manifest(run_dir / "ppo")
            metrics = manifest["metrics"]
            results[f"{lr:g}"] = {key: metrics[key] for key in ("before", "after", "history")} | {
                "seconds": manifest["seconds"]
            }
    settings = {
        "profile": args.profile,
        "task": args.task,
        "seed": args.seed,
        "updates": args.updates,
        "rollouts": args.rollouts,
        "eval_samples": args.eval_samples,
        "beta": spec.ppo.beta,
        "gae_lambda": spec.ppo.gae_lambda,
        "per_label_prompt": spec.ppo.per_label_prompt,
        "malformed_consistency": spec.ppo.malformed_consistency,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(
        json.dumps({"settings": settings, "results": results}, indent=2, default=float) + "\n"
    )
    curves = out.parent / f"{out.name}_curves.png"
    out.with_suffix(".md").write_text(markdown(results, settings, curves.name))
    plot(results, curves)
    print(markdown(results, settings, curves.name))


if __name__ == "__main__":
    main()
