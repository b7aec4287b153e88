"""The teacher's speed against this machine's bounds: the previous path and the engine, in one run.

    .venv/bin/python benchmarks/teacher_speed.py --before-ref 125e2af   # all of it, the demo twice (1 h on 2 cores)
    .venv/bin/python benchmarks/teacher_speed.py --skip-demo             # the in-process measurements only

In one run, one after the other, on the packaged SmolLM2-135M teacher with the demo's settings (jobs/demo.yaml):
1. bounds: a 2048^3 matmul in float32 and bfloat16, and the teacher tokens/s they imply (2 FLOPs per weight
   a token passes, lm_head included); the practical roof: the engine's best prefill tokens/s (forward passes
   of full batches over the shapes below, each dtype), in each replica layout;
2. generation at the demo's settings (its prompt and sampling; a soft prompt initialised from the task
   description as stage 1 initialises it): the previous path (HF `generate`, batches of 16, float32, as the
   teacher ran before the engine) and the engine per dtype, per replica and summed over the replicas of a
   layout (1 process x 2 threads, 2 processes x 1 thread, started together); the engine's pure decode
   (48 tokens per row, no stop) per batch size;
3. classification (the 872 SST-2 dev sentences) and annotation (1,024 SST-2 training texts, p_C and the
   answer state): previous path (left-padded HF forwards of 32, float32) and engine per dtype; calibrated
   zero-shot accuracy and soft labels of each against float32;
4. prompt tuning and PPO through the teacher in float32 and as `auto` resolves it (bf16 here): the demo's prompt
   and PPO stages, loss per epoch, reward and losses per update, seconds;
5. the demo's whole `retrikt run` before (a worktree at --before-ref) and after (this checkout, through
   benchmarks/demo.py, which rewrites benchmarks/results/demo.{json,md}), per stage.
Writes benchmarks/results/teacher_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PREFILL_SHAPES = ((16, 256), (32, 64), (64, 64), (256, 32))
DECODE_BATCHES = (16, 64, 128, 256)
LAYOUTS = ((1, 2), (2, 1))  # (processes, threads each)
GENERATION_SAMPLES = 128  # per label and replica, engine
PREVIOUS_GENERATION_SAMPLES = 32  # per label and replica, previous path (it is slow)


# ------------------------------------------------------------------------------------------ workers
def worker(task_name: str, kwargs: dict, threads: int, barrier, queue) -> None:
    """One process of a layout: load, warm up, wait for the others, measure, report."""
    import torch

    torch.set_num_threads(threads)
    measure = MEASURES[task_name]
    prepared = measure(prepare=True, **kwargs)
    barrier.wait()
    started = time.perf_counter()
    result = measure(prepared=prepared, **kwargs)
    result["seconds"] = time.perf_counter() - started
    queue.put(result)


def in_layout(task_name: str, processes: int, threads: int, **kwargs) -> dict:
    """Run a measure in `processes` processes of `threads` threads each, started together: per-process
    results and the sum of their work over the longest one's time."""
    context = multiprocessing.get_context("spawn")
    barrier, queue = context.Barrier(processes), context.Queue()
    workers = [
        context.Process(target=worker, args=(task_name, kwargs, threads, barrier, queue)) for _ in range(processes)
    ]
    for process in workers:
        process.start()
    results = [queue.get() for _ in workers]
    for process in workers:
        process.join()
    seconds = max(result["seconds"] for result in results)
    work = {
        key: sum(result[key] for result in results) for key in ("tokens", "samples", "examples") if key in results[0]
    }
    return {
        "layout": f"{processes}x{threads}",
        "per_process": [
            {key: value for key, value in result.items() if key not in ("probs", "states")} for result in results
        ],
        "seconds": seconds,
        **{f"{key}_per_s": value / seconds for key, value in work.items()},
        **({"probs": results[0]["probs"]} if "probs" in results[0] else {}),
    }


def demo_spec(dtype: str = "auto"):
    from retrikt_ray.config import load_spec

    return load_spec(REPO / "jobs/demo.yaml", [f"teacher.dtype={dtype}"])


