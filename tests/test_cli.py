"""Commands through the real `retrikt` command line (in-process, on the tests' Ray) that other files drive through
Python: `run --stage` and `--force`, `predict --neighbors` and `tune`, over copies of the shared tiny run; and how
a command's Ray session turns SIGTERM and Ctrl-C into one interrupt (the real commands stopped by SIGTERM:
test_serve.py and test_deepspeed.py)."""

import json
import os
import signal
import time

import pytest
import yaml
from helpers import cli, manifest, reuse_shared_run

from retrikt_ray.artifacts import run_dir_for
from retrikt_ray.config import dump_spec, load_spec
from retrikt_ray.pipeline import STAGE_NAMES
from retrikt_ray.ray_session import STOP_SIGNALS, Interrupted, StopSignals, signal_name
from retrikt_ray.serve import predict_texts


def job_file(spec, folder):
    path = folder / "job.yaml"
    path.write_text(dump_spec(spec))
    return path


def stage_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("[")]


def test_run_one_stage_and_force_it_again(sst2_run, tmp_path):
    """`run` finds every stage in the shared run's copy and reuses it; `--stage store` then finds the store
    finished and skips it; with `--force` it builds the store again (its manifest no longer says reused) and
    touches no other stage; an unknown stage is one line."""
    spec = reuse_shared_run(sst2_run, tmp_path / "runs")
    job = job_file(spec, tmp_path)
    run_dir = run_dir_for(spec)

    first = cli("run", str(job))
    assert first.exit_code == 0, first.output
    assert [line.split("]")[0] + "]" for line in stage_lines(first.stdout)] == [f"[{name}]" for name in STAGE_NAMES]
    assert all(" same inputs as " in line for line in stage_lines(first.stdout))
    reused = manifest(run_dir, "store")
    assert reused["reused_from"]
    others = {name: manifest(run_dir, name) for name in STAGE_NAMES if name != "store"}

    skipped = cli("run", str(job), "--stage", "store")
    assert skipped.exit_code == 0, skipped.output
    assert stage_lines(skipped.stdout) == ["[store] finished earlier, skipped"]

    forced = cli("run", str(job), "--stage", "store", "--force")
    assert forced.exit_code == 0, forced.output
    (line,) = stage_lines(forced.stdout)
    assert line.startswith("[store] ") and "skipped" not in line and "same inputs" not in line
    rebuilt = manifest(run_dir, "store")
    assert "reused_from" not in rebuilt and rebuilt["stage_hash"] == reused["stage_hash"]
    assert rebuilt["counts"] == reused["counts"]
    assert {name: manifest(run_dir, name) for name in others} == others

    unknown = cli("run", str(job), "--stage", "nosuch")
    assert unknown.exit_code == 2
    assert unknown.stderr.strip() == f"error: --stage nosuch: not a stage (one of {', '.join(STAGE_NAMES)})"


def test_predict_prints_each_inputs_neighbors_when_asked(sst2_run):
    spec, run_dir = sst2_run
    texts = ["a warm and funny film", "dull and far too long"]
    result = cli("predict", str(run_dir), *texts, "--neighbors")
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["input"] for line in lines] == texts
    for line, expected in zip(lines, predict_texts(run_dir, texts, neighbors=True)):
        assert line["label"] == expected["label"]
        assert line["probabilities"] == pytest.approx(expected["probabilities"], abs=1e-6)
        assert len(line["neighbors"]) == spec.student.k
        assert [row["id"] for row in line["neighbors"]] == [row["id"] for row in expected["neighbors"]]
        assert [row["weight"] for row in line["neighbors"]] == pytest.approx(
            [row["weight"] for row in expected["neighbors"]], abs=1e-6
        )
    (plain,) = [json.loads(line) for line in cli("predict", str(run_dir), texts[0]).stdout.splitlines()]
    assert "neighbors" not in plain


def test_tune_writes_the_table_and_the_best_job(sst2_run, tmp_path):
    """A one-trial sweep that redoes only `evaluate` (every stage before it is the shared run's)."""
    spec = reuse_shared_run(sst2_run, tmp_path / "runs")
    job = job_file(spec, tmp_path)
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        yaml.safe_dump(
            {
                "num_samples": 1,
                "set": {"evaluate.teacher_zero_shot": False},
                "space": {"evaluate.latency_examples": {"grid": [2]}},
            }
        )
    )
    result = cli("tune", str(job), "--sweep", str(sweep))
    assert result.exit_code == 0, result.output
    assert "| trial | evaluate.latency_examples | evaluate.accuracy_student_store | status |" in result.stdout
    (best_line,) = [line for line in result.stdout.splitlines() if line.startswith("best: ")]
    assert best_line.startswith("best: evaluate.accuracy_student_store ")
    best = load_spec(best_line.split(", ")[1].split(" (")[0])
    assert best.evaluate.latency_examples == 2 and not best.evaluate.teacher_zero_shot
    assert 0 <= manifest(run_dir_for(best), "evaluate")["metrics"]["accuracy_student_store"] <= 1


def signalled(signum: int, stop: StopSignals, wait_s: float = 5.0) -> None:
    """Send this process `signum` while `stop` handles it (never to a process that the signal would end)."""
    assert signal.getsignal(signum) == stop._interrupt
    os.kill(os.getpid(), signum)
    time.sleep(wait_s)  # Python runs the handler in the main thread at its next instruction: an interrupt cuts it


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_sigterm_and_ctrl_c_raise_one_interrupt_that_names_them(signum):
    """Inside a Ray session's StopSignals either signal raises Interrupted (a KeyboardInterrupt, so Ctrl-C's cleanup
    runs) naming it; one that comes once the cleanup has begun is ignored; a plain KeyboardInterrupt that a library
    raised in place of the Interrupted (Ray Train does) comes out as the Interrupted; the handlers before are back."""
    before = {number: signal.getsignal(number) for number in STOP_SIGNALS}
    with pytest.raises(Interrupted) as stopped:
        with StopSignals() as stop:
            signalled(signum, stop)
    assert stopped.value.signum == signum and signal_name(stopped.value) == signal.Signals(signum).name
    assert isinstance(stopped.value, KeyboardInterrupt) and signal_name(KeyboardInterrupt()) == "SIGINT"

    with StopSignals() as stop:
        stop.closing = True
        signalled(signum, stop, wait_s=0.2)  # ignored: nothing raised

    with pytest.raises(Interrupted) as stopped:
        with StopSignals() as stop:
            try:
                signalled(signum, stop)
            except Interrupted:
                raise KeyboardInterrupt from None
    assert stopped.value.signum == signum
    assert {number: signal.getsignal(number) for number in STOP_SIGNALS} == before
