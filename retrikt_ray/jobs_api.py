"""Pipeline runs on a Ray cluster through Ray's Job Submission API (`retrikt submit`, `status`, `logs`,
`stop`, `jobs`).

A submitted job uploads this checkout as its working directory (without version control, virtual
environments, run directories and caches) and carries the job spec in an environment variable; on
the cluster its entrypoint writes the spec to a file and runs `python cli.py run` on it, connected to
that cluster. Run directories go to the spec's `storage.runs_dir` (a relative path made absolute
here, a URI as given), so on a shared filesystem, a cluster on this machine or an object store
`retrikt show` and `retrikt serve` read them.

The cluster is the `address` given, else RAY_API_SERVER_ADDRESS or RAY_ADDRESS, else a local Ray.
Its token is the file given (or the spec's `resources.auth_token_file`), else Ray's own; it is sent
whenever one is found, since a cluster without token authentication ignores it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

from .artifacts import is_uri, run_location
from .config import JobSpec, SpecError, dump_spec

# Never uploaded. Ray adds .git, .venv, venv and __pycache__ itself unless RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES
# changes that list; they are named here too so the upload's size never depends on it.
EXCLUDES = [
    ".git",
    ".venv",
    "venv",
    "runs",
    ".cache",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    "*.egg-info",
    "build",
]
JOB_ENV = "RETRIKT_JOB_YAML"
JOB_FILE = "retrikt-job.yaml"
ENTRYPOINT = f'printf "%s" "${JOB_ENV}" > {JOB_FILE} && python cli.py run {JOB_FILE}'
ADDRESS_ENV = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class JobsError(SpecError):
    """The cluster cannot be reached, refuses the token, or does not know the job; one line."""


def checkout_root() -> Path:
    """The checkout this package runs from: what a submitted job uploads."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "cli.py").is_file():
        raise JobsError(f"{root}: not a retrikt checkout (no cli.py): submit from a clone of the repository")
    return root


def read_token(token_file: str | os.PathLike | None) -> str | None:
    """The cluster's token: the file's content, else Ray's (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)."""
    if token_file is not None:
        path = Path(token_file).expanduser()
        if not path.is_file():
            raise JobsError(f"{token_file}: token file not found")
        return path.read_text().strip() or None
    from ray._raylet import AuthenticationTokenLoader

    loader = AuthenticationTokenLoader.instance()
    return loader.get_raw_token(ignore_auth_mode=True) if loader.has_token(ignore_auth_mode=True) else None


@contextlib.contextmanager
def _one_line_errors(address: str | None):
    """Ray's connection, authentication and unknown-job errors as one JobsError line."""
    from ray.exceptions import AuthenticationError

    where = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or "the local Ray"
    try:
        yield
    except AuthenticationError as error:
        raise JobsError(f"{where}: {str(error).splitlines()[0]}") from None
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise JobsError(f"{where}: {' '.join(str(error).split())}") from None


def _client(address: str | None, token_file: str | os.PathLike | None):
    """A JobSubmissionClient for the cluster; an explicit address wins over RAY_ADDRESS (Ray's client does the
    opposite)."""
    from ray.job_submission import JobSubmissionClient

    token = read_token(token_file)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    saved = {name: os.environ.pop(name) for name in ADDRESS_ENV if address and name in os.environ}
    try:
        with _one_line_errors(address):
            return JobSubmissionClient(address, headers=headers)
    finally:
        os.environ.update(saved)


def carried_spec(spec: JobSpec) -> JobSpec:
    """The spec as the cluster runs it: on that cluster's Ray, with a relative runs_dir made absolute here.

    Everything else stays as given (so the run directory's name is the one a local run would have):
    data files and model folders must be readable at the same paths on the cluster.
    """
    carried = spec.model_copy(deep=True)
    carried.resources.address = "auto"
    runs_dir = Path(spec.storage.runs_dir)
    if not is_uri(spec.storage.runs_dir) and not runs_dir.is_absolute() and not spec.storage.runs_dir.startswith("~"):
        carried.storage.runs_dir = str(runs_dir.resolve())
    return carried