def description_prompt(teacher, length: int):
    """The soft prompt stage 1 starts from: the task description's token embeddings, repeated to `length`."""
    import torch

    ids = teacher.tokenizer(teacher.task.description, add_special_tokens=False).input_ids
    ids = (ids * (length // len(ids) + 1))[:length]
    return teacher.engine.embed(torch.tensor(ids)).detach()


def load_teacher(dtype: str):
    from retrikt_ray.tasks import Task
    from retrikt_ray.teacher import Teacher

    spec = demo_spec(dtype)
    task = Task.from_spec(spec.task)
    return spec, Teacher.from_spec(spec, task)


def measure_matmul(dtype: str, prepare=False, prepared=None) -> dict:
    import torch

    if prepare:
        a, b = (torch.randn(2048, 2048, dtype=getattr(torch, dtype)) for _ in range(2))
        a @ b
        return a, b
    a, b = prepared
    repeats = 10 if dtype == "bfloat16" else 5
    for _ in range(repeats):
        a @ b
    return {"flops": 2 * 2048**3 * repeats}


def measure_prefill(dtype: str, shape: tuple[int, int], prepare=False, prepared=None) -> dict:
    import torch

    if prepare:
        _, teacher = load_teacher(dtype)
        runner = teacher.engine.runner(getattr(torch, dtype))
        batch, length = shape
        x = torch.randn(batch, length, teacher.engine.hidden_size)
        positions = torch.arange(length)[None].expand(batch, -1)
        with torch.no_grad():
            runner.forward(x[:2], positions[:2])
        return runner, x, positions
    runner, x, positions = prepared
    with torch.no_grad():
        for _ in range(2):
            hidden, _ = runner.forward(x, positions)
            runner.logits(hidden[:, -1])
    return {"tokens": 2 * x.shape[0] * x.shape[1]}


def measure_decode(dtype: str, batch: int, prepare=False, prepared=None) -> dict:
    """Pure decoding: `batch` rows of 48 tokens each, no stop token."""

    from retrikt_ray.engine import SamplingParams, row_seeds

    if prepare:
        spec, teacher = load_teacher(dtype)
        prompt = teacher.prompt_embeddings(1, description_prompt(teacher, spec.prompt.num_virtual_tokens))
        teacher.engine.generate(prompt, row_seeds(0, 4), SamplingParams(4, (-1,), 0.95), 0, 4)
        return teacher, prompt, spec
    teacher, prompt, spec = prepared
    params = SamplingParams(
        spec.ppo.max_new_tokens, (-1,), spec.generate.top_p, spec.generate.temperature, top_k=spec.generate.top_k
    )
    generation = teacher.engine.generate(prompt, row_seeds(1, batch), params, teacher.tokenizer.pad_token_id, batch)
    return {"tokens": int(generation.lengths.sum()), "samples": batch}


def measure_generation(path: str, dtype: str, samples: int, batch_size: int, prepare=False, prepared=None) -> dict:
    """The generate stage's work at the demo's settings, `samples` per label: the engine or the previous path."""

    if prepare:
        spec, teacher = load_teacher(dtype)
        soft_prompt = description_prompt(teacher, spec.prompt.num_virtual_tokens)
        generate_with(path, teacher, spec, soft_prompt, 4, batch_size, seed=0)
        return teacher, spec, soft_prompt
    teacher, spec, soft_prompt = prepared
    tokens, texts = 0, []
    for label in range(teacher.task.num_labels):
        new_tokens, new_texts = generate_with(
            path, teacher, spec, soft_prompt, samples, batch_size, seed=1 + label, label=label
        )
        tokens += new_tokens
        texts += new_texts
    return {
        "tokens": tokens,
        "samples": len(texts),
        "parsed": sum(teacher.task.parse_generation(t, 0) is not None for t in texts),
    }


def generate_with(path, teacher, spec, soft_prompt, n, batch_size, seed, label=1):
    import torch

    settings = spec.generate
    if path == "engine":
        samples = teacher.sample(
            label,
            n,
            settings.max_new_tokens,
            settings.top_p,
            settings.temperature,
            seed,
            soft_prompt,
            batch_size,
            top_k=settings.top_k,
        )
        return int(samples.mask.sum()), samples.texts
    # The previous path: Hugging Face `generate` on inputs_embeds, one batch at a time, as the teacher ran it.
    tokens, texts = 0, []
    embeds = teacher.prompt_embeddings(label, soft_prompt)
    for start in range(0, n, batch_size):
        rows = min(batch_size, n - start)
        torch.manual_seed(seed * 1000 + start)
        batch = embeds[None].expand(rows, -1, -1)
        with torch.no_grad():
            output = teacher.model.generate(
                inputs_embeds=batch,
                attention_mask=torch.ones(batch.shape[:2], dtype=torch.long),
                do_sample=True,
                top_p=settings.top_p,
                top_k=settings.top_k,
                temperature=settings.temperature,
                max_new_tokens=settings.max_new_tokens,
                eos_token_id=teacher.stop_ids,
                pad_token_id=teacher.tokenizer.pad_token_id,
            )
        is_stop = torch.isin(output, torch.tensor(teacher.stop_ids)).long()
        mask = (torch.cumsum(is_stop, dim=1) - is_stop) == 0
        tokens += int(mask.sum())
        texts += [
            teacher.tokenizer.decode(row[: int(m.sum())], skip_special_tokens=True).split("\n")[0].strip()
            for row, m in zip(output, mask)
        ]
    return tokens, texts


def classification_examples(which: str, count: int | None):
    from retrikt_ray.tasks import Task, data_files

    spec = demo_spec()
    task = Task.from_spec(spec.task)
    train, dev = data_files(spec, task)
    examples = task.load(dev if which == "dev" else train)
    if which == "train":
        rng = np.random.default_rng(0)
        examples = [examples[i] for i in rng.choice(len(examples), size=count, replace=False)]
    return examples


def measure_read(
    path: str, dtype: str, which: str, count: int | None, state: bool, prepare=False, prepared=None
) -> dict:
    """p_C (and with `state` the answer state) of SST-2 examples: the engine or the previous path."""
    if prepare:
        spec, teacher = load_teacher(dtype)
        examples = classification_examples(which, count)
        read_with(path, teacher, examples[:8], spec.teacher.classify_batch_size, state)
        return teacher, spec, examples
    teacher, spec, examples = prepared
    probs = read_with(path, teacher, examples, spec.teacher.classify_batch_size, state)
    return {"examples": len(examples), "probs": probs.tolist()}


def read_with(path, teacher, examples, batch_size, state):
    import torch

    layer = -1 if state else None
    if path == "engine":
        return teacher.read(examples, batch_size, layer)[0]
    # The previous path: left-padded batches in input order, one Hugging Face forward each.
    texts = [teacher.classification_text(example) for example in examples]
    probs = []
    teacher.tokenizer.padding_side = "left"
    for start in range(0, len(texts), batch_size):
        batch = teacher.tokenizer(
            texts[start : start + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=512
        )
        batch["position_ids"] = (batch["attention_mask"].cumsum(dim=1) - 1).clamp(min=0)
        with torch.no_grad():
            output = teacher.model(**batch, logits_to_keep=1, output_hidden_states=state)
        final = torch.log_softmax(output.logits[:, -1].float(), dim=-1)
        probs.append(torch.softmax(final[:, teacher.verbaliser_ids], dim=-1).numpy())
        if state:
            output.hidden_states[layer][:, -1].float().numpy()
    return np.concatenate(probs)


MEASURES = {
    "matmul": measure_matmul,
    "prefill": measure_prefill,
    "decode": measure_decode,
    "generation": measure_generation,
    "read": measure_read,
}


# ------------------------------------------------------------------------------------------ sections
def bounds(log) -> dict:
    import torch

    from retrikt_ray.engine import hardware_class

    spec, teacher = load_teacher("float32")
    model = teacher.model
    embedding = model.get_input_embeddings().weight.numel()
    weights_per_token = (
        sum(p.numel() for p in model.parameters()) - embedding + model.get_output_embeddings().weight.numel()
    )
    if model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
        weights_per_token -= model.get_output_embeddings().weight.numel()
    gflop_per_token = 2 * weights_per_token / 1e9
    matmul = {}
    for dtype in ("float32", "bfloat16"):
        result = in_layout("matmul", 1, 2, dtype=dtype)
        matmul[dtype] = result["per_process"][0]["flops"] / result["seconds"] / 1e9
        log(f"matmul {dtype}: {matmul[dtype]:.0f} GFLOP/s")
    prefill = {}
    for processes, threads in LAYOUTS:
        for dtype in ("float32", "bfloat16"):
            for shape in PREFILL_SHAPES:
                result = in_layout("prefill", processes, threads, dtype=dtype, shape=shape)
                prefill[f"{processes}x{threads} {dtype} {shape[0]}x{shape[1]}"] = result["tokens_per_s"]
                log(f"prefill {processes}x{threads} {dtype} {shape}: {result['tokens_per_s']:.0f} tokens/s")
    return {
        "hardware_class": hardware_class(torch.device("cpu")),
        "gflop_per_token": gflop_per_token,
        "matmul_gflops": matmul,
        "bound_tokens_per_s": {dtype: gflops / gflop_per_token for dtype, gflops in matmul.items()},
        "prefill_tokens_per_s": prefill,
    }


def decoding(log) -> dict:
    rows = {}
    for processes, threads in LAYOUTS:
        for dtype in ("float32", "bfloat16"):
            for batch in DECODE_BATCHES:
                result = in_layout("decode", processes, threads, dtype=dtype, batch=batch)
                rows[f"{processes}x{threads} {dtype} {batch}"] = result["tokens_per_s"]
                log(f"decode {processes}x{threads} {dtype} batch {batch}: {result['tokens_per_s']:.0f} tokens/s")
    return rows


def generation(log) -> dict:
    spec = demo_spec()
    rows = {}
    for processes, threads in LAYOUTS:
        result = in_layout(
            "generation",
            processes,
            threads,
            path="previous",
            dtype="float32",
            samples=PREVIOUS_GENERATION_SAMPLES,
            batch_size=16,
        )
        rows[f"previous {processes}x{threads} float32"] = summarise_generation(result)
        log(f"generation previous {processes}x{threads}: {result['tokens_per_s']:.0f} tokens/s")
        for dtype in ("float32", "bfloat16"):
            result = in_layout(
                "generation",
                processes,
                threads,
                path="engine",
                dtype=dtype,
                samples=GENERATION_SAMPLES,
                batch_size=spec.generate.batch_size,
            )
            rows[f"engine {processes}x{threads} {dtype}"] = summarise_generation(result)
            log(f"generation engine {processes}x{threads} {dtype}: {result['tokens_per_s']:.0f} tokens/s")
    return rows


def summarise_generation(result: dict) -> dict:
    per = result["per_process"]
    return {
        "tokens_per_s": result["tokens_per_s"],
        "samples_per_s": result["samples_per_s"],
        "tokens_per_s_per_replica": float(np.mean([p["tokens"] / p["seconds"] for p in per])),
        "parsed_share": sum(p["parsed"] for p in per) / sum(p["samples"] for p in per),
        "mean_tokens_per_sample": sum(p["tokens"] for p in per) / sum(p["samples"] for p in per),
    }


def reading(log) -> dict:
    from retrikt_ray.metrics import accuracy
    from retrikt_ray.teacher import calibrate

    dev = classification_examples("dev", None)
    gold = np.array([example.label for example in dev])
    rows, probs = {}, {}
    for kind, which, count, state in (("classification", "dev", None, False), ("annotation", "train", 1024, True)):
        for processes, threads in LAYOUTS:
            for path, dtype in (("previous", "float32"), ("engine", "float32"), ("engine", "bfloat16")):
                result = in_layout(
                    "read", processes, threads, path=path, dtype=dtype, which=which, count=count, state=state
                )
                rows[f"{kind} {path} {processes}x{threads} {dtype}"] = result["examples_per_s"]
                log(f"{kind} {path} {processes}x{threads} {dtype}: {result['examples_per_s']:.1f} examples/s")
                if kind == "classification" and processes == 1:
                    raw = np.array(result["probs"], dtype=np.float32)
                    probs[f"{path} {dtype}"] = calibrate(raw, raw.mean(axis=0))
    reference = probs["previous float32"]
    parity = {
        name: {
            "accuracy": accuracy(gold, calibrated),
            "max_abs_soft_label_difference": float(np.abs(calibrated - reference).max()),
            "mean_abs_soft_label_difference": float(np.abs(calibrated - reference).mean()),
            "same_answer_share": float((calibrated.argmax(1) == reference.argmax(1)).mean()),
        }
        for name, calibrated in probs.items()
    }
    return {"examples_per_s": rows, "parity_against_previous_float32": parity, "dev_examples": len(dev)}


def ppo_precision(log, runs_dir: Path) -> dict:
    """The demo's prompt and PPO stages with the teacher in float32 throughout (`float32`) and as `auto`
    resolves it here (bfloat16 on CPUs with bf16 units: decoding, reading, PPO's log-probs and backward
    pass, and prompt tuning's frozen weights)."""
    from retrikt_ray import pipeline
    from retrikt_ray.artifacts import read_manifest

    out = {}
    for dtype in ("float32", "auto"):
        spec = demo_spec(dtype)
        spec.storage.runs_dir = str(runs_dir)
        run_dir = None
        for stage in ("prompt", "ppo"):
            run_dir = pipeline.run(spec, only=stage, force=True, log=log)
        manifest, prompt = read_manifest(run_dir / "ppo"), read_manifest(run_dir / "prompt")
        history = manifest["metrics"]["history"]
        out[dtype] = {
            "prompt_seconds": prompt["seconds"],
            "prompt_loss_per_epoch": prompt["metrics"]["loss_per_epoch"],
            "seconds": manifest["seconds"],
            "precision": manifest["metrics"].get("teacher_precision"),
            **{
                key: [entry[key] for entry in history]
                for key in ("reward", "policy_loss", "value_loss", "consistency_rate", "kl")
            },
        }
        log(
            f"ppo {dtype}: {manifest['seconds']:.0f} s, reward per update {[round(r, 3) for r in out[dtype]['reward']]}"
        )
    return out


def demo(log, before_ref: str | None, runs_dir: Path) -> dict:
    """The demo's `retrikt run jobs/demo.yaml --force` in a worktree at `before_ref` (its runs under
    `runs_dir`), then in this checkout through benchmarks/demo.py, which records the after run in
    benchmarks/results/demo.{json,md} as well."""
    out = {}
    if before_ref:
        worktree = Path(tempfile.mkdtemp(prefix="retrikt-before-"))
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(worktree), before_ref], cwd=REPO, check=True, capture_output=True
        )
        try:
            runs = runs_dir / "before"
            command = [
                sys.executable,
                "cli.py",
                "run",
                "jobs/demo.yaml",
                "--force",
                "--set",
                f"storage.runs_dir={runs}",
            ]
            started = time.perf_counter()
            subprocess.run(command, cwd=worktree, env={**os.environ, "PYTHONPATH": str(worktree)}, check=True)
            (run_dir,) = [path for path in runs.iterdir() if (path / "job.yaml").is_file()]  # not mlflow/
            out["before"] = demo_row(log, "before", before_ref, run_dir, time.perf_counter() - started)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=REPO, capture_output=True)
    subprocess.run(
        [sys.executable, "benchmarks/demo.py"], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, check=True
    )
    recorded = json.loads((REPO / "benchmarks/results/demo.json").read_text())
    out["after"] = demo_row(log, "after", git_head(), REPO / recorded["run_dir"], recorded["wall_seconds"])
    return out


