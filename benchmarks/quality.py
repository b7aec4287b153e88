"""Quality benchmark: RetriKT against what a user would pick instead, on SST-2, RTE, CB and COPA.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/quality.py --profile cpu-small
    PYTHONPATH=$PWD .venv/bin/python benchmarks/quality.py --profile gpu-full

Per task and seed (k labelled examples per class, COPA k in total) it scores on the dev set: the
teacher (calibrated zero-shot; stage-1 tuned prompt as classifier), the student alone (fine-tuned,
linear probe, SetFit), the student distilled on the generated data without retrieval (ZeroGen-style),
RetriKT (student + store) and its ablations (no PPO, head alone, no L_rank, store 25% / 50%; head alone
and no L_rank on every task, the others on the profile's ablation tasks), and on the ablation tasks one
step beyond the recipe when the profile asks for it: the full recipe with `unlabelled_samples` in-domain
texts, labelled by the teacher, added to the store (the `unlabelled` stage). Pipeline
runs share their finished stages through the stage hashes (all variants of a task and seed reuse its
prompt; all but no-PPO its PPO and generation). Every finished cell is written to the results JSON
at once, so a rerun skips it. Writes benchmarks/results/quality.{json,md} and three PNGs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from baselines import BaselineSettings  # noqa: E402

from retrikt_ray.config import JobSpec, format_validation_error  # noqa: E402
from retrikt_ray.metrics import accuracy, paired  # noqa: E402

# Row order of the table, with the label each method is shown under.
METHODS = {
    "teacher_zero_shot": "teacher, calibrated zero-shot",
    "teacher_tuned_prompt": "teacher, stage-1 tuned prompt as classifier",
    "student_finetuned": "student alone, fine-tuned on the labelled examples",
    "student_linear_probe": "student alone, linear probe on frozen embeddings",
    "student_setfit": "student alone, SetFit",
    "zerogen": "student distilled on generated data, no retrieval (ZeroGen-style)",
    "retrikt": "RetriKT: student + store, full recipe",
    "retrikt_no_ppo": "ablation: no PPO (stage-1 prompt generates)",
    "retrikt_head_alone": "ablation: no retrieval at inference (head alone)",
    "retrikt_no_rank": "ablation: no L_rank (b = 0)",
}
STUDENT_ALONE = ("student_finetuned", "student_linear_probe", "student_setfit")
UNLABELLED = "retrikt_unlabelled"


class Profile(BaseModel):
    """One budget of the benchmark (a profile of benchmarks/quality.yaml)."""

    model_config = ConfigDict(extra="forbid")

    description: str = Field(description="What machine and time the budget is sized for, and what it cuts")
    tasks: list[str] = Field(description="Built-in task names")
    seeds: list[int] = Field(description="Seeds of the few-shot draw, generation and student training")
    shots: int = Field(16, ge=1, description="k labelled examples per class (choice tasks: in total)")
    dev_limit: int | None = Field(None, ge=1, description="Score on the first N dev rows of every task (None: all)")
    ablation_tasks: list[str] = Field(description="Tasks on which the ablations run (no L_rank runs on every task)")
    store_fractions: list[float] = Field(
        description="Store sizes of the store-size ablation, below 1 (1 is the full run)"
    )
    rank_weights: list[float] = Field(
        default_factory=list,
        description="Further L_rank weights b to ablate, besides 0 and the profile's own (the full run)",
    )
    unlabelled_samples: int = Field(
        0,
        ge=0,
        description=(
            "Beyond the recipe, on the ablation tasks: the full run plus this many teacher-labelled in-domain texts "
            "(0: not run)"
        ),
    )
    student_variants: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description=(
            "Beyond the recipe, on the ablation tasks: named student-section settings (e.g. noise-robust training "
            "on the teacher's labels), each run as the full recipe with them on the full run's store and compared "
            "with the full run row by row"
        ),
    )
    job_file: str | None = Field(
        None,
        description=(
            "A job file (relative to the repository) whose settings every pipeline run starts from, under `job`: "
            "a profile that is a job (the demo) names it instead of copying it, so their runs share stage hashes"
        ),
    )
    job: dict[str, Any] = Field(default_factory=dict, description="Job-spec mapping applied to every pipeline run")
    task_job: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Per task name, a job-spec mapping applied over `job` (e.g. longer generation for pair tasks)",
    )
    baselines: BaselineSettings = Field(
        default_factory=BaselineSettings, description="Budgets of the student-alone baselines"
    )

    @model_validator(mode="after")
    def _task_job_names_profile_tasks(self):
        unknown = sorted(set(self.task_job) - set(self.tasks))
        if unknown:
            raise ValueError(f"task_job: {', '.join(unknown)} not in tasks {self.tasks}")
        if self.job_file is not None and not (REPO / self.job_file).is_file():
            raise ValueError(f"job_file: {self.job_file} not found under {REPO}")
        return self

    def base_job(self) -> dict[str, Any]:
        """`job` over the job file's settings, when the profile names one."""
        if self.job_file is None:
            return self.job
        return _merge(yaml.safe_load((REPO / self.job_file).read_text()) or {}, self.job)


