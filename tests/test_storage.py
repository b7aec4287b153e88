"""A runs_dir given as a filesystem URI, through pyarrow.fs with a file:// URI (the code path s3:// and
gs:// take): stages run in a local staging copy and are uploaded when done; a machine with an empty
cache fetches finished stages instead of redoing them; `retrikt show`, `predict` and `serve` take the
run's URI."""

import json
from pathlib import Path

import pytest
import yaml
from helpers import cli, reuse_shared_run, run_logged

from retrikt_ray.artifacts import read_manifest, run_dir_for, run_location
from retrikt_ray.config import dump_spec
from retrikt_ray.pipeline import STAGE_NAMES


def remote_path(spec) -> Path:
    """The folder a file:// run location names."""
    return Path(run_location(spec).removeprefix("file://"))


@pytest.fixture(scope="module")
def uri_run(sst2_run, tmp_path_factory):
    """The shared tiny run reused into a run at a file:// URI: every stage lands in the staging copy and is uploaded."""
    root = tmp_path_factory.mktemp("storage")
    spec = reuse_shared_run(sst2_run, (root / "bucket" / "runs").as_uri(), cache_dir=str(root / "cache"))
    _, lines = run_logged(spec)
    return spec, lines, root


def test_every_finished_stage_is_uploaded_whole(uri_run):
    spec, lines, root = uri_run
    staging = run_dir_for(spec)
    assert staging.is_relative_to(root / "cache") and run_location(spec).startswith("file://")
    remote = remote_path(spec)
    assert yaml.safe_load((remote / "job.yaml").read_text()) == yaml.safe_load(dump_spec(spec))
    for stage in STAGE_NAMES:
        assert f"[{stage}] uploaded to {run_location(spec)}/{stage}" in lines
        uploaded = read_manifest(remote / stage)
        assert uploaded == read_manifest(staging / stage) and uploaded["status"] == "done"
        for name in uploaded["files"]:
            assert (remote / stage / name).read_bytes() == (staging / stage / name).read_bytes(), (stage, name)


def test_an_empty_cache_fetches_finished_stages_and_redoes_only_the_unfinished(uri_run, tmp_path):
    spec, _, _ = uri_run
    remote = remote_path(spec)
    (remote / "evaluate" / "manifest.json").unlink()  # as if the upload had stopped before the manifest
    fresh = spec.model_copy(deep=True)
    fresh.storage.cache_dir = str(tmp_path / "other-machine")
    _, lines = run_logged(fresh)
    fetched = [f"[{stage}] finished at {run_location(spec)}, fetched" for stage in STAGE_NAMES[:-1]]
    assert lines[: len(fetched)] == fetched
    assert [line for line in lines if line.startswith("[evaluate]")][
        -1
    ] == f"[evaluate] uploaded to {run_location(spec)}/evaluate"
    assert not [line for line in lines[len(fetched) :] if not line.startswith("[evaluate]") and "skipped" not in line]
    staging = run_dir_for(fresh)
    for stage in STAGE_NAMES[:-1]:
        assert read_manifest(staging / stage)["finished_at"] == read_manifest(remote / stage)["finished_at"]
    assert read_manifest(remote / "evaluate")["status"] == "done"


def test_show_predict_and_serve_take_a_run_uri(uri_run, tmp_path, monkeypatch):
    spec, _, _ = uri_run
    monkeypatch.setenv("HOME", str(tmp_path))  # the default cache_dir (~/.cache/retrikt) receives the fetched run
    location = run_location(spec)
    shown = cli("show", location)
    assert shown.exit_code == 0, shown.output
    for stage in STAGE_NAMES:
        assert stage in shown.stdout
    predicted = cli("predict", location, "a wonderful film", "a dull mess")
    assert predicted.exit_code == 0, predicted.output
    results = [json.loads(line) for line in predicted.stdout.strip().splitlines()]
    assert [result["input"] for result in results] == ["a wonderful film", "a dull mess"]
    config = tmp_path / "serve.yaml"
    assert cli("serve", location, "--config-out", str(config)).exit_code == 0
    fetched = list((tmp_path / ".cache" / "retrikt" / "runs").glob(f"*/{remote_path(spec).name}"))
    assert len(fetched) == 1 and str(fetched[0]) in config.read_text()


def test_a_bad_uri_or_a_uri_without_a_run_is_one_line_error(uri_run, tmp_path):
    spec, _, _ = uri_run
    job = tmp_path / "job.yaml"
    job.write_text(dump_spec(spec))
    bad = cli("run", str(job), "--set", "storage.runs_dir=nosuchfs://bucket/runs")
    assert bad.exit_code == 2 and bad.stderr.startswith("error: storage.runs_dir: nosuchfs://bucket/runs")
    assert len(bad.stderr.strip().splitlines()) == 1
    empty = cli("show", (tmp_path / "nothing").as_uri())
    assert empty.exit_code == 2 and "not a run directory" in empty.stderr
