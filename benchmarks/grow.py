"""What `retrikt grow` is worth on a finished run, written to benchmarks/results/grow.{json,md}.

    .venv/bin/python benchmarks/grow.py RUN_DIR [--sizes 1000 2000 4000] [--min-words 10]

RUN_DIR is a finished run (the demo's: `retrikt run`). It is copied to a scratch folder first, so the run itself
gets no versions. In one run:
1. for each size, `grow` from v0 with that many SST-2 training sentences of `--min-words` or more words (the
   packaged train file: grow skips the labelled examples and the dev rows), without and with retraining; per
   version on all dev rows: student+store, head alone, retrieval alone, agreement with the teacher, exact McNemar
   against v0, grow time split into selecting, labelling and retraining (or appending), and the store's rows;
2. for the versions grown without retraining, the mixing weight lam and k a user could set instead (a grid,
   evaluated in-process on the dev rows);
3. the endpoint (a local Ray and Serve as `retrikt serve` starts them, the run's serve section) serving v0 and
   each retrained version in turn (swapped in with `use` + reload), p50/p99 under `--clients` clients of 4 inputs;
   then a swap from v0 to the largest version under the same load: requests sent and failed.
"""

import argparse
import asyncio
import importlib.util
import json
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from retrikt_ray import versions  # noqa: E402
from retrikt_ray.grow import grow, read_texts  # noqa: E402
from retrikt_ray.metrics import accuracy  # noqa: E402
from retrikt_ray.tasks import Task, data_files, load_dev  # noqa: E402

INPUTS_PER_REQUEST = 4


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve_benchmark():
    """benchmarks/serve.py as a module (its load generator is reused, not copied)."""
    spec = importlib.util.spec_from_file_location("serve_benchmark", REPO / "benchmarks" / "serve.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 2000, 4000])
    parser.add_argument("--min-words", type=int, default=10)
    parser.add_argument("--texts", type=Path, help="default: the task's packaged training file")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0, help="measured load per version")
    parser.add_argument("--scratch", type=Path, help="where the run is copied (default: a temporary folder)")
    parser.add_argument("--out", default="benchmarks/results/grow")
    args = parser.parse_args()

    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="grow-bench-"))
    run_dir = scratch / args.run_dir.resolve().name
    if not run_dir.exists():
        shutil.copytree(args.run_dir, run_dir, ignore=shutil.ignore_patterns("versions", "traffic", "_ray_train"))
    spec = versions.load_run_spec(run_dir)
    task = Task.from_spec(spec.task)
    texts = args.texts or Path(data_files(spec, task)[0])
    candidates, source = read_texts(run_dir, texts, from_traffic=False)
    if Path(source["path"]).is_relative_to(REPO):  # the packaged file: its path in the repository
        source["path"] = str(Path(source["path"]).relative_to(REPO))
    original = versions.original(run_dir)

    rows = []
    for size in args.sizes:
        for retrain in (False, True):
            versions.use(run_dir, versions.ORIGINAL)
            started = time.perf_counter()
            version = grow(run_dir, candidates, source, size, 0, retrain, args.min_words, log=print)
            rows.append(version_row(version, size, retrain, time.perf_counter() - started))
            print(json.dumps(rows[-1]), flush=True)
    settings = [mixing_grid(run_dir, spec, row) for row in rows if not row["retrained"]]

    retrained = [row for row in rows if row["retrained"]]
    endpoint = drive_endpoint(run_dir, spec, task, [row["version"] for row in retrained], args)
    best = max(retrained, key=lambda row: row["gain"])
    best_without = max((row for row in rows if not row["retrained"]), key=lambda row: row["gain"])
    largest = max(retrained, key=lambda row: row["size"])
    p99 = {entry["version"]: entry["p99_ms"] for entry in endpoint["versions"]}
    results = {
        "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
        "run": args.run_dir.name,
        "texts": {**source, "min_words": args.min_words},
        "original": {
            "store_rows": original.record["counts"]["store_rows"],
            **original.record["evaluation"],
        },
        "versions": rows,
        "without_retraining_settings": settings,
        "endpoint": endpoint,
        "gain_with_retraining": best["gain"],
        "p_value_with_retraining": best["p_value"],
        "best_size_with_retraining": best["size"],
        "gain_without_retraining": best_without["gain"],
        "best_size_without_retraining": best_without["size"],
        "p99_ratio_at_4x": p99[largest["version"]] / p99[versions.ORIGINAL],
        "swap_failed_requests": endpoint["swap"]["failed"],
    }
    out = REPO / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))