def load_profile(path: Path, name: str) -> Profile:
    profiles = yaml.safe_load(Path(path).read_text())["profiles"]
    if name not in profiles:
        raise SystemExit(f"--profile {name}: not in {path} (one of {', '.join(profiles)})")
    try:
        return Profile.model_validate(profiles[name])
    except ValidationError as error:
        raise SystemExit(f"{path}, profile {name}: {format_validation_error(error)}") from None


def fraction_method(fraction: float) -> str:
    return f"retrikt_store_{fraction * 100:g}"


def rank_method(weight: float) -> str:
    return f"retrikt_rank_b{weight:g}"


def student_variant_method(name: str) -> str:
    return f"retrikt_student_{name}"


def method_labels(profile: Profile) -> dict[str, str]:
    """Row order of the table with each method's label: METHODS, then the profile's own ablations."""
    labels = dict(METHODS)
    labels.update({rank_method(weight): f"ablation: L_rank weight b = {weight:g}" for weight in profile.rank_weights})
    labels.update(
        {fraction_method(fraction): f"ablation: store {fraction * 100:g}%" for fraction in profile.store_fractions}
    )
    for name, settings in profile.student_variants.items():
        labels[student_variant_method(name)] = (
            f"beyond the recipe: student {name} ("
            + ", ".join(f"{field} {value}" for field, value in settings.items())
            + ")"
        )
    if profile.unlabelled_samples:
        labels[UNLABELLED] = (
            f"beyond the recipe: full recipe + {profile.unlabelled_samples} unlabelled in-domain texts, "
            "labelled by the teacher"
        )
    return labels


def variant_specs(profile: Profile, profile_name: str, task: str, seed: int, runs_dir: Path) -> dict[str, JobSpec]:
    """The pipeline runs of one task and seed: full, ZeroGen-style, no L_rank, and (on ablation tasks) the other
    ablations."""
    # No L_rank runs on every task: it reruns only the student and evaluate stages.
    changes: dict[str, dict] = {
        "full": {},
        "zerogen": {"student": {"lam": 0.0, "b": 0.0}},
        "no_rank": {"student": {"b": 0.0}},
    }
    if task in profile.ablation_tasks:
        changes["no_ppo"] = {"ppo": {"enabled": False}}
        for weight in profile.rank_weights:
            changes[rank_method(weight).removeprefix("retrikt_")] = {"student": {"b": weight}}
        for fraction in profile.store_fractions:
            changes[fraction_method(fraction).removeprefix("retrikt_")] = {"store": {"fraction": fraction}}
        for name, settings in profile.student_variants.items():
            changes[student_variant_method(name).removeprefix("retrikt_")] = {"student": settings}
        if profile.unlabelled_samples:
            changes[UNLABELLED.removeprefix("retrikt_")] = {"unlabelled": {"samples": profile.unlabelled_samples}}
    specs = {}
    for variant, change in changes.items():
        raw = _merge(
            _merge(profile.base_job(), profile.task_job.get(task, {})),
            {
                "name": f"quality-{profile_name}-{task}-s{seed}-{variant}",
                "task": {"name": task},
                "data": {"shots": profile.shots, "seed": seed, "dev_limit": profile.dev_limit},
                "generate": {"seed": seed},
                "student": {"seed": seed},
                # The zero-shot teacher depends on the dev set only: score it once per task and seed.
                "evaluate": {"teacher_zero_shot": variant == "full"},
                "storage": {"runs_dir": str(runs_dir)},
            },
        )
        specs[variant] = JobSpec.model_validate(_merge(raw, change))
    return specs


