"""Load-test the serving endpoint of a finished run and record benchmarks/results/serve.{json,md}.

    .venv/bin/python benchmarks/serve.py RUN_DIR [--clients 8] [--seconds 30] [--inputs-per-request 4]

RUN_DIR is a finished run of the packaged models, e.g. jobs/demo.yaml with small budgets:

    .venv/bin/retrikt run jobs/demo.yaml --set generate.samples_per_label=40 --set ppo.updates=1 \\
        --set prompt.epochs=1 --set student.epochs=1 --set data.dev_limit=100

In one run, on the SST-2 dev sentences, one after the other:
1. the bound: a 2048^3 matmul in float32 and bfloat16 on all cores, and the examples/s it implies for the
   student (2 FLOPs per non-embedding weight per token, plus attention, at the dev inputs' token counts);
2. the student + store in-process (`predict_examples`, what `Predictor` and evaluation run, no server), all
   dev inputs in batches of evaluate.batch_size: the float32 path as it was before the fast path (a
   worktree at --before-ref, in a subprocess), the float32 path of this checkout, and the fast path
   (`student.dtype: auto`); then the fast path as 2 processes x 1 thread against 1 x 2. The fast path's
   accuracy and probabilities are compared with the float32 path's;
3. the teacher's zero-shot classifier on (a slice of) the same inputs, in-process;
4. the endpoint: a local Ray and Serve on 127.0.0.1 as `retrikt serve` starts them, driven by N
   concurrent clients for T seconds after a warm-up; replicas are polled every second meanwhile;
5. with --training: the run's student stage again as before the fast path (`student.dtype: float32`,
   batches in shuffled order) and with the defaults (auto, length-grouped batches), upstream stages reused,
   each then evaluated: examples/s of the training loop and of the stage, and dev accuracy of each.
The serving settings (batching, autoscaling, CPUs per replica) are the run's `serve` section.
"""

import argparse
import asyncio
import json
import os
import platform
import secrets
import socket
import sys
import threading
import time
from pathlib import Path

