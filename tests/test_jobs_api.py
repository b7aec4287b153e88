"""`retrikt submit`, `status`, `logs`, `stop`, `jobs` against a real Ray head started here (loopback
only, token authentication on), running a tiny job on tiny models; and what a submission uploads."""

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
from ray._private.runtime_env.packaging import create_package
from test_stages import tiny_spec
from typer.testing import CliRunner

from retrikt_ray import jobs_api
from retrikt_ray.artifacts import read_manifest
from retrikt_ray.cli import app
from retrikt_ray.config import dump_spec
from retrikt_ray.pipeline import STAGE_NAMES

REPO = Path(__file__).resolve().parents[1]
UPLOAD_LIMIT = 100 * 1024 * 1024
NO_MODELS = {"teacher": "unused/teacher", "student": "unused/student"}  # for tests that run nothing


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def cli(*args, env=None):
    return CliRunner().invoke(app, list(args), env=env)


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


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head on 127.0.0.1 with 2 CPUs and token authentication; yields (dashboard URL, token file)."""
    temp_dir = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))  # short: Ray's socket paths have a length limit
    token_file = temp_dir / "token"
    token_file.write_text(secrets.token_hex(32))
    dashboard_port = free_port()
    worker_ports = 20000 + secrets.randbelow(9000)  # away from the default range a local Ray uses
    env = {
        **{name: value for name, value in os.environ.items() if name not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")},
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_file),
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # the job's `python`
    }
    command = [
        str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--disable-usage-stats",
        "--node-ip-address", "127.0.0.1", "--port", str(free_port()),
        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port), "--include-dashboard", "true",
        "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
        "--ray-client-server-port", str(free_port()), "--metrics-export-port", str(free_port()),
        "--runtime-env-agent-port", str(free_port()),
        "--min-worker-port", str(worker_ports), "--max-worker-port", str(worker_ports + 400),
        "--num-cpus", "2", "--num-gpus", "0", "--object-store-memory", str(300 * 1024 * 1024),
        "--temp-dir", str(temp_dir),
    ]  # fmt: skip
    log = open(temp_dir / "ray-start.log", "w")
    head = subprocess.Popen(command, env=env, cwd=temp_dir, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{dashboard_port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert head.poll() is None, (temp_dir / "ray-start.log").read_text()[-3000:]
            try:
                headers = {"Authorization": f"Bearer {token_file.read_text()}"}
                if requests.get(f"{url}/api/version", headers=headers, timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "the Ray head did not come up in 120 s"
            time.sleep(1)
        yield url, token_file
    finally:
        stop_ray_head(head, temp_dir)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def submitted(ray_head, tiny_models, tmp_path_factory):
    """A tiny SST-2 job submitted with `retrikt submit` and followed to its end with `retrikt logs --follow`."""
    url, token_file = ray_head
    root = tmp_path_factory.mktemp("submit")
    job = root / "tiny.yaml"
    job.write_text(dump_spec(tiny_spec(tiny_models, root / "runs")))
    submitted = cli("submit", str(job), "--address", url, "--token-file", str(token_file))
    assert submitted.exit_code == 0, submitted.output
    job_id = submitted.stdout.strip().splitlines()[-1]
    followed = cli("logs", job_id, "--follow", "--address", url, "--token-file", str(token_file))
    return job_id, submitted, followed, root


def test_submitted_job_runs_the_pipeline_into_the_specs_runs_dir(submitted):
    job_id, submitted_result, followed, root = submitted
    assert followed.exit_code == 0, followed.output[-3000:]
    for stage in STAGE_NAMES:
        assert f"[{stage}]" in followed.stdout
    assert job_id.startswith("raysubmit_")
    (run_dir,) = (root / "runs").iterdir()
    assert f"run directory: {run_dir}" in submitted_result.stderr
    for stage in STAGE_NAMES:
        manifest = read_manifest(run_dir / stage)
        assert manifest["status"] == "done" and manifest["files"], stage
    assert cli("show", str(run_dir)).exit_code == 0


def test_status_jobs_and_stop_of_a_finished_job(submitted, ray_head):
    url, token_file = ray_head
    job_id, _, _, root = submitted
    (run_dir,) = (root / "runs").iterdir()
    status = cli("status", job_id, "--address", url, "--token-file", str(token_file))
    assert status.exit_code == 0
    assert "status   SUCCEEDED" in status.stdout and f"run_dir  {run_dir}" in status.stdout
    listed = cli("jobs", "--address", url, "--token-file", str(token_file))
    assert listed.exit_code == 0 and job_id in listed.stdout
    stopped = cli("stop", job_id, "--address", url, "--token-file", str(token_file))
    assert stopped.exit_code == 0 and "had already ended" in stopped.stdout
    assert "[evaluate]" in cli("logs", job_id, "--address", url, "--token-file", str(token_file)).stdout


def test_address_from_ray_address_and_an_explicit_address_wins(ray_head, monkeypatch):
    url, token_file = ray_head
    listed = cli("jobs", "--token-file", str(token_file), env={"RAY_ADDRESS": url})
    assert listed.exit_code == 0, listed.output
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:1")
    jobs_api.list_jobs(url, token_file)  # RAY_ADDRESS names a dead port: the explicit address is used
    with pytest.raises(jobs_api.JobsError, match="127.0.0.1:1"):
        jobs_api.list_jobs(None, token_file)


def test_stop_a_running_job(ray_head, tiny_models, tmp_path):
    url, token_file = ray_head
    job_id, _ = jobs_api.submit(tiny_spec(tiny_models, tmp_path / "runs"), url, token_file)
    assert jobs_api.stop(job_id, url, token_file)
    assert jobs_api.wait(job_id, url, token_file, timeout_s=120)["status"] == "STOPPED"


def test_wrong_token_and_unknown_job_are_one_line_errors(ray_head, tmp_path):
    url, token_file = ray_head
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
    assert not [name for name in names if name.split("/")[0] in (".git", ".venv", "runs", ".pytest_cache") or "__pycache__" in name]


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
    assert jobs_api.runtime_env(in_bucket, REPO)["excludes"] == jobs_api.EXCLUDES