def _merge(base: dict, change: dict) -> dict:
    merged = dict(base)
    for key, value in change.items():
        merged[key] = _merge(merged.get(key, {}), value) if isinstance(value, dict) else value
    return merged


# ------------------------------------------------------------------------------------- aggregation
def aggregate(cells: list[dict]) -> dict[str, dict[str, dict]]:
    """task -> method -> {mean, min, max, seeds} of the cells' accuracies."""
    grouped: dict[tuple[str, str], dict[int, float]] = {}
    for cell in cells:
        grouped.setdefault((cell["task"], cell["method"]), {})[cell["seed"]] = cell["accuracy"]
    table: dict[str, dict[str, dict]] = {}
    for (task, method), by_seed in grouped.items():
        values = np.array(list(by_seed.values()), dtype=float)
        table.setdefault(task, {})[method] = {
            # Clipped: the float mean of equal values can fall a rounding error outside them (3 x 19/56).
            "mean": float(np.clip(values.mean(), values.min(), values.max())),
            "min": float(values.min()),
            "max": float(values.max()),
            "seeds": sorted(by_seed),
        }
    return table


def retention(cells: list[dict]) -> dict[str, dict]:
    """task -> {mean, min, max, seeds} of RetriKT's accuracy over the calibrated zero-shot teacher's, per seed.

    Paired per seed (both come from the same run), so a seed with only one of the two is left out."""
    by_seed: dict[tuple[str, int], dict[str, float]] = {}
    for cell in cells:
        if cell["method"] in ("retrikt", "teacher_zero_shot"):
            by_seed.setdefault((cell["task"], cell["seed"]), {})[cell["method"]] = cell["accuracy"]
    ratios = [
        {"task": task, "seed": seed, "method": "retention", "accuracy": pair["retrikt"] / pair["teacher_zero_shot"]}
        for (task, seed), pair in by_seed.items()
        if len(pair) == 2 and pair["teacher_zero_shot"] > 0
    ]
    return {task: methods["retention"] for task, methods in aggregate(ratios).items()}


def format_cell(summary: dict | None) -> str:
    if summary is None:
        return "-"
    if summary["min"] == summary["max"]:
        return f"{100 * summary['mean']:.1f}"
    return f"{100 * summary['mean']:.1f} ({100 * summary['min']:.1f}-{100 * summary['max']:.1f})"


def describe_store_on_labelled(extra: dict) -> str:
    """The student stage's check of the store before training, and whether it dropped retrieval."""
    measured = extra.get("store_on_labelled")
    if not measured:
        return "-"
    line = (
        f"{100 * measured['retrieval_accuracy']:.0f}% ({100 * measured['majority_share']:.0f}%) "
        f"of {measured['examples']}"
    )
    return line + (": retrieval gated off, head alone" if extra.get("student_lam") == 0 else "")


def targets(table: dict, tasks: list[str]) -> dict[str, Any]:
    """The issue's targets, checked on the means."""

    def mean(task, method):
        return table.get(task, {}).get(method, {}).get("mean")

    out: dict[str, Any] = {}
    sst2, setfit = mean("sst2", "retrikt"), mean("sst2", "student_setfit")
    if sst2 is not None:
        out["sst2_retrikt_at_least_84.4"] = sst2 >= 0.844
        if setfit is not None:
            out["sst2_retrikt_5_points_above_setfit"] = sst2 >= setfit + 0.05
    for task in tasks:
        best = [mean(task, method) for method in STUDENT_ALONE if mean(task, method) is not None]
        if mean(task, "retrikt") is not None and best:
            out[f"{task}_retrikt_above_best_student_alone"] = mean(task, "retrikt") > max(best)
    return out