import aiohttp
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from retrikt_ray.serve import APP_NAME, STUDENT_STORE, load_run_spec, read_token, start  # noqa: E402
from retrikt_ray.tasks import Task, data_files  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients, each waiting for its answer")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of the measured load")
    parser.add_argument(
        "--warmup-seconds",
        type=float,
        default=45.0,
        help="unmeasured load first; Serve adds a replica after 30 s above target",
    )
    parser.add_argument("--inputs-per-request", type=int, default=4)
    parser.add_argument("--teacher-examples", type=int, default=64)
    parser.add_argument("--before-ref", help="git ref of the float32 path before the fast path (a worktree of it)")
    parser.add_argument("--training", action="store_true", help="also train the student in float32 and auto")
    parser.add_argument("--out", default="benchmarks/results/serve")
    args = parser.parse_args()

    spec = load_run_spec(args.run_dir)
    task = Task.from_spec(spec.task)
    examples = task.load(data_files(spec, task)[1])
    texts = [example.fields[task.input_fields[0]] for example in examples]
    gold = np.array([example.label for example in examples])

    bound = student_bound(args.run_dir, spec, task, examples)
    paths = {}
    if args.before_ref:
        paths["before"] = in_process_before(args.before_ref, args.run_dir, spec, data_files(spec, task)[1])
    paths["float32"] = in_process_student(args.run_dir, spec, task, examples, "float32")
    paths["fast"] = in_process_student(args.run_dir, spec, task, examples, "auto")
    for row in paths.values():
        row["accuracy"] = float((row["probs"].argmax(axis=1) == gold).mean())
    reference = paths.get("before", paths["float32"])
    parity = {
        "max_abs_diff_p": float(np.abs(paths["fast"]["probs"] - reference["probs"]).max()),
        "mean_abs_diff_p": float(np.abs(paths["fast"]["probs"] - reference["probs"]).mean()),
        "same_answer": float((paths["fast"]["probs"].argmax(1) == reference["probs"].argmax(1)).mean()),
    }
    for row in paths.values():
        del row["probs"]
    layouts = fast_path_layouts(args.run_dir, examples)
    ceiling = paths["fast"]
    teacher = in_process_teacher(spec, task, examples[: args.teacher_examples])
    endpoint = drive_endpoint(args, spec, texts)
    training = train_both(args.run_dir, spec) if args.training else None

    results = {
        "run_dir": str(args.run_dir),
        "task": task.name,
        "teacher": spec.teacher.model,
        "student": spec.student.model,
        "load": {
            "clients": args.clients,
            "seconds": args.seconds,
            "warmup_seconds": args.warmup_seconds,
            "inputs_per_request": args.inputs_per_request,
        },
        "serve": spec.serve.model_dump(exclude={"token_file", "token_env"}),
        "endpoint": endpoint,
        "bound": bound,
        "in_process": {"student_store": ceiling, "paths": paths, "layouts": layouts, "teacher": teacher},
        "parity": parity,
        "training": training,
        "ratios": {
            "endpoint_over_ceiling": endpoint["examples_per_second"] / ceiling["examples_per_second"],
            "student_store_over_teacher": ceiling["examples_per_second"] / teacher["examples_per_second"],
            "fast_over_fp32": ceiling["examples_per_second"] / reference["examples_per_second"],
            "fast_over_bf16_bound": ceiling["examples_per_second"] / bound["examples_per_s"]["bfloat16"],
        },
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "in_process_fast_examples_per_s": ceiling["examples_per_second"],
        "in_process_fp32_examples_per_s": reference["examples_per_second"],
        "endpoint_fraction_of_in_process": endpoint["examples_per_second"] / ceiling["examples_per_second"],
        "endpoint_p99_ms": endpoint["latency_ms"]["p99"] if endpoint["latency_ms"] else None,
        "endpoint_errors": endpoint["errors"],
        "accuracy_delta_fast_vs_fp32": ceiling["accuracy"] - reference["accuracy"],
        "training_speedup": training["speedup"] if training else None,
    }
    results["targets_met"] = {
        "zero_errors": endpoint["errors"] == 0,
        "in_process_at_least_800": results["in_process_fast_examples_per_s"] >= 800,
        "endpoint_at_least_70_percent_of_in_process": results["endpoint_fraction_of_in_process"] >= 0.7,
        "endpoint_p99_at_most_250_ms": (results["endpoint_p99_ms"] or float("inf")) <= 250,
        "accuracy_within_0.3_points": abs(results["accuracy_delta_fast_vs_fp32"]) <= 0.003,
        "student_store_at_least_10x_teacher": results["ratios"]["student_store_over_teacher"] >= 10,
    }
    if training:
        results["targets_met"]["training_at_least_2x"] = training["speedup"] >= 2
        results["targets_met"]["training_accuracy_within_0.5_points"] = abs(training["accuracy_delta"]) <= 0.005
    out = REPO / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))


def in_process_student(run_dir: Path, spec, task, examples, dtype: str) -> dict:
    """Examples per second of student + store over all inputs in batches of evaluate.batch_size, no server,
    computing in `dtype` (`student.dtype`); with the task-level probabilities."""
    from retrikt_ray.knowledge_store import KnowledgeStore
    from retrikt_ray.retrieval_student import RetrievalStudent, predict_examples
    from retrikt_ray.serve import store_folder

    student = RetrievalStudent.load(run_dir / "student" / "model", spec.student.trust_remote_code, dtype)
    store = KnowledgeStore.load(store_folder(run_dir))
    batch_size = spec.evaluate.batch_size
    predict_examples(task, student, store, examples[:batch_size], batch_size)  # warm-up
    started = time.perf_counter()
    probs = predict_examples(task, student, store, examples, batch_size)["p"]
    seconds = time.perf_counter() - started
    return {
        "code": "this checkout",
        "dtype": str(student.dtype).removeprefix("torch."),
        "examples": len(examples),
        "batch_size": batch_size,
        "threads": torch_threads(),
        "seconds": seconds,
        "examples_per_second": len(examples) / seconds,
        "probs": probs,
    }


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


