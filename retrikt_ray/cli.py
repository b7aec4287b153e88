"""The `retrikt` command line (Typer). A user mistake prints one line and exits 2, never a traceback."""

from __future__ import annotations

import functools
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from .config import SpecError

app = typer.Typer(
    help="Compress a teacher LLM into a tiny retrieving student (RetriKT) on Ray.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DEFAULT_JOB = Path("jobs/demo.yaml")
RUN_LOG = "run.log"  # in the run directory: what the console leaves out (console.py)
TUNE_LOG = "tune.log"  # in the sweep's folder

JobArg = Annotated[Path | None, typer.Argument(help="Job spec YAML (default: jobs/demo.yaml)")]
SetOpt = Annotated[list[str], typer.Option("--set", help="Override a field: section.field=value (repeatable)")]
VerboseOpt = Annotated[
    bool,
    typer.Option(
        "--verbose",
        help="Also show Ray's, DeepSpeed's and the libraries' own output (else kept in a log file that the run names)",
    ),
]
RunDirArg = Annotated[
    str, typer.Argument(help="A finished run directory (runs/<job>-<hash>), or its URI (s3://..., file://...)")
]


def user_errors(command):
    """Turn user mistakes into one line on stderr and exit code 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from .models import ModelNotFound

        try:
            return command(*args, **kwargs)
        except (SpecError, ModelNotFound) as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(2) from None

    return wrapper


def _load(job: Path | None, overrides: list[str]):
    from .config import load_spec

    return load_spec(job or DEFAULT_JOB, overrides)


@app.command()
@user_errors
def validate(job: JobArg = None, set_: SetOpt = []) -> None:  # noqa: B006 typer's list default, never mutated
    """Check a job spec, its data files (every row) and its model names without running anything."""
    from .pipeline import validate as validate_spec

    typer.echo(f"ok: {validate_spec(_load(job, set_))}")


@app.command()
@user_errors
def run(
    job: JobArg = None,
    set_: SetOpt = [],  # noqa: B006 typer's list default, never mutated
    stage: Annotated[str | None, typer.Option(help="Run only this stage (its inputs must be finished)")] = None,
    force: Annotated[bool, typer.Option(help="Redo stages even if finished")] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Run the pipeline on a local in-process Ray (or resources.address); finished stages are skipped."""
    from .pipeline import run as run_pipeline
    from .pipeline import validate as validate_spec

    spec = _load(job, set_)
    typer.echo(validate_spec(spec))
    from .artifacts import is_uri, run_dir_for, run_location
    from .console import quiet

    try:
        with quiet(run_dir_for(spec) / RUN_LOG, verbose, "retrikt run") as output:
            _say_where_the_log_is(output)
            run_dir = run_pipeline(spec, only=stage, force=force, log=output.echo)
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM (ray_session): Ray is shut down by now
        _say_it_was_stopped(stop)
    typer.echo(
        f"run directory: {run_dir}" + (f" (kept at {run_location(spec)})" if is_uri(spec.storage.runs_dir) else "")
    )
    _print_table(run_dir)
    _say_where_it_is_tracked(spec)


@app.command()
@user_errors
def show(
    location: Annotated[
        str, typer.Argument(help="A run directory (runs/<job>-<hash>), or its URI (s3://..., file://...)")
    ],
) -> None:
    """Print a run's stages, row counts, timings and metrics as a table."""
    run_dir = _local_run(location)
    if not (run_dir / "job.yaml").is_file():
        raise SpecError(f"{run_dir}: not a run directory (no job.yaml)")
    _print_table(run_dir)


@app.command()
@user_errors
def serve(
    run_dir: RunDirArg,
    host: Annotated[str | None, typer.Option(help="Interface to listen on (default: the spec's serve.host)")] = None,
    port: Annotated[int | None, typer.Option(help="HTTP port (default: the spec's serve.port)")] = None,
    address: Annotated[
        str | None, typer.Option(help="Ray cluster to join (default: resources.address, else a local Ray)")
    ] = None,
    config_out: Annotated[
        Path | None, typer.Option(help="Write a Serve config file (serve deploy, RayService) and exit")
    ] = None,
    reload: Annotated[
        bool,
        typer.Option(
            "--reload",
            "--reload-store",
            help="Make the running server load the run's current version (student and store), and exit",
        ),
    ] = False,
) -> None:
    """Serve a run's student + store over HTTP on Ray Serve until Ctrl-C or SIGTERM (API: docs/serving.md)."""
    import yaml

    from . import serve as serving

    run_dir = _local_run(run_dir)
    settings = serving.load_run_spec(run_dir).serve
    host, port = host or settings.host, port or settings.port
    if config_out is not None:
        config_out.write_text(yaml.safe_dump(serving.serve_config(run_dir, host, port), sort_keys=False))
        typer.echo(f"wrote {config_out} (serve deploy {config_out})")
    elif reload:
        reloaded = serving.request_reload(run_dir, host, port)
        typer.echo(
            f"{reloaded['run']}: {reloaded['previous']} -> {reloaded['version']}, store {reloaded['previous_version']}"
            f" -> {reloaded['store_version']} ({reloaded['rows']} rows)"
        )
    else:
        serving.serve_until_interrupted(run_dir, host, port, address, log=typer.echo)


@app.command()
@user_errors
def grow(
    run_dir: RunDirArg,
    texts: Annotated[
        Path | None, typer.Option(help="In-domain inputs in the task's format (jsonl, tsv or csv; labels not needed)")
    ] = None,
    from_traffic: Annotated[
        bool, typer.Option(help="Use the inputs the endpoint captured (serve.capture) instead of --texts")
    ] = False,
    limit: Annotated[int | None, typer.Option(min=1, help="Most texts to add (default: all that qualify)")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the order in which texts are drawn up to --limit")] = 0,
    retrain: Annotated[
        bool, typer.Option(help="Retrain the student on the grown store (--no-retrain: only append rows)")
    ] = True,
    min_words: Annotated[
        int | None, typer.Option(min=1, help="Skip shorter texts (default: the spec's unlabelled.min_words)")
    ] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Label new texts with the teacher and make a new version of the run's model (student + store)."""
    from .console import quiet
    from .grow import describe_version, read_texts
    from .grow import grow as grow_run

    run_dir = _local_run(run_dir)
    candidates, source = read_texts(run_dir, texts, from_traffic)  # a bad file is one line before anything runs
    with quiet(run_dir / RUN_LOG, verbose, "retrikt grow") as output:
        _say_where_the_log_is(output)
        version = grow_run(run_dir, candidates, source, limit, seed, retrain, min_words, log=output.echo)
    typer.echo(describe_version(version))
    typer.echo(f"current version: {version.name}; a running server follows with: retrikt serve {run_dir} --reload")


@app.command()
@user_errors
def versions(run_dir: RunDirArg) -> None:
    """A run's model versions (retrikt grow makes them), with their counts and dev metrics; * marks the current."""
    from .grow import describe_version
    from .versions import all_versions, current_name, load_run_spec

    run_dir = _local_run(run_dir)
    load_run_spec(run_dir)
    chosen = current_name(run_dir)
    for version in all_versions(run_dir):
        typer.echo(f"{'*' if version.name == chosen else ' '} {describe_version(version)}")


@app.command()
@user_errors
def use(
    run_dir: RunDirArg, version: Annotated[str, typer.Argument(help="A version that retrikt versions lists")]
) -> None:
    """Make a version the current one (a rollback); a running server follows on `retrikt serve --reload`."""
    from .versions import load_run_spec
    from .versions import use as use_version

    run_dir = _local_run(run_dir)
    load_run_spec(run_dir)
    use_version(run_dir, version)
    typer.echo(f"current version: {version}; a running server follows with: retrikt serve {run_dir} --reload")


@app.command()
@user_errors
def predict(
    run_dir: RunDirArg,
    inputs: Annotated[list[str], typer.Argument(help="Texts; for a task with several fields, JSON objects of them")],
    neighbors: Annotated[bool, typer.Option(help="Also print the store rows each input retrieved")] = False,
) -> None:
    """Classify inputs locally with a run's student + store (no server); one JSON line per input."""
    import json

    from .serve import predict_texts

    for text, result in zip(inputs, predict_texts(_local_run(run_dir), inputs, neighbors)):
        typer.echo(json.dumps({"input": text, **result}))


AddressOpt = Annotated[
    str | None,
    typer.Option(
        help="The cluster's dashboard, http://HOST:8265 "
        "(default: RAY_API_SERVER_ADDRESS, RAY_ADDRESS, else a local Ray)"
    ),
]
TokenOpt = Annotated[
    Path | None,
    typer.Option(help="File holding the cluster's Ray token (default: resources.auth_token_file, else Ray's own)"),
]
JobIdArg = Annotated[str, typer.Argument(help="A job id (retrikt submit prints it; retrikt jobs lists them)")]


@app.command()
@user_errors
def submit(
    job: JobArg = None,
    set_: SetOpt = [],  # noqa: B006 typer's list default, never mutated
    address: AddressOpt = None,
    token_file: TokenOpt = None,
    follow: Annotated[
        bool, typer.Option(help="Print the job's output until it ends; exit 1 unless it succeeded")
    ] = False,
) -> None:
    """Run the pipeline as a job on a Ray cluster (Job Submission API); prints the job id."""
    from . import jobs_api
    from .pipeline import validate as validate_spec

    spec = _load(job, set_)
    typer.echo(validate_spec(spec), err=True)
    job_id, run_dir = jobs_api.submit(spec, address, token_file)
    typer.echo(f"run directory: {run_dir}", err=True)
    typer.echo(job_id)
    if follow:
        _follow(job_id, address, token_file)


@app.command()
@user_errors
def status(job_id: JobIdArg, address: AddressOpt = None, token_file: TokenOpt = None) -> None:
    """A submitted job's status, message and run directory."""
    from .jobs_api import status as job_status

    row = job_status(job_id, address, token_file)
    for key in ("job_id", "status", "job", "run_dir", "message"):
        typer.echo(f"{key:8} {row[key]}")


@app.command()
@user_errors
def logs(
    job_id: JobIdArg,
    address: AddressOpt = None,
    token_file: TokenOpt = None,
    follow: Annotated[bool, typer.Option(help="Keep printing until the job ends; exit 1 unless it succeeded")] = False,
) -> None:
    """A submitted job's output (what `retrikt run` prints)."""
    from . import jobs_api

    if follow:
        _follow(job_id, address, token_file)
    else:
        typer.echo(jobs_api.logs(job_id, address, token_file), nl=False)


@app.command()
@user_errors
def stop(job_id: JobIdArg, address: AddressOpt = None, token_file: TokenOpt = None) -> None:
    """Stop a submitted job; finished stages stay finished, and a later run resumes after them."""
    from .jobs_api import stop as stop_job

    typer.echo(f"{job_id}: stopping" if stop_job(job_id, address, token_file) else f"{job_id}: had already ended")


@app.command()
@user_errors
def jobs(address: AddressOpt = None, token_file: TokenOpt = None) -> None:
    """Every job on the cluster, oldest first."""
    import time

    from rich.console import Console
    from rich.table import Table

    from .jobs_api import list_jobs

    table = Table()
    for column in ("job id", "status", "job", "started", "run directory"):
        table.add_column(column, overflow="fold")
    for row in list_jobs(address, token_file):
        started = (
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["start_time"] / 1000)) if row["start_time"] else ""
        )
        table.add_row(row["job_id"], row["status"], row["job"], started, row["run_dir"])
    Console(width=max(120, Console().width)).print(table)


@app.command()
@user_errors
def tune(
    job: JobArg = None,
    sweep: Annotated[
        Path, typer.Option(help="Sweep file: metric, search space, search, scheduler (jobs/sweeps/)")
    ] = ...,
    set_: SetOpt = [],  # noqa: B006 typer's list default, never mutated
    verbose: VerboseOpt = False,
) -> None:
    """Sweep job fields with Ray Tune; writes a results table, a plot and the best trial as a job spec."""
    from . import tune as tuning
    from .console import quiet
    from .pipeline import validate as validate_spec

    spec = _load(job, set_)
    settings = tuning.load_sweep(sweep)
    typer.echo(validate_spec(spec))
    folder = tuning.sweep_dir_for(tuning.sweep_job(spec, settings), settings)
    try:
        with quiet(folder / TUNE_LOG, verbose, "retrikt tune") as output:
            _say_where_the_log_is(output)
            outcome = tuning.tune_job(spec, settings, log=output.echo)
    except KeyboardInterrupt as stop:  # SIGTERM too (ray_session); Tune answers a Ctrl-C during its trials itself
        _say_it_was_stopped(stop)
    typer.echo((outcome["dir"] / "results.md").read_text())
    if outcome["best"] is None:
        typer.echo(f"error: no trial finished; see {outcome['dir']}", err=True)
        raise typer.Exit(1)
    typer.echo(
        f"best: {settings.metric} {outcome['best'][settings.metric]:.4f}, {outcome['dir'] / 'best.yaml'} "
        f"({outcome['best']['run_dir']})"
    )
    _say_where_it_is_tracked(tuning.sweep_job(spec, settings))


def _say_where_the_log_is(output) -> None:
    if output.log_path is not None:
        output.echo(f"log: {output.log_path} (Ray's, DeepSpeed's and the libraries' own output; --verbose shows it)")


def _say_it_was_stopped(stop: KeyboardInterrupt) -> None:
    """One line on stderr and the shell's exit code for the signal (130 SIGINT, 143 SIGTERM)."""
    from .ray_session import signal_name

    name = signal_name(stop)
    typer.echo(f"error: stopped by {name}; finished stages are kept, and running it again resumes", err=True)
    raise typer.Exit(128 + getattr(signal, name))


def _say_where_it_is_tracked(spec) -> None:
    from .tracking import where

    line = where(spec)
    if line is not None:
        typer.echo(line)


def _follow(job_id: str, address: str | None, token_file: Path | None) -> None:
    """Print a job's output as it comes, then its end; exit 1 unless it succeeded."""
    from . import jobs_api

    for chunk in jobs_api.follow_logs(job_id, address, token_file):
        typer.echo(chunk, nl=False)
    final = jobs_api.wait(job_id, address, token_file)
    typer.echo(f"{job_id}: {final['status']} {final['message']}".rstrip(), err=True)
    if final["status"] != "SUCCEEDED":
        raise typer.Exit(1)


def _local_run(location: str) -> Path:
    """A run directory here: a path as given, or a run at a URI fetched into the default cache's staging copy."""
    from .artifacts import local_run_dir
    from .config import StorageSpec

    return local_run_dir(location, StorageSpec().cache_dir)


def _print_table(run_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    from .pipeline import stage_status

    table = Table(title=str(run_dir))
    for column in ("stage", "status", "seconds", "rows", "summary"):
        table.add_column(column, overflow="fold")
    for manifest in stage_status(run_dir):
        counts = manifest.get("counts", {})
        rows = ", ".join(f"{key} {value}" for key, value in counts.items())
        seconds = manifest.get("seconds")
        status = manifest["status"] + (" (reused)" if manifest.get("reused_from") else "")
        table.add_row(
            manifest["stage"], status, "" if seconds is None else f"{seconds:.1f}", rows, manifest.get("summary", "")
        )
    Console(width=max(120, Console().width)).print(table)


def main() -> None:
    app(prog_name="retrikt")


if __name__ == "__main__":
    sys.exit(main())