# ------------------------------------------------------------------------------------------- plots
def plot_accuracy(table: dict, tasks: list[str], labels: dict[str, str], path: Path) -> None:
    """Grouped bars: mean accuracy per method per task, min-max over seeds as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [method for method in labels if any(method in table.get(task, {}) for task in tasks)]
    figure, axis = plt.subplots(figsize=(max(8, 1.6 * len(tasks) * max(1, len(methods)) / 4), 4.5))
    width = 0.8 / max(1, len(methods))
    for index, method in enumerate(methods):
        summaries = [table.get(task, {}).get(method) for task in tasks]
        means = [100 * s["mean"] if s else np.nan for s in summaries]
        errors = [
            [100 * (s["mean"] - s["min"]) if s else 0 for s in summaries],
            [100 * (s["max"] - s["mean"]) if s else 0 for s in summaries],
        ]
        offset = (index - (len(methods) - 1) / 2) * width
        axis.bar(
            np.arange(len(tasks)) + offset,
            means,
            width,
            yerr=errors,
            capsize=2,
            label=method,
            color=plt.cm.tab20(index % 20),
        )
    axis.set_xticks(np.arange(len(tasks)), tasks)
    axis.set_ylabel("dev accuracy (%)")
    axis.set_title("accuracy per method per task (mean, min-max over seeds)")
    axis.legend(fontsize=6, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_store_size(table: dict, fractions: list[float], task: str, path: Path) -> None:
    """Accuracy of student + store against the share of the store kept (1 = the full run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(fraction, table.get(task, {}).get(fraction_method(fraction))) for fraction in sorted(fractions)]
    points.append((1.0, table.get(task, {}).get("retrikt")))
    points = [(fraction, summary) for fraction, summary in points if summary]
    figure, axis = plt.subplots(figsize=(5, 3.5))
    if points:
        x = [100 * fraction for fraction, _ in points]
        axis.errorbar(
            x,
            [100 * s["mean"] for _, s in points],
            yerr=[[100 * (s["mean"] - s["min"]) for _, s in points], [100 * (s["max"] - s["mean"]) for _, s in points]],
            marker="o",
            capsize=3,
        )
    axis.set_xlabel("store size (% of kept samples)")
    axis.set_ylabel("dev accuracy (%)")
    axis.set_title(f"{task}: accuracy against store size")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


PPO_PLOT_KEYS = ("reward", "consistency_term", "diversity_term", "penalty_term", "consistency_rate", "distinct_2")