# The float32 path as it was, run in a worktree of --before-ref through the functions it had then (its job
# spec cannot read a job.yaml with newer fields, so the task comes as JSON).
BEFORE = """
import json, sys, time
import numpy as np
from retrikt_ray.config import TaskSpec
from retrikt_ray.knowledge_store import KnowledgeStore
from retrikt_ray.retrieval_student import RetrievalStudent, predict_examples
from retrikt_ray.tasks import Task
run_dir, task_json, dev_file, batch_size, out = sys.argv[1:6]
task = Task.from_spec(TaskSpec.model_validate(json.loads(task_json)))
examples = task.load(dev_file)
student = RetrievalStudent.load(run_dir + "/student/model")
store = KnowledgeStore.load(run_dir + "/student/store")
predict_examples(task, student, store, examples[: int(batch_size)], int(batch_size))
started = time.perf_counter()
probs = predict_examples(task, student, store, examples, int(batch_size))["p"]
seconds = time.perf_counter() - started
np.save(out, probs)
print(json.dumps({"seconds": seconds, "examples": len(examples)}))
"""


def in_process_before(ref: str, run_dir: Path, spec, dev_file: str) -> dict:
    """`in_process_student` with the code at `ref` (float32, batches in input order), in a subprocess."""
    import subprocess
    import tempfile

    scratch = Path(tempfile.mkdtemp(prefix="retrikt-serve-before-"))
    worktree = scratch / "code"
    add = ["git", "worktree", "add", "--detach", str(worktree), ref]
    subprocess.run(add, cwd=REPO, check=True, capture_output=True)
    try:
        command = [
            sys.executable,
            "-c",
            BEFORE,
            str(Path(run_dir).resolve()),
            json.dumps(spec.task.model_dump(mode="json")),
            str(Path(dev_file).resolve()),
            str(spec.evaluate.batch_size),
            str(scratch / "p.npy"),
        ]
        env = {**os.environ, "PYTHONPATH": str(worktree)}
        done = subprocess.run(command, cwd=worktree, env=env, check=True, capture_output=True, text=True)
        measured = json.loads(done.stdout.strip().splitlines()[-1])
        probs = np.load(scratch / "p.npy")
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=REPO, capture_output=True)
    return {
        "code": f"git {ref}",
        "dtype": "float32",
        "examples": measured["examples"],
        "batch_size": spec.evaluate.batch_size,
        "threads": torch_threads(),
        "seconds": measured["seconds"],
        "examples_per_second": measured["examples"] / measured["seconds"],
        "probs": probs,
    }


def layout_worker(run_dir: str, threads: int, ready, go, results) -> None:
    """One process of a layout: load, warm up, wait for the others, predict every input."""
    import torch

    torch.set_num_threads(threads)
    import faiss

    faiss.omp_set_num_threads(threads)
    spec = load_run_spec(run_dir)
    task = Task.from_spec(spec.task)
    examples = task.load(data_files(spec, task)[1])
    row = in_process_student(Path(run_dir), spec, task, examples[: spec.evaluate.batch_size], "auto")
    ready.put(row["examples"])
    go.wait()
    started = time.perf_counter()
    row = in_process_student(Path(run_dir), spec, task, examples, "auto")
    results.put((started, time.perf_counter(), row["examples"]))


def fast_path_layouts(run_dir: Path, examples) -> dict:
    """Fast-path examples/s with all cores as 1 process x N threads and N processes x 1 thread (each
    process predicting every input; the wall time is from the first start to the last end)."""
    import multiprocessing

    cores = os.cpu_count() or 1
    out = {}
    for processes, threads in ((1, cores), (cores, 1)):
        context = multiprocessing.get_context("spawn")
        ready, results, go = context.Queue(), context.Queue(), context.Event()
        workers = [
            context.Process(target=layout_worker, args=(str(run_dir), threads, ready, go, results))
            for _ in range(processes)
        ]
        for worker in workers:
            worker.start()
        for _ in workers:
            ready.get()
        go.set()
        spans = [results.get() for _ in workers]
        for worker in workers:
            worker.join()
        wall = max(end for _, end, _ in spans) - min(start for start, _, _ in spans)
        out[f"{processes}x{threads}"] = {
            "processes": processes,
            "threads": threads,
            "examples_per_second": sum(count for _, _, count in spans) / wall,
        }
    return out