def demo_row(log, name: str, ref: str, run_dir: Path, wall: float) -> dict:
    """What one demo run took and produced, from its manifests."""
    from retrikt_ray.pipeline import STAGE_NAMES

    manifests = {
        name: json.loads((run_dir / name / "manifest.json").read_text())
        for name in STAGE_NAMES
        if (run_dir / name / "manifest.json").exists()
    }
    evaluation = manifests["evaluate"]["metrics"]
    generated = manifests["generate"]["metrics"]
    log(f"demo {name}: {wall:.0f} s, student+store {evaluation['accuracy_student_store']:.3f}")
    return {
        "ref": ref,
        "wall_s": wall,
        "seconds_per_stage": {stage: manifest["seconds"] for stage, manifest in manifests.items()},
        "accuracy_student_store": evaluation["accuracy_student_store"],
        "accuracy_teacher_zero_shot": evaluation.get("accuracy_teacher_zero_shot"),
        "generation_tokens_per_s": generated["generation_tokens_per_s"],
        "generation_seconds": generated["generation_seconds"],
        "tokens_generated": generated["tokens_generated"],
        "samples_kept": manifests["generate"]["counts"]["kept"],
    }


def git_head() -> str:
    return subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()


# ------------------------------------------------------------------------------------------ report
def headline(results: dict) -> dict:
    bound, gen, read = results["bounds"], results["generation"], results["reading"]["examples_per_s"]
    prefill_roof = max(bound["prefill_tokens_per_s"].values())
    best_decode = max(results["decode"].values())
    best_previous_stage = max(row["tokens_per_s"] for name, row in gen.items() if name.startswith("previous"))
    best_engine_stage = max(row["tokens_per_s"] for name, row in gen.items() if name.startswith("engine"))
    demo_runs = results.get("demo", {})
    generation_speedup = (
        demo_runs["after"]["generation_tokens_per_s"] / demo_runs["before"]["generation_tokens_per_s"]
        if "before" in demo_runs
        else best_engine_stage / best_previous_stage
    )

    def speedup(kind):
        previous = max(v for k, v in read.items() if k.startswith(f"{kind} previous"))
        engine = max(v for k, v in read.items() if k.startswith(f"{kind} engine"))
        return engine / previous

    return {
        "generation_speedup": generation_speedup,
        "generation_speedup_source": "the demo's generate stage, after / before"
        if "before" in demo_runs
        else "in-process, best layout of each path",
        "generation_speedup_in_process": best_engine_stage / best_previous_stage,
        "decode_best_tokens_per_s": best_decode,
        "prefill_roof_tokens_per_s": prefill_roof,
        "decode_fraction_of_prefill_roof": best_decode / prefill_roof,
        "decode_fraction_of_bf16_bound": best_decode / bound["bound_tokens_per_s"]["bfloat16"],
        "classification_speedup": speedup("classification"),
        "annotation_speedup": speedup("annotation"),
        "demo_wall_s_before": demo_runs.get("before", {}).get("wall_s"),
        "demo_wall_s_after": demo_runs.get("after", {}).get("wall_s"),
        "demo_accuracy_after": demo_runs.get("after", {}).get("accuracy_student_store"),
    }


