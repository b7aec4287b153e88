"""A real two-node Ray cluster on this machine: a head and a second node joined with `ray start`, each
with 2 logical CPUs, a custom resource naming it and its own temp dir (two raylets, loopback only).
A tiny job with spread placement is submitted with `retrikt submit`; its manifests must show that
generation and every training stage ran on both nodes. The runs dir is a local path: on one machine
both nodes see it, as a shared filesystem would let them on a real cluster.
"""

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests
from test_jobs_api import cli, free_port, stop_ray_head
from test_stages import tiny_spec

from retrikt_ray.artifacts import read_manifest
from retrikt_ray.config import dump_spec
from retrikt_ray.pipeline import STAGE_NAMES

NODES = ("node_head", "node_second")
TRAINING_STAGES = ("prompt", "ppo", "student")


def node_command(temp_dir: Path, name: str, join: str | None) -> list[str]:
    """`ray start --block` for one node on 127.0.0.1 with ports of its own; `join` is the head's GCS address."""
    worker_ports = 20000 + secrets.randbelow(9000)
    role = ["--address", join] if join else [
        "--head", "--port", str(free_port()), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(free_port()),
        "--include-dashboard", "true", "--ray-client-server-port", str(free_port()),
    ]  # fmt: skip
    return [
        str(Path(sys.executable).parent / "ray"), "start", "--block", "--disable-usage-stats", *role,
        "--node-ip-address", "127.0.0.1", "--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
        "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
        "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port()),
        "--min-worker-port", str(worker_ports), "--max-worker-port", str(worker_ports + 400),
        "--num-cpus", "2", "--num-gpus", "0", "--resources", f'{{"{name}": 1}}',
        "--object-store-memory", str(300 * 1024 * 1024), "--temp-dir", str(temp_dir),
    ]  # fmt: skip


def alive_nodes(url: str, token: str) -> dict[str, str]:
    """Node name (its custom resource) -> Ray node id, for every alive node the dashboard reports."""
    reply = requests.get(f"{url}/api/v0/nodes", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    reply.raise_for_status()
    named = {}
    for node in reply.json()["data"]["result"]["result"]:
        names = [name for name in NODES if name in node["resources_total"]]
        if node["state"] == "ALIVE" and names:
            named[names[0]] = node["node_id"]
    return named


@pytest.fixture(scope="module")
def two_nodes():
    """Yields (dashboard URL, token file, {node name: node id}); stops both nodes, also on failure."""
    temp_dirs = [Path(tempfile.mkdtemp(prefix=f"r{index}", dir="/tmp")) for index in range(2)]  # short: socket paths
    token_file = temp_dirs[0] / "token"
    token_file.write_text(secrets.token_hex(32))
    env = {
        **{name: value for name, value in os.environ.items() if name not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")},
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_file),
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # the job's `python`
    }
    started: list[tuple[subprocess.Popen, Path]] = []

    def start(index: int, join: str | None) -> list[str]:
        command = node_command(temp_dirs[index], NODES[index], join)
        log = temp_dirs[index] / "ray-start.log"
        with open(log, "w") as out:
            started.append((subprocess.Popen(command, env=env, cwd=temp_dirs[index], stdout=out, stderr=subprocess.STDOUT), log))
        return command

    def wait_for(count: int) -> dict[str, str]:
        deadline = time.monotonic() + 180
        while True:
            for process, log in started:
                assert process.poll() is None, log.read_text()[-3000:]
            try:
                nodes = alive_nodes(url, token_file.read_text())
                if len(nodes) == count:
                    return nodes
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, f"{count} Ray node(s) did not come up in 180 s"
            time.sleep(1)

    try:
        head = start(0, None)
        url = f"http://127.0.0.1:{head[head.index('--dashboard-port') + 1]}"
        wait_for(1)
        start(1, f"127.0.0.1:{head[head.index('--port') + 1]}")
        yield url, token_file, wait_for(2)
    finally:
        # The second node first, so the head does not wait on a node that is going away.
        for (process, _), temp_dir in reversed(list(zip(started, temp_dirs))):
            stop_ray_head(process, temp_dir)
        for temp_dir in temp_dirs:
            shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def spread_run(two_nodes, tiny_models, tmp_path_factory):
    """A tiny job with two training workers and two generation replicas, spread, submitted and waited for."""
    url, token_file, _ = two_nodes
    root = tmp_path_factory.mktemp("multinode")
    spec = tiny_spec(tiny_models, root / "runs")
    spec.ppo.updates = 1
    spec.resources.num_workers = 2
    spec.resources.generation_replicas = 2
    spec.resources.placement = "spread"
    job = root / "spread.yaml"
    job.write_text(dump_spec(spec))
    submitted = cli("submit", str(job), "--address", url, "--token-file", str(token_file))
    assert submitted.exit_code == 0, submitted.output
    job_id = submitted.stdout.strip().splitlines()[-1]
    followed = cli("logs", job_id, "--follow", "--address", url, "--token-file", str(token_file))
    status = cli("status", job_id, "--address", url, "--token-file", str(token_file))
    assert "status   SUCCEEDED" in status.stdout, followed.output[-4000:]
    (run_dir,) = (root / "runs").iterdir()
    return run_dir


def test_generation_ran_on_both_nodes(two_nodes, spread_run):
    _, _, nodes = two_nodes
    by_node = read_manifest(spread_run / "generate")["metrics"]["samples_by_node"]
    assert set(by_node) == set(nodes.values())
    assert all(count > 0 for count in by_node.values())


def test_every_training_stage_ran_a_worker_on_each_node(two_nodes, spread_run):
    _, _, nodes = two_nodes
    for stage in TRAINING_STAGES:
        metrics = read_manifest(spread_run / stage)["metrics"]
        assert metrics["workers"] == 2, stage
        assert sorted(metrics["worker_nodes"]) == sorted(nodes.values()), stage


def test_the_spread_run_is_complete(spread_run):
    for stage in STAGE_NAMES:
        manifest = read_manifest(spread_run / stage)
        assert manifest["status"] == "done", stage
        assert manifest["files"] and all((spread_run / stage / name).is_file() for name in manifest["files"]), stage
    assert 0.0 <= read_manifest(spread_run / "evaluate")["metrics"]["accuracy_student_store"] <= 1.0