def student_bound(run_dir: Path, spec, task, examples) -> dict:
    """The examples/s a matmul-bound student would reach: FLOPs per example at the dev inputs' token counts
    over the measured 2048^3 matmul rate of each dtype (all cores)."""
    import torch

    from retrikt_ray.retrieval_student import RetrievalStudent

    student = RetrievalStudent.load(run_dir / "student" / "model", spec.student.trust_remote_code, "float32")
    config = student.encoder.config
    rows = [row for example in examples for row in task.student_inputs(example)]
    lengths = np.array([len(feature["input_ids"]) for feature in student.token_ids(rows)], dtype=np.float64)
    embeddings = sum(
        module.weight.numel() for module in student.encoder.modules() if isinstance(module, torch.nn.Embedding)
    )
    weights = sum(p.numel() for p in student.encoder.parameters()) - embeddings
    layers, hidden = config.num_hidden_layers, config.hidden_size
    # 2 FLOPs per weight a token passes, and per layer 4 * L^2 * hidden for the scores and the weighted sum
    flops = (2 * weights * lengths + 4 * layers * hidden * lengths**2).sum() / len(examples)
    gflops = {}
    for dtype in ("float32", "bfloat16"):
        a, b = (torch.randn(2048, 2048, dtype=getattr(torch, dtype)) for _ in range(2))
        a @ b
        repeats = 10 if dtype == "bfloat16" else 5
        started = time.perf_counter()
        for _ in range(repeats):
            a @ b
        gflops[dtype] = 2 * 2048**3 * repeats / (time.perf_counter() - started) / 1e9
    return {
        "non_embedding_weights": weights,
        "mean_tokens_per_input": float(lengths.mean()),
        "gflop_per_example": flops / 1e9,
        "matmul_gflops": gflops,
        "threads": torch.get_num_threads(),
        "examples_per_s": {dtype: rate * 1e9 / flops for dtype, rate in gflops.items()},
    }


def train_both(run_dir: Path, spec) -> dict:
    """The run's student stage as before the fast path and with the defaults (upstream stages reused from
    the run's runs folder; the stage trains again even when a finished one has its hash), each evaluated:
    examples/s of the training loop and of the whole stage, and dev accuracy."""
    import re

    from retrikt_ray import pipeline
    from retrikt_ray.artifacts import read_manifest, run_dir_for

    spec.storage.runs_dir = str(Path(run_dir).resolve().parent)
    spec.resources.address = None
    rows = {}
    for name, dtype, grouped in (("before", "float32", False), ("fast", "auto", True)):
        changed = spec.model_copy(deep=True)
        changed.student.dtype = dtype
        changed.student.length_grouped_batches = grouped
        changed.evaluate.teacher_zero_shot = False
        lines = []
        pipeline.run(changed, log=lines.append)
        if not any(re.match(r"\[student\] \d+s: ", line) for line in lines):  # reused: train it here
            pipeline.run(changed, only="student", force=True)
            pipeline.run(changed, only="evaluate", force=True)
        folder = run_dir_for(changed)
        student, evaluated = read_manifest(folder / "student"), read_manifest(folder / "evaluate")
        examples = student["metrics"]["steps"] * changed.student.batch_size
        rows[name] = {
            "student.dtype": dtype,
            "length_grouped_batches": grouped,
            "run_dir": str(folder),
            "precision": student["metrics"].get("compute_dtype"),
            "examples": examples,
            "stage_seconds": student["seconds"],
            "stage_examples_per_second": examples / student["seconds"],
            "loop_seconds": student["metrics"]["loop_seconds"],
            "examples_per_second": student["metrics"]["loop_examples_per_second"],
            "accuracy_student_store": evaluated["metrics"]["accuracy_student_store"],
        }
    return {
        "rows": rows,
        "speedup": rows["fast"]["examples_per_second"] / rows["before"]["examples_per_second"],
        "stage_speedup": rows["fast"]["stage_examples_per_second"] / rows["before"]["stage_examples_per_second"],
        "accuracy_delta": rows["fast"]["accuracy_student_store"] - rows["before"]["accuracy_student_store"],
    }


def in_process_teacher(spec, task, examples) -> dict:
    """Examples per second of the teacher's zero-shot classifier (the forward passes of evaluation)."""
    from retrikt_ray.teacher import Teacher

    teacher = Teacher.from_spec(spec, task)
    batch_size = spec.teacher.classify_batch_size
    teacher.classify_raw(examples[:batch_size], batch_size)  # warm-up
    started = time.perf_counter()
    teacher.classify_raw(examples, batch_size)
    seconds = time.perf_counter() - started
    return {
        "examples": len(examples),
        "batch_size": batch_size,
        "seconds": seconds,
        "examples_per_second": len(examples) / seconds,
    }