def plot_ppo(histories: dict[str, list[dict]], path: Path, keys: tuple[str, ...] = PPO_PLOT_KEYS) -> None:
    """`keys` of the PPO history (reward terms, label consistency) per update, one line per run; an update
    that lacks a key is left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = (len(keys) + 1) // 2
    figure, axes = plt.subplots(2, columns, figsize=(4 * columns, 6))
    for axis, key in zip(axes.flat, keys):
        for name, history in histories.items():
            axis.plot(
                [entry["update"] for entry in history],
                [entry.get(key, np.nan) for entry in history],
                marker="o",
                label=name,
            )
        axis.set_title(key)
        axis.set_xlabel("PPO update")
    axes.flat[0].legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# -------------------------------------------------------------------------------------------- cells
class Cells:
    """The finished cells, persisted to the results JSON after each one, so a rerun skips them."""

    def __init__(self, path: Path, profile_name: str):
        self.path = path
        self.profile_name = profile_name
        existing = json.loads(path.read_text()) if path.is_file() else {}
        same = existing.get("profile") == profile_name
        self.cells: list[dict] = existing.get("cells", []) if same else []
        self.extras: dict[str, dict] = existing.get("extras", {}) if same else {}
        self.write_hook: Callable[[], None] | None = None

    def has(self, task: str, seed: int, method: str) -> bool:
        return any((c["task"], c["seed"], c["method"]) == (task, seed, method) for c in self.cells)

    def add(
        self, task: str, seed: int, method: str, accuracy: float, seconds: float, against_full: dict | None = None
    ) -> None:
        cell = {"task": task, "seed": seed, "method": method, "accuracy": float(accuracy), "seconds": round(seconds, 1)}
        if against_full is not None:
            cell["against_full"] = against_full
        self.cells.append(cell)
        print(f"[quality] {task} seed {seed} {method}: {accuracy:.3f} ({seconds:.0f}s)", flush=True)
        if self.write_hook:
            self.write_hook()


def run_task_seed(profile: Profile, profile_name: str, task_name: str, seed: int, runs_dir: Path, cells: Cells) -> None:
    """Every cell of one task and seed that is not finished yet."""
    import baselines

    from retrikt_ray.artifacts import read_manifest
    from retrikt_ray.pipeline import run
    from retrikt_ray.tasks import load_dev, load_few_shot

    specs = variant_specs(profile, profile_name, task_name, seed, runs_dir)
    full = specs["full"]
    task, few_shot = load_few_shot(full)
    _, dev = load_dev(full)
    gold = np.array([example.label for example in dev])

    def cell(method: str, score: Callable[[], float]) -> None:
        if cells.has(task_name, seed, method):
            return
        started = time.perf_counter()
        cells.add(task_name, seed, method, score(), time.perf_counter() - started)

    settings = profile.baselines
    cell(
        "student_finetuned",
        lambda: accuracy(
            gold, baselines.head_predictions(task, baselines.finetune_student(full, task, few_shot, settings), dev)
        ),
    )
    cell(
        "student_linear_probe",
        lambda: accuracy(
            gold, baselines.head_predictions(task, baselines.linear_probe(full, task, few_shot, settings), dev)
        ),
    )
    cell("student_setfit", lambda: accuracy(gold, baselines.setfit_student(full, task, few_shot, dev, settings)))

    run_dirs: dict[str, Path] = {}

    def pipeline_metrics(variant: str) -> dict:
        run_dirs[variant] = run(
            specs[variant], log=lambda line: print(f"[{task_name} s{seed} {variant}] {line}", flush=True)
        )
        return read_manifest(run_dirs[variant] / "evaluate")["metrics"]

    full_metrics: dict = {}

    def full_cell(key: str) -> float:
        if not full_metrics:
            full_metrics.update(pipeline_metrics("full"))
        return full_metrics[key]

    cell("retrikt", lambda: full_cell("accuracy_student_store"))
    cell("retrikt_head_alone", lambda: full_cell("accuracy_student_head"))
    cell("teacher_zero_shot", lambda: full_cell("accuracy_teacher_zero_shot"))
    cell(
        "teacher_tuned_prompt",
        lambda: tuned_prompt_accuracy(full, task, dev, gold, run_dirs.get("full") or run(full, log=print), settings),
    )
    cell("zerogen", lambda: pipeline_metrics("zerogen")["accuracy_student_head"])
    cell("retrikt_no_rank", lambda: pipeline_metrics("no_rank")["accuracy_student_store"])
    if task_name in profile.ablation_tasks:
        cell("retrikt_no_ppo", lambda: pipeline_metrics("no_ppo")["accuracy_student_store"])
        extension = [UNLABELLED] if profile.unlabelled_samples else []
        for method in [
            *map(rank_method, profile.rank_weights),
            *map(fraction_method, profile.store_fractions),
            *extension,
        ]:
            variant = method.removeprefix("retrikt_")
            cell(method, lambda variant=variant: pipeline_metrics(variant)["accuracy_student_store"])
        for name in profile.student_variants:
            method = student_variant_method(name)
            if cells.has(task_name, seed, method):
                continue
            started = time.perf_counter()
            variant_accuracy = pipeline_metrics(method.removeprefix("retrikt_"))["accuracy_student_store"]
            full_dir = run_dirs.get("full") or run(full, log=print)
            against_full = paired(dev_rows_right(full_dir), dev_rows_right(run_dirs[method.removeprefix("retrikt_")]))
            cells.add(task_name, seed, method, variant_accuracy, time.perf_counter() - started, against_full)

    key = f"{task_name}/{seed}"
    if key not in cells.extras:
        full_dir = run(full, log=print)  # finished: only looks up its run directory
        evaluation, ppo = read_manifest(full_dir / "evaluate")["metrics"], read_manifest(full_dir / "ppo")["metrics"]
        trained = read_manifest(full_dir / "student")["metrics"]
        extra = {
            "ppo_rollouts": {
                name: {k: ppo[name][k] for k in ("consistency_rate", "distinct_2", "mean_max_cos")}
                for name in ("before", "after")
            }
            if ppo.get("history")
            else None,
            "ppo_history": ppo.get("history"),
            "ppo_kept_stage1_prompt": ppo.get("kept_stage1_prompt", False),
            "store_on_labelled": trained.get("retrieval_labelled"),
            "student_lam": trained.get("lam"),
            "parameters": {
                "teacher": evaluation.get("params_teacher"),
                "student": evaluation["params_student"],
                "store_rows": evaluation["store_rows"],
            },
            "cpu_ms_per_example": {
                "teacher": evaluation.get("ms_per_example_teacher"),
                "student_store": evaluation["ms_per_example_student_store"],
            },
            "dev_examples": evaluation["dev_examples"],
        }
        pools = {"after_ppo": full_dir}
        if "no_ppo" in specs:
            pools["stage1_prompt"] = run(specs["no_ppo"], log=print)
        extra["generated_pool"] = {name: generated_pool(run_dir) for name, run_dir in pools.items()}
        cells.extras[key] = extra
        if cells.write_hook:
            cells.write_hook()


def dev_rows_right(run_dir: Path) -> np.ndarray:
    """Per dev row, whether the finished run's student+store answered it right."""
    import pandas as pd

    predictions = pd.read_parquet(run_dir / "evaluate" / "predictions.parquet")
    return (predictions["gold"] == predictions["predicted"]).to_numpy()