def markdown(results: dict) -> str:
    top, bound = results["headline"], results["bounds"]
    lines = [
        "# Teacher speed: previous path against the engine, SmolLM2-135M, one run on one machine",
        "",
        f"Machine: {results['machine']['cpus']} CPUs ({bound['hardware_class']}), {results['machine']['platform']}; "
        f"commit {results['commit']}.",
        "",
        "| headline | value |",
        "|---|---|",
        *[f"| {key} | {headline_cell(value)} |" for key, value in top.items()],
        "",
        "## Bounds",
        "",
        f"{bound['gflop_per_token']:.3f} GFLOP per token (2 per weight a token passes, lm_head included).",
        "",
        "| dtype | matmul GFLOP/s (2048^3, 2 threads) | tokens/s it implies |",
        "|---|---|---|",
        *[
            f"| {d} | {bound['matmul_gflops'][d]:.0f} | {bound['bound_tokens_per_s'][d]:.0f} |"
            for d in bound["matmul_gflops"]
        ],
        "",
        "Practical roof, the engine's prefill "
        "(forward passes of full batches; layout processes x threads, dtype, batch x length):",
        "",
        "| prefill | tokens/s |",
        "|---|---|",
        *[f"| {name} | {value:.0f} |" for name, value in bound["prefill_tokens_per_s"].items()],
        "",
        "## Decoding (engine, 48 tokens per row, no stop; summed over the layout's processes)",
        "",
        "| layout, dtype, rows per replica | tokens/s |",
        "|---|---|",
        *[f"| {name} | {value:.0f} |" for name, value in results["decode"].items()],
        "",
        "## Generation at the demo's settings (its prompt, top-p, temperature, stop at the newline)",
        "",
        "| path, layout, dtype | tokens/s (all replicas) | samples/s | tokens/s per replica | tokens per sample | "
        "parsed |",
        "|---|---|---|---|---|---|",
        *[
            f"| {name} | {row['tokens_per_s']:.0f} | {row['samples_per_s']:.1f} | "
            f"{row['tokens_per_s_per_replica']:.0f} | {row['mean_tokens_per_sample']:.1f} | {row['parsed_share']:.0%} |"
            for name, row in results["generation"].items()
        ],
        "",
        "## Classification (SST-2 dev) and annotation (1,024 SST-2 training texts, p_C and the answer state)",
        "",
        "| what, path, layout, dtype | examples/s |",
        "|---|---|",
        *[f"| {name} | {value:.1f} |" for name, value in results["reading"]["examples_per_s"].items()],
        "",
        f"Parity on the {results['reading']['dev_examples']} dev rows, "
        "calibrated p_C against the previous path in float32:",
        "",
        "| path, dtype | calibrated zero-shot accuracy | max abs soft-label difference | mean abs difference | "
        "same answer |",
        "|---|---|---|---|---|",
        *[
            f"| {name} | {row['accuracy']:.4f} | {row['max_abs_soft_label_difference']:.4f} | "
            f"{row['mean_abs_soft_label_difference']:.5f} | {row['same_answer_share']:.2%} |"
            for name, row in results["reading"]["parity_against_previous_float32"].items()
        ],
    ]
    if "ppo" in results:
        lines += [
            "",
            "## PPO through the teacher: the demo's prompt and PPO stages, "
            "the teacher in float32 and as `auto` resolves it",
            "",
            "| teacher.dtype (precision per use) | prompt s | prompt loss per epoch | PPO s | reward per update | "
            "policy loss per update | value loss per update | KL per update |",
            "|---|---|---|---|---|---|---|---|",
            *[
                f"| {dtype} ({precision_cell(row['precision'])}) | {row['prompt_seconds']:.0f} | "
                f"{fmt(row['prompt_loss_per_epoch'])} | {row['seconds']:.0f} |"
                f" {fmt(row['reward'])} | {fmt(row['policy_loss'])} | {fmt(row['value_loss'])} | {fmt(row['kl'])} |"
                for dtype, row in results["ppo"].items()
            ],
        ]
    if results.get("demo"):
        stages = list(next(iter(results["demo"].values()))["seconds_per_stage"])
        lines += [
            "",
            "## The demo end to end (`retrikt run jobs/demo.yaml --force`)",
            "",
            f"| | {' | '.join(stages)} | wall (Ray start-up included) | generation tokens/s | student+store | "
            "teacher zero-shot |",
            f"|---|{'---|' * len(stages)}---|---|---|---|",
            *[
                f"| {name} ({row['ref']}) | {stage_cells(row, stages)} | {row['wall_s']:.0f} |"
                f" {row['generation_tokens_per_s']:.0f} | {row['accuracy_student_store']:.3f} | "
                f"{row['accuracy_teacher_zero_shot']:.3f} |"
                for name, row in results["demo"].items()
            ],
        ]
    if results.get("notes"):  # what the person who ran it saw and wrote down (--note)
        lines += ["", "## Notes", "", *[f"- {note}" for note in results["notes"]]]
    return "\n".join(lines) + "\n"