def drive_endpoint(args, spec, texts: list[str]) -> dict:
    """Serve the run on 127.0.0.1 (local Ray), load it, stop it; throughput, latencies, replicas."""
    from ray import serve

    from retrikt_ray.ray_session import ray_session

    token = read_token(spec.serve)
    if token is None and spec.serve.token_env:
        token = secrets.token_hex(16)
        os.environ[spec.serve.token_env] = token  # before Ray starts, so that the ingress replica reads it
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    spec.resources.address = None
    with ray_session(spec):
        url = start(args.run_dir, "127.0.0.1", port)
        replicas, stop = [], threading.Event()
        started = time.monotonic()
        poller = threading.Thread(target=poll_replicas, args=(serve, started, replicas, stop), daemon=True)
        poller.start()
        try:
            warmup = asyncio.run(load(url, token, texts, args.clients, args.warmup_seconds, args.inputs_per_request))
            before = process_cpu_seconds()
            measured = asyncio.run(load(url, token, texts, args.clients, args.seconds, args.inputs_per_request))
            cores = cores_by_role(before, process_cpu_seconds(), measured["seconds"])
        finally:
            stop.set()
            poller.join()
            serve.shutdown()
    latencies = np.array(measured["latencies"]) * 1000
    ok = len(latencies)
    return {
        "requests": ok + measured["errors"],
        "errors": measured["errors"],
        "error_kinds": measured["error_kinds"],
        "warmup_errors": warmup["errors"],
        "requests_per_second": ok / measured["seconds"],
        "examples_per_second": ok * args.inputs_per_request / measured["seconds"],
        "latency_ms": {name: float(np.percentile(latencies, q)) for name, q in (("p50", 50), ("p95", 95), ("p99", 99))}
        if ok
        else None,
        "replicas_over_time": replicas,
        "cores_by_process": cores,
        "cpu_ms_per_request": {role: 1000 * used / (ok / measured["seconds"]) for role, used in cores.items()}
        if ok
        else None,
    }


def process_cpu_seconds() -> dict[int, tuple[str, float]]:
    """Every process's (command line, user + system CPU seconds so far), from /proc (Linux)."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        out[int(pid)] = (command, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
    return out


def cores_by_role(before: dict, after: dict, seconds: float) -> dict[str, float]:
    """Cores each part of the serving stack used over the measured load: the StudentStore replicas, the
    ingress replica, Serve's HTTP proxy, this process (the load generator), and everything else."""
    roles = {"StudentStore": 0.0, "Ingress": 0.0, "ProxyActor": 0.0, "load generator": 0.0, "other": 0.0}
    for pid, (command, used) in after.items():
        spent = used - before.get(pid, (command, 0.0))[1]
        if pid == os.getpid():
            role = "load generator"
        else:
            role = next((name for name in ("StudentStore", "Ingress", "ProxyActor") if name in command), "other")
        roles[role] += spent / seconds
    return roles


def poll_replicas(serve, started: float, replicas: list, stop: threading.Event) -> None:
    """(seconds since start, running StudentStore replicas), once a second until stopped."""
    while not stop.is_set():
        deployment = serve.status().applications[APP_NAME].deployments[STUDENT_STORE]
        replicas.append((round(time.monotonic() - started, 1), deployment.replica_states.get("RUNNING", 0)))
        stop.wait(1.0)