def generated_pool(run_dir: Path) -> dict:
    """A finished run's generated pool: samples generated and kept, the share of the kept ones whose teacher
    label is the label they were generated for (label consistency), and their distinct-2."""
    from retrikt_ray.artifacts import read_manifest
    from retrikt_ray.rl import distinct_n
    from retrikt_ray.samples import read_samples

    manifest = read_manifest(run_dir / "generate")
    texts = [json.dumps(fields) for fields in read_samples(run_dir / "generate")["fields"]]
    return {
        "generated": manifest["counts"]["generated"],
        "kept": manifest["counts"]["kept"],
        "teacher_agreement": manifest["metrics"]["teacher_agreement"],
        "distinct_2": distinct_n(texts, 2),
    }


def tuned_prompt_accuracy(
    spec: JobSpec, task, dev, gold: np.ndarray, run_dir: Path, settings: BaselineSettings
) -> float:
    """The teacher with the stage-1 soft prompt as a generative classifier, calibrated on the dev pool."""
    from baselines import tuned_prompt_teacher
    from safetensors.torch import load_file

    from retrikt_ray.teacher import Teacher, calibrate

    soft_prompt = load_file(str(run_dir / "prompt" / "soft_prompt.safetensors"))["soft_prompt"]
    teacher = Teacher.from_spec(spec, task)
    raw = tuned_prompt_teacher(teacher, soft_prompt, dev, settings.teacher_batch_size)
    return accuracy(gold, calibrate(raw, raw.mean(axis=0)))


