"""`retrikt grow`, `versions` and `use` on a copy of the shared tiny run (the real pipeline on 2-layer models), a
grow killed by SIGKILL and rerun, traffic capture, and a served swap of student + store under load."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import requests
from helpers import cli, reuse_shared_run, run_logged

from retrikt_ray import versions
from retrikt_ray.artifacts import file_digest
from retrikt_ray.capture import TrafficWriter, read_traffic, traffic_summary
from retrikt_ray.config import CaptureSpec, ServeSpec, dump_spec
from retrikt_ray.knowledge_store import KnowledgeStore
from retrikt_ray.retrieval_student import RetrievalStudent, encoder_fingerprint
from retrikt_ray.tasks import Task, load_few_shot

REPO = Path(__file__).resolve().parents[1]
TOKEN = "grow-token-5c1e"


def sst2_texts(spec, count: int) -> list[str]:
    """SST-2 training sentences of 4+ words that are neither labelled examples nor dev rows."""
    task, few_shot = load_few_shot(spec)
    dev = {example.fields["sentence"].lower() for example in task.load(task_files(spec)[1])}
    labelled = {example.fields["sentence"].lower() for example in few_shot}
    chosen, seen = [], set()
    for example in task.load(task_files(spec)[0]):
        text = example.fields["sentence"]
        key = text.lower()
        if len(text.split()) >= 4 and key not in dev and key not in labelled and key not in seen:
            seen.add(key)
            chosen.append(text)
        if len(chosen) == count:
            break
    return chosen


def task_files(spec):
    from retrikt_ray.tasks import data_files

    return data_files(spec, Task.from_spec(spec.task))


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"sentence": text}) + "\n" for text in texts))
    return path


@pytest.fixture(scope="module")
def run_copy(sst2_run, tmp_path_factory):
    """A run of its own, every stage reused from the shared tiny run."""
    spec = reuse_shared_run(sst2_run, tmp_path_factory.mktemp("grow") / "runs")
    run_dir, _ = run_logged(spec)
    return spec, run_dir


def fingerprint_of(model_dir: Path) -> str:
    return encoder_fingerprint(RetrievalStudent.load(model_dir).encoder)


def test_grow_adds_counted_rows_as_a_new_version_with_lineage_and_rollback(run_copy, tmp_path):
    spec, run_dir = run_copy
    task, few_shot = load_few_shot(spec)
    fresh = sst2_texts(spec, 30)
    dev_text = task.load(task_files(spec)[1])[0].fields["sentence"]
    store = KnowledgeStore.load(run_dir / "store")
    texts = [
        *fresh,
        fresh[0],
        fresh[1].upper(),  # repeats, case aside
        dev_text,
        few_shot[0].fields["sentence"],
        "too short",
        store.inputs[0][0],  # a row the store already holds
    ]
    path = write_jsonl(tmp_path / "texts.jsonl", texts)

    result = cli("grow", str(run_dir), "--texts", str(path), "--limit", "12", "--min-words", "3")
    assert result.exit_code == 0, result.output
    assert "current version: v1" in result.output
    v1 = versions.get(run_dir, "v1")
    counts = v1.record["counts"]
    assert counts["texts_read"] == len(texts) and counts["texts_added"] == 12 and counts["rows_added"] == 12
    assert counts["skipped_duplicate"] == 2 and counts["skipped_in_dev_set"] == 1
    assert counts["skipped_labelled_example"] == 1 and counts["skipped_too_short"] == 1
    assert counts["skipped_in_store"] == 1
    assert counts.get("skipped_near_duplicate_of_store", 0) + counts.get("skipped_not_drawn", 0) == 30 - 12
    # The new version's store: the parent's training rows plus the new ones, keyed by its own (retrained) student.
    parent_rows = len(KnowledgeStore.load(run_dir / "store"))
    grown_store = KnowledgeStore.load(v1.store_dir)
    assert len(grown_store) == len(KnowledgeStore.load(v1.train_store_dir)) == parent_rows + 12
    assert grown_store.encoder_fingerprint == fingerprint_of(v1.model_dir) != fingerprint_of(run_dir / "student/model")
    added = {text for text, _ in grown_store.inputs[parent_rows:]}
    assert added <= set(fresh) and len(added) == 12
    assert v1.record["parent"] == "v0" and v1.record["retrained"] is True
    assert v1.record["source"] == {"kind": "file", "path": str(path.resolve()), "digest": file_digest(path), "rows": 36}
    evaluation = v1.record["evaluation"]
    predictions = pd.read_parquet(v1.predictions)
    assert evaluation["accuracy_student_store"] == pytest.approx(
        (predictions["predicted"] == predictions["gold"]).mean()
    )
    assert evaluation["against_parent"]["version"] == "v0" and 0 <= evaluation["against_parent"]["p_value"] <= 1
    assert versions.current_name(run_dir) == "v1"
    assert not list(versions.versions_dir(run_dir).glob(".grow-*")), "the work folder is removed once published"

    listed = cli("versions", str(run_dir))
    assert listed.exit_code == 0 and listed.output.splitlines()[1].startswith("* v1, from v0 +12 texts, retrained")
    assert cli("use", str(run_dir), "v0").exit_code == 0 and versions.current_name(run_dir) == "v0"
    assert "no version 'v7'" in cli("use", str(run_dir), "v7").output
    again = cli("grow", str(run_dir), "--texts", str(path), "--limit", "12", "--min-words", "3")
    assert again.exit_code == 0 and "already grown" in again.output
    assert [version.name for version in versions.all_versions(run_dir)] == ["v0", "v1"]
    assert versions.current_name(run_dir) == "v1"

    # Without retraining: the same student, its store plus the new rows under that student's keys.
    more = write_jsonl(tmp_path / "more.jsonl", sst2_texts(spec, 40)[30:])
    appended = cli("grow", str(run_dir), "--texts", str(more), "--no-retrain", "--min-words", "3")
    assert appended.exit_code == 0, appended.output
    v2 = versions.get(run_dir, "v2")
    assert v2.record["parent"] == "v1" and v2.record["retrained"] is False
    assert fingerprint_of(v2.model_dir) == fingerprint_of(v1.model_dir)
    rows = v2.record["counts"]["rows_added"]
    assert len(KnowledgeStore.load(v2.store_dir)) == len(grown_store) + rows and rows > 0
    assert KnowledgeStore.load(v2.store_dir).encoder_fingerprint == grown_store.encoder_fingerprint
    assert cli("use", str(run_dir), "v0").exit_code == 0  # the next tests serve the original


def test_a_bad_texts_file_is_one_line_naming_path_and_line(run_copy, tmp_path):
    _, run_dir = run_copy
    path = tmp_path / "bad.jsonl"
    path.write_text('{"sentence": "a fine film"}\n{"sentence": "broken\n')
    result = cli("grow", str(run_dir), "--texts", str(path))
    assert result.exit_code == 2
    assert result.output.startswith(f"error: {path}:2:") and len(result.output.strip().splitlines()) == 1
    assert "--texts FILE or --from-traffic" in cli("grow", str(run_dir)).output


def test_a_killed_grow_leaves_the_served_version_and_the_rerun_adds_exactly_its_rows(sst2_run, tmp_path):
    spec = reuse_shared_run(sst2_run, tmp_path / "runs")
    run_dir, _ = run_logged(spec)
    path = write_jsonl(tmp_path / "texts.jsonl", sst2_texts(spec, 20))
    command = [sys.executable, "cli.py", "grow", str(run_dir), "--texts", str(path), "--min-words", "3"]
    first = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 300
        # Killed while the student retrains: the labelling is saved, the version is not.
        while first.poll() is None and time.monotonic() < deadline:
            if list(versions.versions_dir(run_dir).glob(".grow-*/student/_ray_train")):
                break
            time.sleep(0.1)
        assert first.poll() is None, first.stdout.read().decode()[-3000:]
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert [version.name for version in versions.all_versions(run_dir)] == ["v0"]
    assert versions.current_name(run_dir) == "v0"
    assert list(versions.versions_dir(run_dir).glob(".labels-*/annotation_shards/*.parquet"))

    second = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    v1 = versions.get(run_dir, "v1")
    added = v1.record["counts"]["rows_added"]
    assert added == 20 - v1.record["counts"].get("skipped_near_duplicate_of_store", 0) > 0
    store = KnowledgeStore.load(v1.store_dir)
    assert len(store) == len(KnowledgeStore.load(run_dir / "store")) + added
    assert len({text for text, _ in store.inputs[-added:]}) == added  # none twice


def test_capture_is_bounded_filters_by_confidence_and_counts_what_it_drops(tmp_path):
    writer = TrafficWriter(tmp_path, max_rows=5, max_confidence=0.9)
    assert writer.append([{"sentence": "sure"}], ["positive"], [0.95], "v0") == 0
    for batch in range(4):
        fields = [{"sentence": f"text {batch}-{i}"} for i in range(2)]
        assert writer.append(fields, ["negative", "positive"], [0.6, 0.7], "v0") == 2
    fields, _ = read_traffic(tmp_path)
    assert [row["sentence"] for row in fields] == ["text 1-1", "text 2-0", "text 2-1", "text 3-0", "text 3-1"]
    assert traffic_summary(tmp_path) == {"rows": 5, "dropped": 3, "files": 3}
    assert CaptureSpec().enabled is False and ServeSpec().capture.enabled is False


def test_served_swap_of_student_and_store_under_load_and_capture(run_copy):
    """Clients classify while `use` + reload swap v0 for v1 (another student and store): no request fails, every
    answer names its version, later ones v1. The captured traffic holds the inputs, never the token."""
    from ray import serve
    from test_serve import free_port

    from retrikt_ray.serve import request_reload, start

    spec, run_dir = run_copy
    assert versions.current_name(run_dir) == "v0" and versions.get(run_dir, "v1")
    job = run_dir / "job.yaml"
    original = job.read_text()
    token_file = run_dir.parent / "token"
    token_file.write_text(TOKEN)
    settings = {**spec.serve.model_dump(), "min_replicas": 2, "max_replicas": 2, "num_cpus": 0.5}
    settings |= {"token_file": str(token_file), "capture": {"enabled": True, "max_rows": 10_000}}
    spec.serve = ServeSpec(**settings)
    job.write_text(dump_spec(spec))
    port = free_port()
    url = start(run_dir, "127.0.0.1", port)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    answers, stop = [], threading.Event()

    def client(number):
        session = requests.Session()
        while not stop.is_set():
            sent = time.monotonic()
            try:
                answer = session.post(
                    f"{url}/v1/classify", json={"inputs": [f"film number {number}"]}, headers=headers, timeout=60
                )
                answers.append((sent, answer.status_code, answer.json().get("version")))
            except requests.RequestException as error:
                answers.append((sent, type(error).__name__, None))

    threads = [threading.Thread(target=client, args=(number,)) for number in range(4)]
    try:
        for thread in threads:
            thread.start()
        while sum(1 for _, status, _ in answers if status == 200) < 8:
            time.sleep(0.05)
        versions.use(run_dir, "v1")
        reloaded = request_reload(run_dir, "127.0.0.1", port)
        after = time.monotonic()
        while sum(1 for sent, _, _ in answers if sent > after) < 8:
            time.sleep(0.05)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        serve.shutdown()
        versions.use(run_dir, "v0")
        job.write_text(original)
    assert reloaded["previous"] == "v0" and reloaded["version"] == "v1"
    assert reloaded["rows"] == len(KnowledgeStore.load(versions.get(run_dir, "v1").store_dir))
    assert all(status == 200 for _, status, _ in answers), {status for _, status, _ in answers}
    assert {version for _, _, version in answers} <= {"v0", "v1"}
    assert {version for sent, _, version in answers if sent > after} == {"v1"}
    fields, _ = read_traffic(run_dir)
    assert len(fields) == len(answers) and {row["sentence"] for row in fields} <= {f"film number {n}" for n in range(4)}
    for path in (run_dir / "traffic").rglob("*"):
        assert TOKEN.encode() not in path.read_bytes()

    # The captured inputs become a version of their own (store rows only, so the test stays short).
    grown = cli("grow", str(run_dir), "--from-traffic", "--no-retrain", "--min-words", "1")
    assert grown.exit_code == 0, grown.output
    version = versions.get(run_dir, versions.current_name(run_dir))
    assert version.record["source"]["kind"] == "traffic" and version.record["source"]["rows"] == len(fields)
    counts = version.record["counts"]
    assert counts["skipped_duplicate"] == len(fields) - 4
    assert counts["texts_added"] + counts.get("skipped_near_duplicate_of_store", 0) == 4
    versions.use(run_dir, "v0")