async def load(url: str, token: str | None, texts: list[str], clients: int, seconds: float, per_request: int) -> dict:
    """`clients` loops of request-then-wait against /v1/classify until `seconds` have passed."""
    latencies, error_kinds = [], {}
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    deadline = time.monotonic() + seconds
    timeout = aiohttp.ClientTimeout(total=60)

    async def client(number: int, session: aiohttp.ClientSession) -> None:
        position = number * per_request
        while time.monotonic() < deadline:
            inputs = [texts[(position + i) % len(texts)] for i in range(per_request)]
            position += clients * per_request
            sent = time.perf_counter()
            try:
                async with session.post(f"{url}/v1/classify", json={"inputs": inputs}, headers=headers) as response:
                    body = await response.json()
                    ok = response.status == 200 and len(body["results"]) == per_request
                    kind = f"HTTP {response.status}"
            except (aiohttp.ClientError, asyncio.TimeoutError) as error:
                ok, kind = False, type(error).__name__
            if ok:
                latencies.append(time.perf_counter() - sent)
            else:
                error_kinds[kind] = error_kinds.get(kind, 0) + 1

    started = time.monotonic()
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=clients)) as session:
        await asyncio.gather(*(client(number, session) for number in range(clients)))
    return {
        "latencies": latencies,
        "errors": sum(error_kinds.values()),
        "error_kinds": error_kinds,
        "seconds": time.monotonic() - started,
    }


def changes(series: list) -> list:
    """The (time, count) points where the count differs from the one before."""
    return [point for index, point in enumerate(series) if index == 0 or point[1] != series[index - 1][1]]