def version_row(version: versions.Version, size: int, retrain: bool, seconds: float) -> dict:
    record = version.record
    evaluation, counts = record["evaluation"], record["counts"]
    against = evaluation["against_parent"]
    return {
        "version": version.name,
        "size": size,
        "retrained": retrain,
        "texts_added": counts["texts_added"],
        "store_rows": counts["store_rows"],
        "skipped": {key.removeprefix("skipped_"): value for key, value in counts.items() if key.startswith("skipped_")},
        "accuracy_student_store": evaluation["accuracy_student_store"],
        "accuracy_student_head": evaluation["accuracy_student_head"],
        "accuracy_retrieval_only": evaluation["accuracy_retrieval_only"],
        "agreement_student_teacher": evaluation.get("agreement_student_teacher"),
        "gain": against["gain"],
        "p_value": against["p_value"],
        "only_v0_right": against["only_baseline_right"],
        "only_new_right": against["only_variant_right"],
        "timings": record["timings"],
        "seconds": seconds,
    }


def mixing_grid(run_dir: Path, spec, row: dict) -> dict:
    """Dev accuracy of a version grown without retraining at other lam and k, beside v0 at the same ones."""
    from retrikt_ray.knowledge_store import KnowledgeStore
    from retrikt_ray.retrieval_student import RetrievalStudent, predict_examples

    task, dev = load_dev(spec)
    gold = np.array([example.label for example in dev])
    grid = []
    for name in (versions.ORIGINAL, row["version"]):
        version = versions.get(run_dir, name)
        student = RetrievalStudent.load(version.model_dir, spec.student.trust_remote_code, spec.student.dtype)
        store = KnowledgeStore.load(version.store_dir)
        trained_lam = student.lam
        for lam in sorted({trained_lam, 0.5, 0.7, 0.9}):
            for k in sorted({spec.student.k, 16, 32}):
                student.lam, student.k = lam, k
                predicted = predict_examples(task, student, store, dev, spec.evaluate.batch_size)
                grid.append({"version": name, "lam": lam, "k": k, "accuracy": accuracy(gold, predicted["p"])})
    grown = [entry for entry in grid if entry["version"] == row["version"]]
    best = max(grown, key=lambda entry: entry["accuracy"])
    at_best = next(
        e for e in grid if e["version"] == versions.ORIGINAL and (e["lam"], e["k"]) == (best["lam"], best["k"])
    )
    return {
        "version": row["version"],
        "size": row["size"],
        "trained_lam": trained_lam,
        "trained_k": spec.student.k,
        "grid": grid,
        "best": best,
        "v0_at_best": at_best["accuracy"],
    }


def drive_endpoint(run_dir: Path, spec, task, grown: list[str], args) -> dict:
    """p50/p99 of v0 and each grown version under the same load, then a swap under load (module docstring)."""
    import ray
    from ray import serve

    from retrikt_ray.ray_session import ray_session
    from retrikt_ray.serve import read_token, request_reload, start

    bench = serve_benchmark()
    _, dev = load_dev(spec)
    texts = [example.fields[task.input_fields[0]] for example in dev]
    token = read_token(spec.serve)
    port = free_port()
    measured = []
    with ray_session(spec):
        versions.use(run_dir, versions.ORIGINAL)
        url = start(run_dir, "127.0.0.1", port)
        for name in [versions.ORIGINAL, *grown]:
            versions.use(run_dir, name)
            reloaded = request_reload(run_dir, "127.0.0.1", port)
            assert reloaded["version"] == name, reloaded
            asyncio.run(bench.load(url, token, texts, args.clients, 5.0, INPUTS_PER_REQUEST))  # warm-up
            outcome = asyncio.run(bench.load(url, token, texts, args.clients, args.seconds, INPUTS_PER_REQUEST))
            latencies = np.array(outcome["latencies"]) * 1000
            measured.append(
                {
                    "version": name,
                    "store_rows": reloaded["rows"],
                    "requests": len(latencies) + outcome["errors"],
                    "errors": outcome["errors"],
                    "p50_ms": float(np.percentile(latencies, 50)),
                    "p99_ms": float(np.percentile(latencies, 99)),
                    "examples_per_s": len(latencies) * INPUTS_PER_REQUEST / outcome["seconds"],
                }
            )
            print(json.dumps(measured[-1]), flush=True)
        versions.use(run_dir, versions.ORIGINAL)
        request_reload(run_dir, "127.0.0.1", port)
        swap = swap_under_load(bench, run_dir, url, token, texts, grown[-1], args, port, request_reload)
        serve.shutdown()
    ray.shutdown()
    return {"clients": args.clients, "inputs_per_request": INPUTS_PER_REQUEST, "versions": measured, "swap": swap}