# ------------------------------------------------------------------------------------------ writing
def write_results(out: Path, profile_name: str, profile: Profile, cells: Cells, started: float) -> dict:
    table = aggregate(cells.cells)
    results = {
        "profile": profile_name,
        "budget": profile.model_dump(mode="json"),
        "table": table,
        "targets": targets(table, profile.tasks),
        "retention": retention(cells.cells),
        "cells": cells.cells,
        "extras": cells.extras,
        "wall_seconds_this_invocation": round(time.perf_counter() - started, 1),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(results, profile, out.name))
    plot_accuracy(table, profile.tasks, method_labels(profile), out.parent / f"{out.name}_accuracy.png")
    if profile.ablation_tasks:
        plot_store_size(
            table, profile.store_fractions, profile.ablation_tasks[0], out.parent / f"{out.name}_store_size.png"
        )
    histories = {key: extra["ppo_history"] for key, extra in cells.extras.items() if extra.get("ppo_history")}
    if histories:
        plot_ppo(histories, out.parent / f"{out.name}_ppo.png")
    return results


def seeds_finished(results: dict, task: str) -> str:
    """`task [seeds]`: the seeds whose every cell ran (run_task_seed records a seed's extras last), and those begun."""
    done = sorted(int(key.split("/")[1]) for key in results["extras"] if key.split("/")[0] == task)
    begun = sorted({cell["seed"] for cell in results["cells"] if cell["task"] == task} - set(done))
    return f"{task} {done}" + (f" (begun: {begun})" if begun else "")


def markdown(results: dict, profile: Profile, stem: str) -> str:
    table, tasks = results["table"], profile.tasks
    lines = [
        f"# Quality: profile `{results['profile']}`, k = {profile.shots} labelled examples per class (COPA: in total)",
        "",
        f"Budget: {profile.description}",
        "",
        "Dev accuracy (%), mean over seeds (min-max); a single number when only one seed ran or all agree.",
        "",
        "| method | " + " | ".join(tasks) + " |",
        "|---|" + "---|" * len(tasks),
    ]
    kept = retention(results["cells"])
    for method, label in method_labels(profile).items():
        if any(method in table.get(task, {}) for task in tasks):
            lines.append(
                f"| {label} | " + " | ".join(format_cell(table.get(task, {}).get(method)) for task in tasks) + " |"
            )
        if method == "retrikt" and kept:  # right under the row it divides
            lines.append(
                "| retention: RetriKT ÷ teacher zero-shot, per seed | "
                + " | ".join(format_cell(kept.get(task)) for task in tasks)
                + " |"
            )
    lines += ["", "Seeds finished: " + ", ".join(seeds_finished(results, task) for task in tasks), ""]
    lines += [
        "## Targets (on the means)",
        "",
        *[f"- {name}: {'met' if met else 'NOT met'}" for name, met in results["targets"].items()],
        "",
    ]
    compared = [cell for cell in results["cells"] if "against_full" in cell]
    if compared:
        labels = method_labels(profile)
        lines += [
            "## Student variants against the full run, row by row",
            "",
            "Each variant trains the student on the full run's store; dev rows only the full run gets right / only "
            "the variant gets right, and the exact McNemar p-value.",
            "",
            "| task / seed | variant | accuracy | only full right / only variant right | p |",
            "|---|---|---|---|---|",
        ]
        for cell in sorted(compared, key=lambda c: (c["task"], c["seed"], c["method"])):
            versus = cell["against_full"]
            lines.append(
                f"| {cell['task']}/{cell['seed']} | {labels.get(cell['method'], cell['method'])} | "
                f"{100 * cell['accuracy']:.1f} | {versus['only_baseline_right']} / {versus['only_variant_right']} | "
                f"{versus['p_value']:.3f} |"
            )
        lines.append("")
    lines += [
        "## Generated samples and PPO",
        "",
        "| task / seed | PPO, same fixed draws: label consistency stage-1 -> final prompt | "
        "distinct-2 stage-1 -> final | pool: teacher agreement (kept of generated) | pool distinct-2 | "
        "store's soft labels on the labelled examples (majority label) |",
        "|---|---|---|---|---|---|",
    ]
    for key, extra in sorted(results["extras"].items()):
        rollouts = extra.get("ppo_rollouts")
        consistency = (
            f"{rollouts['before']['consistency_rate']:.2f} -> {rollouts['after']['consistency_rate']:.2f}"
            if rollouts
            else "-"
        )
        if extra.get("ppo_kept_stage1_prompt"):
            consistency += " (final prompt scored lower: stage-1 prompt kept)"
        diversity = (
            f"{rollouts['before']['distinct_2']:.2f} -> {rollouts['after']['distinct_2']:.2f}" if rollouts else "-"
        )
        pools = extra["generated_pool"]
        agreement = " vs ".join(
            f"{name} {pool['teacher_agreement']:.2f} ({pool['kept']} of {pool['generated']})"
            for name, pool in pools.items()
        )
        distinct = " vs ".join(f"{name} {pool['distinct_2']:.2f}" for name, pool in pools.items())
        lines.append(
            f"| {key} | {consistency} | {diversity} | {agreement} | {distinct} | {describe_store_on_labelled(extra)} |"
        )
    lines += [
        "",
        "## Size and CPU latency (one example at a time)",
        "",
        "| task / seed | teacher params | teacher ms | student params + store rows | student+store ms |",
        "|---|---|---|---|---|",
    ]
    for key, extra in sorted(results["extras"].items()):
        params, latency = extra["parameters"], extra["cpu_ms_per_example"]
        teacher_params = f"{params['teacher']:,}" if params["teacher"] else "-"
        teacher_ms = f"{latency['teacher']:.1f}" if latency["teacher"] else "-"
        lines.append(
            f"| {key} | {teacher_params} | {teacher_ms} | {params['student']:,} + {params['store_rows']:,} | "
            f"{latency['student_store']:.1f} |"
        )
    lines += [
        "",
        f"Plots: `{stem}_accuracy.png` (accuracy per method per task), `{stem}_store_size.png` (SST-2 accuracy",
        f"against store size), `{stem}_ppo.png` (PPO reward terms per update).",
        "",
        f"Machine: {results['machine']['cpus']} CPUs, {results['machine']['platform']}.",
        "",
    ]
    return "\n".join(lines)