def markdown(results: dict) -> str:
    endpoint, ceiling, teacher = (
        results["endpoint"],
        results["in_process"]["student_store"],
        results["in_process"]["teacher"],
    )
    load, serve_settings, ratios, bound = results["load"], results["serve"], results["ratios"], results["bound"]
    latency = endpoint["latency_ms"] or {"p50": float("nan"), "p95": float("nan"), "p99": float("nan")}
    replicas = "; ".join(f"{count} from {at:.0f} s" for at, count in changes(endpoint["replicas_over_time"]))
    mark = {True: "met", False: "NOT met"}
    met = results["targets_met"]
    lines = [
        f"# Serving: {results['task']}, {results['student']} + store, in-process and behind Ray Serve on 127.0.0.1",
        "",
        "## Student + store in-process (all dev inputs, one run)",
        "",
        f"Bound: {bound['non_embedding_weights'] / 1e6:.1f}M non-embedding weights, "
        f"{bound['mean_tokens_per_input']:.1f} tokens per dev input on average, "
        f"{bound['gflop_per_example']:.3f} GFLOP per example; a 2048^3 matmul on {bound['threads']} threads runs "
        + ", ".join(f"{rate:.0f} GFLOP/s in {dtype}" for dtype, rate in bound["matmul_gflops"].items())
        + ".",
        "",
        "| path | code | dtype | threads | examples / s | of the bf16 bound | of the fp32 bound | dev accuracy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in results["in_process"]["paths"].items():
        lines.append(
            f"| {name} | {row['code']} | {row['dtype']} | {row['threads']} | {row['examples_per_second']:.1f} | "
            f"{row['examples_per_second'] / bound['examples_per_s']['bfloat16']:.0%} | "
            f"{row['examples_per_second'] / bound['examples_per_s']['float32']:.0%} | {row['accuracy']:.4f} |"
        )
    lines += [
        "| bound | | bfloat16 | | " + f"{bound['examples_per_s']['bfloat16']:.0f} | 100% | | |",
        "| bound | | float32 | | " + f"{bound['examples_per_s']['float32']:.0f} | | 100% | |",
        "",
        "Fast path with all cores: "
        + ", ".join(
            f"{name} (processes x threads) {row['examples_per_second']:.1f} examples/s"
            for name, row in results["in_process"]["layouts"].items()
        )
        + ".",
        "",
        f"Fast path against float32, row by row on the dev set: probabilities differ by at most "
        f"{results['parity']['max_abs_diff_p']:.4f} (mean {results['parity']['mean_abs_diff_p']:.5f}); "
        f"{results['parity']['same_answer']:.1%} of rows get the same answer; accuracy "
        f"{results['accuracy_delta_fast_vs_fp32'] * 100:+.2f} points.",
        "",
        "## Endpoint",
        "",
        f"Load: {load['clients']} concurrent clients for {load['seconds']:.0f} s "
        f"(after {load['warmup_seconds']:.0f} s of warm-up), "
        f"{load['inputs_per_request']} inputs per request. "
        f"Serving: batches of up to {serve_settings['batch_max_size']} requests "
        f"(wait {serve_settings['batch_wait_timeout_s'] * 1000:.0f} ms), "
        f"{serve_settings['min_replicas']}-{serve_settings['max_replicas']} "
        f"replicas of {serve_settings['num_cpus']:g} CPU, "
        f"target {serve_settings['target_ongoing_requests']:g} ongoing requests each.",
        "",
        "| | examples / s | requests / s | p50 ms | p95 ms | p99 ms | errors |",
        "|---|---|---|---|---|---|---|",
        f"| endpoint (HTTP, token, Serve) | {endpoint['examples_per_second']:.1f} | "
        f"{endpoint['requests_per_second']:.1f} | "
        f"{latency['p50']:.1f} | {latency['p95']:.1f} | {latency['p99']:.1f} | "
        f"{endpoint['errors']} of {endpoint['requests']} |",
        f"| student + store in-process (fast path, batches of {ceiling['batch_size']}) | "
        f"{ceiling['examples_per_second']:.1f} | | | | | |",
        f"| teacher zero-shot in-process (batches of {teacher['batch_size']}) | "
        f"{teacher['examples_per_second']:.1f} | | | | | |",
        "",
        "Cores used during the measured load, and CPU milliseconds per request: "
        + ", ".join(
            f"{role} {used:.2f} ({endpoint['cpu_ms_per_request'][role]:.1f} ms)"
            for role, used in endpoint["cores_by_process"].items()
        )
        + ".",
        "",
        f"StudentStore replicas running: {replicas} (measured from {load['warmup_seconds']:.0f} s to "
        f"{load['warmup_seconds'] + load['seconds']:.0f} s; `replicas_over_time` in the JSON has every second).",
        "",
    ]
    training = results["training"]
    if training:
        lines += [
            "## Student training (the run's student stage again, upstream reused)",
            "",
            "| | student.dtype | length-grouped batches | precision | examples | loop s | loop examples / s "
            "| stage s | stage examples / s | dev accuracy (student + store) |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, row in training["rows"].items():
            lines.append(
                f"| {name} | {row['student.dtype']} | {row['length_grouped_batches']} | {row['precision']} | "
                f"{row['examples']} | {row['loop_seconds']:.1f} | {row['examples_per_second']:.1f} | "
                f"{row['stage_seconds']:.1f} | {row['stage_examples_per_second']:.1f} | "
                f"{row['accuracy_student_store']:.4f} |"
            )
        lines += [
            "",
            f"Training loop {training['speedup']:.2f}x, whole stage {training['stage_speedup']:.2f}x, accuracy "
            f"{training['accuracy_delta'] * 100:+.2f} points. The loop is the steps and re-encoding the keys after "
            "every epoch; the stage adds Ray Train's start-up, loading, the retrieval gate and saving.",
            "",
        ]
    lines += [
        "## Targets",
        "",
        "| target | measured | |",
        "|---|---|---|",
        f"| in-process >= 800 examples/s | {results['in_process_fast_examples_per_s']:.1f} "
        f"({ratios['fast_over_fp32']:.2f}x float32) | {mark[met['in_process_at_least_800']]} |",
        f"| endpoint >= 70% of in-process | {results['endpoint_fraction_of_in_process']:.0%} | "
        f"{mark[met['endpoint_at_least_70_percent_of_in_process']]} |",
        f"| endpoint p99 <= 250 ms | {latency['p99']:.0f} ms | {mark[met['endpoint_p99_at_most_250_ms']]} |",
        f"| zero errors | {endpoint['errors']} | {mark[met['zero_errors']]} |",
        f"| accuracy within 0.3 points of float32 | {results['accuracy_delta_fast_vs_fp32'] * 100:+.2f} | "
        f"{mark[met['accuracy_within_0.3_points']]} |",
        f"| student + store >= 10x the teacher | {ratios['student_store_over_teacher']:.1f}x | "
        f"{mark[met['student_store_at_least_10x_teacher']]} |",
    ]
    if training:
        lines += [
            f"| training >= 2x | {training['speedup']:.2f}x | {mark[met['training_at_least_2x']]} |",
            f"| training accuracy within 0.5 points | {training['accuracy_delta'] * 100:+.2f} | "
            f"{mark[met['training_accuracy_within_0.5_points']]} |",
        ]
    lines += [
        "",
        f"Machine: {results['machine']['cpus']} CPUs, {results['machine']['platform']}. "
        "The load generator shares the CPUs with the server.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