def swap_under_load(bench, run_dir, url, token, texts, target, args, port, request_reload) -> dict:
    """The load for `--seconds`; a third of the way in, `use target` and a reload."""
    outcome = {}

    def swap():
        time.sleep(args.seconds / 3)
        versions.use(run_dir, target)
        outcome["reload"] = request_reload(run_dir, "127.0.0.1", port)

    thread = threading.Thread(target=swap)
    thread.start()
    load = asyncio.run(bench.load(url, token, texts, args.clients, args.seconds, INPUTS_PER_REQUEST))
    thread.join()
    return {
        "from": versions.ORIGINAL,
        "to": target,
        "reloaded": outcome.get("reload"),
        "sent": len(load["latencies"]) + load["errors"],
        "failed": load["errors"],
        "error_kinds": load["error_kinds"],
    }


def markdown(results: dict) -> str:
    original = results["original"]
    lines = [
        f"# Growing the served model: `retrikt grow` on {results['run']}",
        "",
        f"Texts: {results['texts'].get('path', results['texts']['kind'])} ({results['texts']['rows']} rows), "
        f"{results['texts']['min_words']}+ words, none equal to a labelled example or a dev row. "
        f"v0 (the run's own student + store): {original['store_rows']} store rows, dev "
        f"{original['accuracy_student_store']:.4f} (head {original['accuracy_student_head']:.4f}, "
        f"retrieval {original['accuracy_retrieval_only']:.4f}), on {original['dev_examples']} dev rows. "
        "Gains are new minus v0, exact McNemar against v0 on the same rows. Labelling counts only the texts no "
        "earlier grow of the same draw labelled (the teacher's labels are kept, so each retrained version reuses the "
        "labels of the version grown without retraining just before it, and a larger size labels only its new "
        "texts). Times are one run on a 2-core machine shared with other work.",
        "",
        "| version | texts | retrained | store rows | student+store | head | retrieval | agrees w/ teacher | "
        "gain | McNemar p | selecting s | labelling s | retraining / appending s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["versions"]:
        timings = row["timings"]
        agreement = row["agreement_student_teacher"]
        lines.append(
            f"| {row['version']} | {row['texts_added']} | {'yes' if row['retrained'] else 'no'} | "
            f"{row['store_rows']} | "
            f"{row['accuracy_student_store']:.4f} | {row['accuracy_student_head']:.4f} | "
            f"{row['accuracy_retrieval_only']:.4f} | {'' if agreement is None else f'{agreement:.4f}'} | "
            f"{100 * row['gain']:+.1f} | {row['p_value']:.3f} | {timings['selecting_s']:.0f} | "
            f"{timings['labelling_s']:.0f} | {timings.get('retraining_s', timings.get('appending_s', 0)):.0f} |"
        )
    lines += ["", "## Without retraining: other mixing weights and k", ""]
    lines += [
        "| version | texts | as trained (lam, k) | best lam, k | grown at best | v0 at best |",
        "|---|---|---|---|---|---|",
    ]
    for entry in results["without_retraining_settings"]:
        trained = next(
            e["accuracy"]
            for e in entry["grid"]
            if e["version"] == entry["version"] and (e["lam"], e["k"]) == (entry["trained_lam"], entry["trained_k"])
        )
        best = entry["best"]
        lines.append(
            f"| {entry['version']} | {entry['size']} | "
            f"{trained:.4f} ({entry['trained_lam']:g}, {entry['trained_k']}) | "
            f"{best['lam']:g}, {best['k']} | {best['accuracy']:.4f} | {entry['v0_at_best']:.4f} |"
        )
    endpoint = results["endpoint"]
    lines += [
        "",
        f"## Served, {endpoint['clients']} clients x {endpoint['inputs_per_request']} inputs per request",
        "",
        "| version | store rows | requests | errors | p50 ms | p99 ms | examples/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in endpoint["versions"]:
        lines.append(
            f"| {row['version']} | {row['store_rows']} | {row['requests']} | {row['errors']} | {row['p50_ms']:.0f} | "
            f"{row['p99_ms']:.0f} | {row['examples_per_s']:.1f} |"
        )
    swap = endpoint["swap"]
    lines += [
        "",
        f"Swap {swap['from']} -> {swap['to']} under the same load: {swap['sent']} requests sent, {swap['failed']} "
        "failed.",
        "",
        f"Top-level: gain_with_retraining {results['gain_with_retraining']:+.4f} "
        f"(p {results['p_value_with_retraining']:.3f}, {results['best_size_with_retraining']} texts), "
        f"gain_without_retraining {results['gain_without_retraining']:+.4f}, "
        f"p99_ratio_at_4x {results['p99_ratio_at_4x']:.2f}, swap_failed_requests {results['swap_failed_requests']}.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
