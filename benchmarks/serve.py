"""Load-test the serving endpoint of a finished run and record benchmarks/results/serve.{json,md}.

    .venv/bin/python benchmarks/serve.py RUN_DIR [--clients 8] [--seconds 30] [--inputs-per-request 4]

RUN_DIR is a finished run of the packaged models, e.g. jobs/demo.yaml with small budgets:

    .venv/bin/retrikt run jobs/demo.yaml --set generate.samples_per_label=40 --set ppo.updates=1 \\
        --set prompt.epochs=1 --set student.epochs=1 --set data.dev_limit=100

In one run, on the SST-2 dev sentences, one after the other:
1. the in-process ceiling: the served student + store (`Predictor`, no server) in batches;
2. the teacher's zero-shot classifier on (a slice of) the same inputs, in-process;
3. the endpoint: a local Ray and Serve on 127.0.0.1 as `retrikt serve` starts them, driven by N
   concurrent clients for T seconds after a warm-up; replicas are polled every second meanwhile.
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

from retrikt_ray.serve import APP_NAME, STUDENT_STORE, Predictor, load_run_spec, read_token, start  # noqa: E402
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
    parser.add_argument("--out", default="benchmarks/results/serve")
    args = parser.parse_args()

    spec = load_run_spec(args.run_dir)
    task = Task.from_spec(spec.task)
    examples = task.load(data_files(spec, task)[1])
    texts = [example.fields[task.input_fields[0]] for example in examples]

    ceiling = in_process_student(args.run_dir, examples)
    teacher = in_process_teacher(spec, task, examples[: args.teacher_examples])
    endpoint = drive_endpoint(args, spec, texts)

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
        "in_process": {"student_store": ceiling, "teacher": teacher},
        "ratios": {
            "endpoint_over_ceiling": endpoint["examples_per_second"] / ceiling["examples_per_second"],
            "student_store_over_teacher": ceiling["examples_per_second"] / teacher["examples_per_second"],
        },
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
    }
    results["targets_met"] = {
        "zero_errors": endpoint["errors"] == 0,
        "endpoint_at_least_half_the_ceiling": results["ratios"]["endpoint_over_ceiling"] >= 0.5,
        "student_store_at_least_10x_teacher": results["ratios"]["student_store_over_teacher"] >= 10,
    }
    out = REPO / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))


def in_process_student(run_dir: Path, examples) -> dict:
    """Examples per second of the served Predictor over all inputs, in its own batches, no server."""
    predictor = Predictor.load(run_dir)
    predictor.results(examples[: predictor.batch_size], [False] * predictor.batch_size)  # warm-up
    started = time.perf_counter()
    predictor.results(examples, [False] * len(examples))
    seconds = time.perf_counter() - started
    return {
        "examples": len(examples),
        "batch_size": predictor.batch_size,
        "seconds": seconds,
        "examples_per_second": len(examples) / seconds,
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
            measured = asyncio.run(load(url, token, texts, args.clients, args.seconds, args.inputs_per_request))
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
    }


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
    load, serve_settings, ratios = results["load"], results["serve"], results["ratios"]
    latency = endpoint["latency_ms"] or {"p50": float("nan"), "p95": float("nan"), "p99": float("nan")}
    replicas = "; ".join(f"{count} from {at:.0f} s" for at, count in changes(endpoint["replicas_over_time"]))
    mark = {True: "met", False: "NOT met"}
    lines = [
        f"# Serving: {results['task']}, {results['student']} + store behind Ray Serve on 127.0.0.1",
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
        f"| student + store in-process (ceiling, batches of {ceiling['batch_size']}) | "
        f"{ceiling['examples_per_second']:.1f} | | | | | |",
        f"| teacher zero-shot in-process (batches of {teacher['batch_size']}) | "
        f"{teacher['examples_per_second']:.1f} | | | | | |",
        "",
        f"StudentStore replicas running: {replicas} (measured from {load['warmup_seconds']:.0f} s to "
        f"{load['warmup_seconds'] + load['seconds']:.0f} s; `replicas_over_time` in the JSON has every second).",
        "",
        "| target | measured | |",
        "|---|---|---|",
        f"| zero errors | {endpoint['errors']} | {mark[results['targets_met']['zero_errors']]} |",
        f"| endpoint >= 50% of the in-process ceiling | {ratios['endpoint_over_ceiling']:.0%} | "
        f"{mark[results['targets_met']['endpoint_at_least_half_the_ceiling']]} |",
        f"| student + store >= 10x the teacher | {ratios['student_store_over_teacher']:.1f}x | "
        f"{mark[results['targets_met']['student_store_at_least_10x_teacher']]} |",
        "",
        f"Machine: {results['machine']['cpus']} CPUs, {results['machine']['platform']}. "
        "The load generator shares the CPUs with the server.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