def git_excludes(root: Path) -> list[str]:
    """The checkout's own ignore patterns in `.git/info/exclude`, which Ray's upload (it reads .gitignore files)
    does not see."""
    exclude_file = Path(root) / ".git" / "info" / "exclude"
    if not exclude_file.is_file():
        return []
    lines = (line.strip() for line in exclude_file.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def runtime_env(spec: JobSpec, root: Path) -> dict:
    """The checkout as working directory, without what never belongs in an upload or git ignores, and the job spec."""
    excludes = EXCLUDES + git_excludes(root)
    runs_dir = Path(spec.storage.runs_dir).expanduser()
    if not is_uri(spec.storage.runs_dir) and runs_dir.is_relative_to(root):
        excludes.append("/" + runs_dir.relative_to(root).as_posix())
    return {"working_dir": str(root), "excludes": excludes, "env_vars": {JOB_ENV: dump_spec(spec)}}


def submit(spec: JobSpec, address: str | None = None, token_file: str | os.PathLike | None = None) -> tuple[str, str]:
    """Submit the pipeline of a job spec; returns the job id and where the run will be (a path or a URI)."""
    root = checkout_root()
    carried = carried_spec(spec)
    run_dir = run_location(carried)
    client = _client(address, token_file or spec.resources.auth_token_file)
    with _one_line_errors(address):
        job_id = client.submit_job(
            entrypoint=ENTRYPOINT,
            runtime_env=runtime_env(carried, root),
            metadata={"retrikt_job": spec.name, "run_dir": run_dir},
        )
    return job_id, run_dir


def _row(details) -> dict:
    metadata = details.metadata or {}
    return {
        "job_id": details.submission_id or details.job_id,
        "status": str(details.status.value),
        "job": metadata.get("retrikt_job", ""),
        "run_dir": metadata.get("run_dir", ""),
        "message": details.message or "",
        "start_time": details.start_time,
        "end_time": details.end_time,
    }


def status(job_id: str, address: str | None = None, token_file: str | os.PathLike | None = None) -> dict:
    """A job's status, message, job name and run directory."""
    client = _client(address, token_file)
    with _one_line_errors(address):
        return _row(client.get_job_info(job_id))


def list_jobs(address: str | None = None, token_file: str | os.PathLike | None = None) -> list[dict]:
    """Every job the cluster knows, oldest first."""
    client = _client(address, token_file)
    with _one_line_errors(address):
        rows = [_row(details) for details in client.list_jobs()]
    return sorted(rows, key=lambda row: row["start_time"] or 0)


def logs(job_id: str, address: str | None = None, token_file: str | os.PathLike | None = None) -> str:
    """Everything the job's driver has printed so far."""
    client = _client(address, token_file)
    with _one_line_errors(address):
        return client.get_job_logs(job_id)


def follow_logs(job_id: str, address: str | None = None, token_file: str | os.PathLike | None = None) -> Iterator[str]:
    """The job's output as it comes, from the start until the job ends."""
    client = _client(address, token_file)
    with _one_line_errors(address):
        client.get_job_info(job_id)  # an unknown id fails here, as one line
        chunks = client.tail_job_logs(job_id)
        loop = asyncio.new_event_loop()
        try:
            while True:
                try:
                    yield loop.run_until_complete(anext(chunks))
                except StopAsyncIteration:
                    return
        finally:
            loop.run_until_complete(chunks.aclose())
            loop.close()


def stop(job_id: str, address: str | None = None, token_file: str | os.PathLike | None = None) -> bool:
    """Ask a job to stop; False when it had already ended."""
    client = _client(address, token_file)
    with _one_line_errors(address):
        return client.stop_job(job_id)


def wait(
    job_id: str,
    address: str | None = None,
    token_file: str | os.PathLike | None = None,
    timeout_s: float = 600,
    poll_s: float = 2,
) -> dict:
    """Poll until the job ends (SUCCEEDED, FAILED or STOPPED); its final status."""
    deadline = time.monotonic() + timeout_s
    while True:
        row = status(job_id, address, token_file)
        if row["status"] in TERMINAL:
            return row
        if time.monotonic() > deadline:
            raise JobsError(f"{job_id}: still {row['status']} after {timeout_s:.0f}s")
        time.sleep(poll_s)
