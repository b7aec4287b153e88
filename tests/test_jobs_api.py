"""`retrikt submit`, `status`, `logs`, `stop`, `jobs` against a real two-node Ray cluster started here:
a head and a second node joined with `ray start`, each with 2 logical CPUs, a custom resource naming
it and its own temp dir (two raylets, loopback only, token authentication on). The tiny job submitted
spreads its generation replicas and training workers; its manifests must show that generation and
every training stage ran on both nodes. The runs dir is a local path: on one machine both nodes see
it, as a shared filesystem would let them on a real cluster. Also: what a submission uploads."""

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import psutil
import pytest
import requests
from helpers import cli, process_tree, still_running, tiny_spec
from ray._private.runtime_env.packaging import create_package

from retrikt_ray import jobs_api
from retrikt_ray.artifacts import read_manifest
from retrikt_ray.config import dump_spec
from retrikt_ray.pipeline import STAGE_NAMES

REPO = Path(__file__).resolve().parents[1]
UPLOAD_LIMIT = 100 * 1024 * 1024
NO_MODELS = {"teacher": "unused/teacher", "student": "unused/student"}  # for tests that run nothing
NODES = ("node_head", "node_second")
TRAINING_STAGES = ("prompt", "ppo", "student")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stop_ray_head(head: subprocess.Popen, temp_dir: Path) -> None:
    """SIGTERM to `ray start --block` stops what it started; then any process still under our temp dir."""
    head.send_signal(signal.SIGTERM)
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        head.kill()
    for process in psutil.process_iter(["pid", "cmdline"]):
        if any(str(temp_dir) in part for part in process.info["cmdline"] or []):
            with contextlib.suppress(psutil.Error):
                process.kill()