def selection(option: str, chosen: list | None, available: list) -> list:
    """The chosen subset of the profile's tasks or seeds, in the profile's order (all when none chosen)."""
    if chosen is None:
        return list(available)
    unknown = [item for item in chosen if item not in available]
    if unknown:
        raise SystemExit(
            f"{option}: {', '.join(map(str, unknown))} not in the profile (one of {', '.join(map(str, available))})"
        )
    return [item for item in available if item in chosen]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="cpu-small")
    parser.add_argument("--budgets", default=str(REPO / "benchmarks" / "quality.yaml"))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "quality"))
    parser.add_argument("--runs-dir", default=str(REPO / "runs" / "quality"))
    parser.add_argument("--tasks", nargs="+", help="Run only these of the profile's tasks (the table still lists all)")
    parser.add_argument("--seeds", nargs="+", type=int, help="Run only these of the profile's seeds")
    parser.add_argument(
        "--report-only", action="store_true", help="Rewrite the table and plots from the results JSON; run nothing"
    )
    args = parser.parse_args()

    profile = load_profile(Path(args.budgets), args.profile)
    tasks = selection("--tasks", args.tasks, profile.tasks)
    seeds = selection("--seeds", args.seeds, profile.seeds)
    out = Path(args.out)
    started = time.perf_counter()
    cells = Cells(out.with_suffix(".json"), args.profile)
    if not args.report_only:
        import torch

        from retrikt_ray.ray_session import ray_session

        cells.write_hook = lambda: write_results(out, args.profile, profile, cells, started)
        torch.set_num_threads(max(1, os.cpu_count() or 1))
        first = variant_specs(profile, args.profile, tasks[0], seeds[0], Path(args.runs_dir))["full"]
        with ray_session(first):
            # Seed-major: a partial run still covers every task.
            for seed in seeds:
                for task in tasks:
                    run_task_seed(profile, args.profile, task, seed, Path(args.runs_dir), cells)
    results = write_results(out, args.profile, profile, cells, started)
    print(markdown(results, profile, out.name))


if __name__ == "__main__":
    main()