def headline_cell(value) -> str:
    if not isinstance(value, float):
        return str(value)
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def precision_cell(precision: dict | None) -> str:
    return ", ".join(f"{use} {dtype}" for use, dtype in (precision or {}).items())


def stage_cells(row: dict, stages: list[str]) -> str:
    return " | ".join(f"{row['seconds_per_stage'].get(stage, 0):.0f}" for stage in stages)


def fmt(values: list[float]) -> str:
    return " ".join(f"{value:.3f}" for value in values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before-ref", help="git ref of the code before the engine, for the demo's before run")
    parser.add_argument("--skip-demo", action="store_true", help="no end-to-end demo runs")
    parser.add_argument("--skip-ppo", action="store_true", help="no PPO float32 / auto comparison")
    parser.add_argument("--out", default="benchmarks/results/teacher_speed")
    parser.add_argument(
        "--resume", action="store_true", help="keep the sections a previous run of this commit finished"
    )
    args = parser.parse_args()

    started = time.perf_counter()

    def log(line: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f}s] {line}", flush=True)

    out = REPO / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial.json")  # each finished section, so a failure late on keeps the rest
    results = json.loads(partial.read_text()) if args.resume and partial.exists() else {}
    results.update(
        commit=git_head(),
        machine={"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        settings={
            "job": "jobs/demo.yaml",
            "prefill_shapes": PREFILL_SHAPES,
            "decode_batches": DECODE_BATCHES,
            "layouts": LAYOUTS,
        },
    )
    with tempfile.TemporaryDirectory(prefix="teacher-speed-") as scratch:
        sections = {
            "bounds": lambda: bounds(log),
            "decode": lambda: decoding(log),
            "generation": lambda: generation(log),
            "reading": lambda: reading(log),
            "ppo": None if args.skip_ppo else lambda: ppo_precision(log, Path(scratch) / "ppo"),
            "demo": None if args.skip_demo else lambda: demo(log, args.before_ref, Path(scratch) / "demo"),
        }
        for name, measure in sections.items():
            if measure is None or name in results:
                continue
            results[name] = measure()
            partial.write_text(json.dumps(results, indent=2, default=str) + "\n")
    results["headline"] = headline(results)
    results["notes"] = args.note
    results = {**results["headline"], **results}
    out.with_suffix(".json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    out.with_suffix(".md").write_text(markdown(results))
    partial.unlink(missing_ok=True)
    print(markdown(results))


if __name__ == "__main__":
    main()