def node_command(temp_dir: Path, name: str, join: str | None) -> list[str]:
    """`ray start --block` for one node on 127.0.0.1 with ports of its own; `join` is the head's GCS address."""
    worker_ports = 20000 + secrets.randbelow(9000)
    role = ["--address", join] if join else [
        "--head", "--port", str(free_port()), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(free_port()),
        "--include-dashboard", "true", "--ray-client-server-port", str(free_port()),
    ]  # fmt: skip
    return [
        str(Path(sys.executable).parent / "ray"), "start", "--block", "--disable-usage-stats", *role,
        "--node-ip-address", "127.0.0.1", "--node-manager-port", str(free_port()),
        "--object-manager-port", str(free_port()),
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
def ray_cluster():
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
            started.append(
                (subprocess.Popen(command, env=env, cwd=temp_dirs[index], stdout=out, stderr=subprocess.STDOUT), log)
            )
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
def submitted(ray_cluster, tiny_models, tmp_path_factory):
    """A tiny SST-2 job with two training workers and two generation replicas, spread over both nodes,
    submitted with `retrikt submit` and followed to its end with `retrikt logs --follow`."""
    url, token_file, _ = ray_cluster
    root = tmp_path_factory.mktemp("submit")
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
    (run_dir,) = [path for path in (root / "runs").iterdir() if (path / "job.yaml").is_file()]  # not mlflow/
    return job_id, submitted, followed, run_dir


def test_submitted_job_runs_the_pipeline_into_the_specs_runs_dir(submitted):
    job_id, submitted_result, followed, run_dir = submitted
    assert followed.exit_code == 0, followed.output[-3000:]
    for stage in STAGE_NAMES:
        assert f"[{stage}]" in followed.stdout
    assert job_id.startswith("raysubmit_")
    assert f"run directory: {run_dir}" in submitted_result.stderr
    for stage in STAGE_NAMES:
        manifest = read_manifest(run_dir / stage)
        assert manifest["status"] == "done", stage
        assert manifest["files"] and all((run_dir / stage / name).is_file() for name in manifest["files"]), stage
    assert 0.0 <= read_manifest(run_dir / "evaluate")["metrics"]["accuracy_student_store"] <= 1.0
    assert cli("show", str(run_dir)).exit_code == 0


def test_status_jobs_and_stop_of_a_finished_job(submitted, ray_cluster):
    url, token_file, _ = ray_cluster
    job_id, _, _, run_dir = submitted
    status = cli("status", job_id, "--address", url, "--token-file", str(token_file))
    assert status.exit_code == 0
    assert "status   SUCCEEDED" in status.stdout and f"run_dir  {run_dir}" in status.stdout
    listed = cli("jobs", "--address", url, "--token-file", str(token_file))
    assert listed.exit_code == 0 and job_id in listed.stdout
    stopped = cli("stop", job_id, "--address", url, "--token-file", str(token_file))
    assert stopped.exit_code == 0 and "had already ended" in stopped.stdout
    assert "[evaluate]" in cli("logs", job_id, "--address", url, "--token-file", str(token_file)).stdout


def test_address_from_ray_address_and_an_explicit_address_wins(ray_cluster, monkeypatch):
    url, token_file, _ = ray_cluster
    listed = cli("jobs", "--token-file", str(token_file), env={"RAY_ADDRESS": url})
    assert listed.exit_code == 0, listed.output
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:1")
    jobs_api.list_jobs(url, token_file)  # RAY_ADDRESS names a dead port: the explicit address is used
    with pytest.raises(jobs_api.JobsError, match="127.0.0.1:1"):
        jobs_api.list_jobs(None, token_file)


def job_processes(url: str, token: str, details) -> list:
    """A running job's processes on this machine: its driver with its children, and its Ray actors (the State
    API's, by the job's Ray id) alive now; [] until it has both a driver and an actor. Detached actors (Ray Data's
    AutoscalingCoordinator) are left out: Ray keeps them for the cluster's later jobs by design."""
    reply = requests.get(
        f"{url}/api/v0/actors",
        params={"limit": 10000, "detail": "true"},
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )
    reply.raise_for_status()
    actors = [
        actor["pid"]
        for actor in reply.json()["data"]["result"]["result"]
        if actor["job_id"] == details.job_id
        and actor["state"] == "ALIVE"
        and actor.get("pid")
        and not actor.get("is_detached")
    ]
    if not actors or details.driver_info is None:
        return []
    found = process_tree(int(details.driver_info.pid))
    for pid in actors:
        with contextlib.suppress(psutil.Error):
            found.append(psutil.Process(pid))
    return found


def test_stop_a_running_job(ray_cluster, tiny_models, tmp_path):
    """Stopped once it runs, with Ray actors of its own (its first training stage's): the job ends STOPPED and
    its driver and actors end with it."""
    url, token_file, _ = ray_cluster
    job_id, _ = jobs_api.submit(tiny_spec(tiny_models, tmp_path / "runs"), url, token_file)
    client = jobs_api._client(url, token_file)
    deadline = time.monotonic() + 300
    while True:
        details = client.get_job_info(job_id)
        assert details.status in ("PENDING", "RUNNING"), (details.status, details.message)
        running = job_processes(url, token_file.read_text(), details) if details.status == "RUNNING" else []
        if running:
            break
        assert time.monotonic() < deadline, f"the job has no Ray actor after 300 s ({details.status})"
        time.sleep(1)
    assert jobs_api.stop(job_id, url, token_file)
    assert jobs_api.wait(job_id, url, token_file, timeout_s=120)["status"] == "STOPPED"
    assert still_running(running, within_s=60) == []


def test_wrong_token_and_unknown_job_are_one_line_errors(ray_cluster, tmp_path):
    url, token_file, _ = ray_cluster
    wrong = tmp_path / "wrong-token"
    wrong.write_text("not-the-token")
    refused = cli("jobs", "--address", url, "--token-file", str(wrong))
    assert refused.exit_code == 2 and "Authentication failed" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    unknown = cli("status", "raysubmit_nosuchjob", "--address", url, "--token-file", str(token_file))
    assert unknown.exit_code == 2 and len(unknown.stderr.strip().splitlines()) == 1


def test_unreachable_cluster_and_missing_token_file_are_one_line_errors(tmp_path):
    unreachable = cli("jobs", "--address", f"http://127.0.0.1:{free_port()}")
    assert unreachable.exit_code == 2 and unreachable.stderr.startswith("error: http://127.0.0.1:")
    missing = cli("jobs", "--address", "http://127.0.0.1:1", "--token-file", str(tmp_path / "none"))
    assert missing.exit_code == 2 and "token file not found" in missing.stderr


def test_upload_is_the_checkout_without_runs_venv_git_or_caches(tmp_path):
    spec = tiny_spec(NO_MODELS, "runs")
    environment = jobs_api.runtime_env(jobs_api.carried_spec(spec), REPO)
    package = tmp_path / "package.zip"
    create_package(environment["working_dir"], package, include_gitignore=True, excludes=environment["excludes"])
    assert package.stat().st_size < UPLOAD_LIMIT
    names = zipfile.ZipFile(package).namelist()
    assert "cli.py" in names and "retrikt_ray/pipeline.py" in names and "jobs/demo.yaml" in names
    assert not [
        name
        for name in names
        if name.split("/")[0] in (".git", ".venv", "runs", ".pytest_cache") or "__pycache__" in name
    ]


def test_upload_leaves_out_what_the_checkouts_git_exclude_file_ignores(tmp_path):
    checkout = tmp_path / "checkout"
    (checkout / ".git" / "info").mkdir(parents=True)
    (checkout / ".git" / "info" / "exclude").write_text("# git's comment lines\n\n/wheels/\n*.gguf\n")
    (checkout / "wheels").mkdir()
    (checkout / "wheels" / "ray.whl").write_bytes(b"a wheel")
    (checkout / "teacher.gguf").write_bytes(b"weights")
    (checkout / "cli.py").write_text("kept")
    environment = jobs_api.runtime_env(jobs_api.carried_spec(tiny_spec(NO_MODELS, "runs")), checkout)
    assert environment["excludes"] == jobs_api.EXCLUDES + ["/wheels/", "*.gguf"]
    package = tmp_path / "package.zip"
    create_package(environment["working_dir"], package, include_gitignore=True, excludes=environment["excludes"])
    assert zipfile.ZipFile(package).namelist() == ["cli.py"]


def test_carried_spec_runs_on_the_cluster_and_writes_where_the_spec_says(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = tiny_spec(NO_MODELS, "runs")
    carried = jobs_api.carried_spec(spec)
    assert carried.resources.address == "auto" and spec.resources.address is None
    assert carried.storage.runs_dir == str(tmp_path / "runs") and spec.storage.runs_dir == "runs"
    assert carried.spec_hash() == spec.spec_hash()  # the run directory a local run would have
    assert jobs_api.carried_spec(tiny_spec(NO_MODELS, "~/runs")).storage.runs_dir == "~/runs"  # the cluster's home
    in_bucket = jobs_api.carried_spec(tiny_spec(NO_MODELS, "s3://bucket/runs"))
    assert in_bucket.storage.runs_dir == "s3://bucket/runs"
    assert jobs_api.runtime_env(in_bucket, tmp_path)["excludes"] == jobs_api.EXCLUDES


def test_generation_ran_on_both_nodes(ray_cluster, submitted):
    _, _, nodes = ray_cluster
    run_dir = submitted[3]
    metrics = read_manifest(run_dir / "generate")["metrics"]
    by_node = metrics["samples_by_node"]
    assert set(by_node) == set(nodes.values())
    assert all(count > 0 for count in by_node.values())
    assert metrics["replicas"] == 2 and metrics["replica_devices"] == ["cpu"]


def test_every_training_stage_ran_a_worker_on_each_node(ray_cluster, submitted):
    _, _, nodes = ray_cluster
    run_dir = submitted[3]
    for stage in TRAINING_STAGES:
        metrics = read_manifest(run_dir / stage)["metrics"]
        assert metrics["workers"] == 2, stage
        assert sorted(metrics["worker_nodes"]) == sorted(nodes.values()), stage
