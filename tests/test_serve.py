"""Serving: the real Ray Serve application on 127.0.0.1 in the test process, over a finished tiny run
(the real pipeline on 2-layer models), plus `retrikt serve` / `retrikt predict` through the CLI."""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests
import yaml
from helpers import cli, process_tree, reuse_shared_run, run_logged, still_running

from retrikt_ray.config import ServeSpec, SpecError, TaskSpec
from retrikt_ray.knowledge_store import KnowledgeStore
from retrikt_ray.retrieval_student import RetrievalStudent
from retrikt_ray.serve import (
    APP_NAME,
    INGRESS,
    STUDENT_STORE,
    ClassifyRequest,
    InputError,
    build_app,
    check_exposure,
    max_body_bytes,
    parse_inputs,
    predict_texts,
    request_reload,
    start,
    store_folder,
)
from retrikt_ray.tasks import Task, load_dev

REPO = Path(__file__).resolve().parents[1]
TOKEN = "test-token-7f3a"
SERVE = {
    "max_inputs_per_request": 8,
    "max_chars_per_input": 300,
    "batch_max_size": 8,
    "max_ongoing_requests": 16,
    "min_replicas": 2,
    "max_replicas": 3,
    "target_ongoing_requests": 4.0,
    "num_cpus": 0.5,
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def retrikt(*args, env=None):
    return subprocess.run(
        [sys.executable, "cli.py", *args], cwd=REPO, capture_output=True, text=True, timeout=300, env=env
    )


@pytest.fixture(scope="module")
def served(sst2_run, tmp_path_factory):
    """The shared tiny SST-2 run (reused into a run of its own), served on 127.0.0.1 with a token;
    yields (spec, run_dir, url, port)."""
    from ray import serve

    root = tmp_path_factory.mktemp("serve")
    (root / "token").write_text(TOKEN + "\n")
    spec = reuse_shared_run(sst2_run, root / "runs")
    spec.serve = ServeSpec(**{**SERVE, "token_file": str(root / "token")})
    run_dir, _ = run_logged(spec)
    port = free_port()
    url = start(run_dir, "127.0.0.1", port)
    yield spec, run_dir, url, port
    serve.shutdown()


def post(url, body, session=requests):
    return session.post(f"{url}/v1/classify", json=body, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)


def assert_still_answers(url):
    assert requests.get(f"{url}/healthz", timeout=30).status_code == 200
    answer = post(url, {"inputs": ["a fine film"]})
    assert answer.status_code == 200 and len(answer.json()["results"]) == 1


def test_served_predictions_equal_evaluation(served):
    spec, run_dir, url, _ = served
    _, dev = load_dev(spec)
    evaluated = pd.read_parquet(run_dir / "evaluate" / "predictions.parquet")
    results = []
    for start_at in range(0, len(dev), 8):
        answer = post(url, {"inputs": [example.fields["sentence"] for example in dev[start_at : start_at + 8]]})
        assert answer.status_code == 200, answer.text
        results += answer.json()["results"]
    served_p = np.array([list(result["probabilities"].values()) for result in results])
    assert np.allclose(served_p, np.stack(evaluated["p"].to_numpy()), atol=1e-5)
    assert [result["label"] for result in results] == [
        Task.from_spec(spec.task).label_names[i] for i in evaluated["predicted"]
    ]


def test_predict_locally_equals_evaluation(served):
    spec, run_dir, _, _ = served
    _, dev = load_dev(spec)
    evaluated = pd.read_parquet(run_dir / "evaluate" / "predictions.parquet")
    results = predict_texts(run_dir, [example.fields["sentence"] for example in dev])
    assert np.allclose(
        [list(result["probabilities"].values()) for result in results], np.stack(evaluated["p"].to_numpy()), atol=1e-5
    )

    cli = retrikt("predict", str(run_dir), dev[0].fields["sentence"], dev[1].fields["sentence"])
    assert cli.returncode == 0, cli.stderr[-2000:]
    lines = [json.loads(line) for line in cli.stdout.splitlines()]
    assert [line["input"] for line in lines] == [dev[0].fields["sentence"], dev[1].fields["sentence"]]
    assert np.allclose(
        [list(line["probabilities"].values()) for line in lines], np.stack(evaluated["p"].to_numpy())[:2], atol=1e-5
    )


def test_neighbors_are_the_retrieved_store_rows(served):
    spec, run_dir, url, _ = served
    store = KnowledgeStore.load(store_folder(run_dir))
    texts = ["a warm and funny film", "dull and far too long"]
    answer = post(url, {"inputs": texts, "return_neighbors": True})
    assert answer.status_code == 200, answer.text
    # The nearest keys, found here by brute force: the run's student embeds each text as serving does and every
    # store key is scored by cosine (keys and embeddings are L2-normalised).
    student = RetrievalStudent.load(run_dir / "student" / "model", dtype=spec.student.dtype)
    task = Task.from_spec(spec.task)
    queries = student.embed_all([task.student_inputs(example)[0] for example in parse_inputs(task, texts)])
    cosines = queries @ store.keys.T
    for result, scores in zip(answer.json()["results"], cosines):
        rows = result["neighbors"]
        assert len(rows) == spec.student.k
        assert sum(row["weight"] for row in rows) == pytest.approx(1.0, abs=1e-5)
        for row in rows:
            assert row["text"] == store.inputs[row["id"]][0]
            assert row["label"] == store.labels[row["id"]]
            assert np.allclose(row["soft_label"], store.soft_labels[row["id"]])
        ids = [row["id"] for row in rows]
        assert len(set(ids)) == len(ids)
        nearest = np.argsort(-scores, kind="stable")
        # Best first, with the k best cosines in the store; equal keys (a repeated store input) may come in
        # either order, so the ids must be the nearest ones exactly only where no two cosines tie.
        assert np.allclose(scores[ids], scores[nearest[: len(ids)]], atol=1e-5)
        if np.all(np.diff(-scores[nearest[: len(ids) + 1]]) > 1e-5):
            assert ids == nearest[: len(ids)].tolist()
        expected_weights = np.exp((scores[ids] - scores[ids].max()) / student.tau)
        assert np.allclose([row["weight"] for row in rows], expected_weights / expected_weights.sum(), atol=1e-4)
    assert "neighbors" not in post(url, {"inputs": ["a film"]}).json()["results"][0]


def test_info_names_task_models_and_store(served):
    spec, run_dir, url, _ = served
    info = requests.get(f"{url}/v1/info", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30).json()
    store = KnowledgeStore.load(store_folder(run_dir))
    assert (info["task"], info["kind"], info["labels"], info["input_fields"]) == (
        "sst2",
        "classification",
        ["negative", "positive"],
        ["sentence"],
    )
    assert info["store"]["rows"] == len(store) and info["store"]["version"] == store.version
    assert info["models"]["student"] == spec.student.model and info["models"]["teacher"] == spec.teacher.model
    assert info["models"]["student_encoder"] == store.encoder_fingerprint
    assert info["limits"] == {"max_inputs_per_request": 8, "max_chars_per_input": 300}


@pytest.mark.parametrize(
    "method, route",
    [
        ("GET", "/v1/info"),
        ("POST", "/v1/classify"),
        ("POST", "/v1/admin/reload"),
        ("POST", "/v1/admin/reload-store"),
        ("GET", "/openapi.json"),
    ],
)
def test_every_route_but_healthz_needs_the_token(served, method, route):
    _, _, url, _ = served
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        answer = requests.request(method, f"{url}{route}", json={"inputs": ["x"]}, headers=headers, timeout=30)
        assert answer.status_code == 401, (headers, answer.text)
        assert answer.headers["WWW-Authenticate"] == "Bearer"
    assert requests.get(f"{url}/healthz", timeout=30).json() == {"status": "ok"}


def test_openapi_schema_documents_the_api(served):
    _, _, url, _ = served
    schema = requests.get(f"{url}/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30).json()
    assert {"/healthz", "/v1/info", "/v1/classify", "/v1/admin/reload"} <= set(schema["paths"])
    assert "413" in schema["paths"]["/v1/classify"]["post"]["responses"]
    assert {"ClassifyRequest", "ClassifyResponse", "Neighbor", "Info"} <= set(schema["components"]["schemas"])


@pytest.mark.parametrize(
    "body, detail",
    [
        ({"inputs": ["x"] * 9}, "inputs: 9 given, at most 8 per request"),
        ({"inputs": ["ok", "y" * 301]}, "inputs.1: 301 characters, at most 300 per input"),
    ],
)
def test_requests_over_the_limits_get_413(served, body, detail):
    _, _, url, _ = served
    answer = post(url, body)
    assert answer.status_code == 413 and answer.json()["detail"] == detail
    assert_still_answers(url)


def test_a_body_too_large_for_any_valid_request_gets_413(served):
    spec, _, url, _ = served
    body = json.dumps({"inputs": ["z" * 100] * (max_body_bytes(spec.serve) // 100)})
    answer = requests.post(
        f"{url}/v1/classify",
        data=body,
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
        timeout=60,
    )
    assert answer.status_code == 413
    assert_still_answers(url)


@pytest.mark.parametrize(
    "body, loc",
    [
        ('{"inputs": ["unclosed"', ["body"]),
        ("{}", ["body", "inputs"]),
        ('{"inputs": "one text"}', ["body", "inputs"]),
        ('{"inputs": []}', ["body", "inputs"]),
        ('{"inputs": [5]}', ["body", "inputs", 0]),
        ('{"inputs": [{"text": "a film"}]}', ["body", "inputs", 0, "text"]),
        ('{"inputs": [{"text": "a film"}]}', ["body", "inputs", 0, "sentence"]),
        ('{"inputs": [{"sentence": ["a", "film"]}]}', ["body", "inputs", 0]),
        ('{"inputs": ["a film"], "top_k": 3}', ["body", "top_k"]),
        ('{"inputs": ["a film"], "return_neighbors": "perhaps"}', ["body", "return_neighbors"]),
        ('["a film"]', ["body"]),
        ("\xff", ["body"]),
    ],
)
def test_malformed_requests_get_422_naming_the_field(served, body, loc):
    _, _, url, _ = served
    answer = requests.post(
        f"{url}/v1/classify",
        data=body.encode("latin-1"),
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
        timeout=60,
    )
    assert answer.status_code == 422, answer.text
    assert any(error["loc"][: len(loc)] == loc for error in answer.json()["detail"]), answer.json()
    assert_still_answers(url)


EMPTY_INPUTS = [({"inputs": ["good text", "   "]}, ["body", "inputs", 1]), ({"inputs": [""]}, ["body", "inputs", 0])]


@pytest.mark.parametrize("body, loc", EMPTY_INPUTS)
def test_empty_inputs_get_422_naming_the_input(served, body, loc):
    _, _, url, _ = served
    answer = post(url, body)
    assert answer.status_code == 422, answer.text
    assert [error["loc"] for error in answer.json()["detail"]] == [loc], answer.json()
    assert_still_answers(url)


@pytest.mark.parametrize("body, loc", EMPTY_INPUTS)
def test_the_request_model_refuses_empty_inputs(body, loc):
    """The route's body model in a bare FastAPI app (no Ray): the 422 FastAPI builds from it names the input."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    api = FastAPI()

    @api.post("/v1/classify")
    async def classify(request: ClassifyRequest) -> dict:
        return {"inputs": len(request.inputs)}

    answer = TestClient(api).post("/v1/classify", json=body)
    assert answer.status_code == 422, answer.text
    assert [error["loc"] for error in answer.json()["detail"]] == [loc]
    assert TestClient(api).post("/v1/classify", json={"inputs": ["good text", {"premise": " a "}]}).status_code == 200


def test_choice_inputs_are_objects_of_the_task_fields():
    task = Task.from_spec(TaskSpec(name="copa"))
    good = {"premise": "The man  fell.", "question": "cause", "choice1": "He slipped.", "choice2": "He sang."}
    (example,) = parse_inputs(task, [good])
    assert example.fields == {**good, "premise": "The man fell."} and example.label == -1
    with pytest.raises(InputError) as error:
        parse_inputs(
            task,
            ["just text", {**good, "question": "why"}, {key: value for key, value in good.items() if key != "choice2"}],
        )
    assert [problem["loc"] for problem in error.value.errors] == [
        ("inputs", 0),
        ("inputs", 1, "question"),
        ("inputs", 2, "choice2"),
    ]
    with pytest.raises(InputError) as error:  # a field of only whitespace is empty
        parse_inputs(task, [good, {**good, "choice1": " \t "}, {**good, "question": ""}])
    assert [(problem["loc"], problem["type"]) for problem in error.value.errors] == [
        (("inputs", 1, "choice1"), "empty_text"),
        (("inputs", 2, "question"), "empty_text"),
    ]


def test_choice_task_results_and_neighbors_per_alternative(tiny_models):
    """COPA through Predictor with an untrained student and a small store of its own keys: the
    probabilities are over the alternatives, and each alternative's row brings its own neighbours."""
    from retrikt_ray.config import StudentSpec
    from retrikt_ray.retrieval_student import RetrievalStudent, encoder_fingerprint
    from retrikt_ray.serve import Predictor

    task = Task.from_spec(TaskSpec(name="copa"))
    student = RetrievalStudent.from_spec(StudentSpec(model=tiny_models["student"], k=3), task.student_num_labels)
    examples = task.load(task.default_files()[1])[:4]
    rows = [row for example in examples for row in task.student_inputs(example)]
    store = KnowledgeStore(
        inputs=rows,
        labels=[target for example in examples for target in task.row_targets(example)],
        soft_labels=np.full((len(rows), 2), 0.5),
        keys=student.embed_all(rows),
        teacher_states=None,
        encoder_fingerprint=encoder_fingerprint(student.encoder),
    )
    (result,) = Predictor(task, student, store, batch_size=8).results(examples[:1], [True])
    assert list(result["probabilities"]) == ["1", "2"] and sum(result["probabilities"].values()) == pytest.approx(1.0)
    by_alternative = {}
    for row in result["neighbors"]:
        by_alternative.setdefault(row["alternative"], []).append(row)
        assert (row["text"], row["text_pair"]) == store.inputs[row["id"]]
    assert sorted(by_alternative) == ["choice1", "choice2"]
    for found in by_alternative.values():
        assert len(found) == 3 and sum(row["weight"] for row in found) == pytest.approx(1.0, abs=1e-5)
    assert by_alternative["choice1"][0]["id"] == 0 and by_alternative["choice2"][0]["id"] == 1  # its own row first


def test_store_swap_under_concurrent_requests(served):
    """Clients keep classifying while a smaller store replaces the served one: no request fails, and
    every request sent after the reload answered uses the new version."""
    _, run_dir, url, port = served
    folder = store_folder(run_dir)
    old = KnowledgeStore.load(folder)
    new = old.subset(np.arange(len(old) // 2))
    assert new.version != old.version
    answers, stop = [], threading.Event()
    sent_by = {number: [] for number in range(4)}  # when each client sent each answered request

    def client(number):
        session = requests.Session()
        while not stop.is_set():
            sent = time.monotonic()
            try:
                answer = post(url, {"inputs": [f"film number {number}", "a moving story"]}, session=session)
            except requests.RequestException as error:
                answers.append((sent, type(error).__name__, None))
                continue
            version = answer.json().get("store_version") if answer.status_code == 200 else None
            answers.append((sent, answer.status_code, version))
            sent_by[number].append(sent)

    def until_every_client_answered_twice_since(moment):
        deadline = time.monotonic() + 120
        while any(sum(sent > moment for sent in times) < 2 for times in sent_by.values()):
            assert time.monotonic() < deadline, "the clients stopped getting answers"
            time.sleep(0.05)

    threads = [threading.Thread(target=client, args=(number,)) for number in range(4)]
    for thread in threads:
        thread.start()
    try:
        until_every_client_answered_twice_since(float("-inf"))  # all four are classifying on the old store
        new.save(folder)
        reloaded = request_reload(run_dir, "127.0.0.1", port)
        after = time.monotonic()
        until_every_client_answered_twice_since(after)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        old.save(folder)
    assert reloaded["store_version"] == new.version and reloaded["rows"] == len(new)
    assert all(status == 200 for _, status, _ in answers), {status for _, status, _ in answers}
    assert {version for _, _, version in answers} <= {old.version, new.version}
    assert old.version in {version for sent, _, version in answers if sent < after}
    later = [version for sent, _, version in answers if sent > after]
    assert later and set(later) == {new.version}

    restored = retrikt("serve", str(run_dir), "--port", str(port), "--reload-store")
    assert restored.returncode == 0, restored.stderr[-2000:]
    assert restored.stdout.strip().endswith(f"-> {old.version} ({len(old)} rows)")
    assert post(url, {"inputs": ["a film"]}).json()["store_version"] == old.version


def test_a_store_that_does_not_fit_the_student_is_refused(served):
    _, run_dir, url, port = served
    folder = store_folder(run_dir)
    old = KnowledgeStore.load(folder)
    keys = np.random.default_rng(0).normal(size=old.keys.shape).astype(np.float32)
    foreign = old.with_keys(keys / np.linalg.norm(keys, axis=1, keepdims=True), "0123456789abcdef")
    try:
        foreign.save(folder)
        with pytest.raises(SpecError, match="409 .*not reloaded: the store's keys come from encoder 0123456789abcdef"):
            request_reload(run_dir, "127.0.0.1", port)
    finally:
        old.save(folder)
    assert post(url, {"inputs": ["a film"]}).json()["store_version"] == old.version


def test_autoscaling_config_and_resources_are_applied(served):
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeInstanceDetails

    details = ServeInstanceDetails(**_get_global_client().get_serve_details()).applications[APP_NAME].deployments
    student_store = details[STUDENT_STORE].deployment_config
    autoscaling = student_store.autoscaling_config
    assert (autoscaling["min_replicas"], autoscaling["max_replicas"], autoscaling["target_ongoing_requests"]) == (
        2,
        3,
        4.0,
    )
    assert student_store.max_ongoing_requests == 16 and student_store.ray_actor_options.num_cpus == 0.5
    assert details[INGRESS].deployment_config.num_replicas == 1
    running = serve.status().applications[APP_NAME].deployments[STUDENT_STORE].replica_states.get("RUNNING", 0)
    assert 2 <= running <= 3


def test_config_out_writes_a_serve_config(served, tmp_path):
    from ray.serve import Application
    from ray.serve.schema import ServeDeploySchema

    _, run_dir, _, _ = served
    out = tmp_path / "serve.yaml"
    result = retrikt("serve", str(run_dir), "--config-out", str(out), "--port", "8123")
    assert result.returncode == 0, result.stderr[-2000:]
    config = ServeDeploySchema.model_validate(yaml.safe_load(out.read_text()))
    assert (config.http_options.host, config.http_options.port) == ("127.0.0.1", 8123)
    (app,) = config.applications
    assert app.import_path == "retrikt_ray.serve:build_app" and app.args == {
        "run_dir": str(run_dir.resolve()),
        "host": "127.0.0.1",
    }
    deployments = {deployment.name: deployment for deployment in app.deployments}
    assert deployments[STUDENT_STORE].autoscaling_config["max_replicas"] == 3
    assert deployments[STUDENT_STORE].ray_actor_options.num_cpus == 0.5
    assert isinstance(build_app(app.args), Application)


def test_a_non_loopback_host_without_token_refuses_to_start(served, tmp_path):
    _, run_dir, _, _ = served
    check_exposure("127.0.0.1", None)
    check_exposure("0.0.0.0", "a token")
    for host in ("0.0.0.0", "10.1.2.3", "example.org"):
        with pytest.raises(SpecError, match="not a loopback address, so a token is required"):
            check_exposure(host, None)

    open_run = tmp_path / "open-run"
    (open_run / "student").mkdir(parents=True)
    shutil.copy(run_dir / "student" / "manifest.json", open_run / "student")
    job = yaml.safe_load((run_dir / "job.yaml").read_text())
    job["serve"]["token_file"] = None
    (open_run / "job.yaml").write_text(yaml.safe_dump(job))
    env = {key: value for key, value in os.environ.items() if key != job["serve"]["token_env"]}
    result = retrikt("serve", str(open_run), "--host", "0.0.0.0", env=env)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: serve.host 0.0.0.0: not a loopback address, so a token is required "
        "(serve.token_file or serve.token_env)"
    )


def test_serving_a_folder_that_is_not_a_finished_run_is_one_line(tmp_path):
    """`retrikt serve` refuses before starting Ray: a folder without job.yaml, and a run whose student stage has
    not finished; `predict` says the same."""
    result = retrikt("serve", str(tmp_path), "--port", str(free_port()))
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {tmp_path}: not a run directory (no job.yaml)"

    unfinished = tmp_path / "unfinished"
    (unfinished / "student").mkdir(parents=True)
    (unfinished / "job.yaml").write_text("name: unfinished\n")
    for args in (("serve", str(unfinished)), ("predict", str(unfinished), "text")):
        result = cli(*args)
        assert result.exit_code == 2, result.output
        assert result.stderr.strip() == (
            f"error: {unfinished}: the student stage has not finished, there is nothing to serve"
        ), args


def test_concurrent_requests_batched_together_each_get_their_own_results(served):
    """Sixteen requests of 1 to 4 inputs sent at once, some asking for neighbours: the StudentStore replicas batch
    them (`@serve.batch`, up to 8 requests per batch) and split the batch's results back, so each answer holds the
    evaluation's probabilities of its own inputs, in order, and neighbours exactly where they were asked for."""
    spec, run_dir, url, _ = served
    _, dev = load_dev(spec)
    evaluated = np.stack(pd.read_parquet(run_dir / "evaluate" / "predictions.parquet")["p"].to_numpy())
    requests_sent = [
        ([(7 * number + offset) % len(dev) for offset in range(1 + number % 4)], number % 3 == 0)
        for number in range(16)
    ]
    start_together = threading.Barrier(len(requests_sent))
    answers: dict[int, requests.Response] = {}

    def client(number):
        rows, neighbors = requests_sent[number]
        body = {"inputs": [dev[row].fields["sentence"] for row in rows], "return_neighbors": neighbors}
        start_together.wait()
        answers[number] = post(url, body)

    threads = [threading.Thread(target=client, args=(number,)) for number in range(len(requests_sent))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sorted(answers) == list(range(len(requests_sent)))
    for number, (rows, neighbors) in enumerate(requests_sent):
        assert answers[number].status_code == 200, answers[number].text
        results = answers[number].json()["results"]
        assert len(results) == len(rows)
        assert np.allclose([list(result["probabilities"].values()) for result in results], evaluated[rows], atol=1e-5)
        assert all(("neighbors" in result) == neighbors for result in results), number


def ingress_client(run_dir, host: str):
    """The Ingress's FastAPI app, built as Serve builds it in its replica but here without Ray (no StudentStore
    behind it: for the routes that do not reach it)."""
    from fastapi.testclient import TestClient

    from retrikt_ray.serve import Ingress

    # Serve wraps the class as written in one of its own (its __init__ is async); the written one is underneath.
    written = next(cls for cls in Ingress.func_or_class.__mro__ if "authorise" in vars(cls))
    return TestClient(written(None, str(run_dir), host).__serve_build_asgi_app__())


def run_serving_with(run_dir, folder, **serve_fields):
    """A run folder whose job.yaml is the run's with other serve fields (its student's manifest beside it)."""
    (folder / "student").mkdir(parents=True)
    shutil.copy(run_dir / "student" / "manifest.json", folder / "student")
    job = yaml.safe_load((run_dir / "job.yaml").read_text())
    job["serve"].update(serve_fields)
    (folder / "job.yaml").write_text(yaml.safe_dump(job))
    return folder


def test_token_env_authenticates_and_an_empty_token_is_refused(sst2_run, tmp_path, monkeypatch):
    from retrikt_ray.serve import load_run_spec, read_token

    _, run_dir = sst2_run
    env_run = run_serving_with(run_dir, tmp_path / "env-run", token_file=None, token_env="RETRIKT_TEST_TOKEN")
    monkeypatch.setenv("RETRIKT_TEST_TOKEN", " env-token-42\n")
    client = ingress_client(env_run, "0.0.0.0")  # beyond loopback: allowed, as there is a token
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {TOKEN}"}):
        assert client.get("/openapi.json", headers=headers).status_code == 401, headers
    assert client.get("/openapi.json", headers={"Authorization": "Bearer env-token-42"}).status_code == 200
    assert client.get("/healthz").json() == {"status": "ok"}

    for blank in ("", " \n"):  # an empty variable is no token: open on loopback only
        monkeypatch.setenv("RETRIKT_TEST_TOKEN", blank)
        assert read_token(load_run_spec(env_run).serve) is None
        with pytest.raises(SpecError, match="not a loopback address, so a token is required"):
            ingress_client(env_run, "0.0.0.0")
    assert ingress_client(env_run, "127.0.0.1").get("/openapi.json").status_code == 200

    token_file = tmp_path / "empty-token"
    token_file.write_text(" \n")
    empty_file_run = run_serving_with(run_dir, tmp_path / "empty-file-run", token_file=str(token_file))
    result = retrikt("serve", str(empty_file_run), "--port", str(free_port()))
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: serve.token_file: {token_file} is empty"


def test_serve_in_the_foreground_stops_on_sigterm_and_leaves_no_process(sst2_run, tmp_path):
    """The real `retrikt serve` in the foreground, on a local Ray of its own: once it answers, SIGTERM (what
    systemd, Docker and Kubernetes send) stops it as Ctrl-C does (test_cli.py: both signals take one path), with
    exit code 0, and none of the processes it started (Ray's GCS, raylet, dashboard and its agents, the Serve
    actors) is left running."""
    _, run_dir = sst2_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    job = yaml.safe_load((copy / "job.yaml").read_text())
    job["serve"].update(min_replicas=1, max_replicas=1, num_cpus=0.5, token_file=None)
    (copy / "job.yaml").write_text(yaml.safe_dump(job))
    port = free_port()
    ray_temp = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))  # short: Ray's socket paths live under it
    env = {key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", job["serve"]["token_env"])}
    command = [sys.executable, "-m", "retrikt_ray.cli", "serve", str(copy), "--port", str(port)]
    server = subprocess.Popen(
        command, cwd=REPO, env={**env, "RAY_TMPDIR": str(ray_temp)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    output: list[str] = []
    serving = threading.Event()

    def read():
        for line in server.stdout:
            output.append(line.decode(errors="replace"))
            if output[-1].startswith("serving "):
                serving.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    started = []
    try:
        deadline = time.monotonic() + 300
        while not serving.wait(0.5):
            assert server.poll() is None and time.monotonic() < deadline, "".join(output)[-3000:]
        assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=30).json() == {"status": "ok"}
        started = process_tree(server.pid)
        assert any(process.name() == "raylet" for process in started)
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=120) == 0, "".join(output)[-3000:]
        reader.join(timeout=30)
        assert "stopped (SIGTERM)" in "".join(output)
        assert still_running(started) == []
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
    finally:
        leftovers = started + (process_tree(server.pid) if server.poll() is None else [])
        for process in leftovers:  # only when the test failed
            with contextlib.suppress(Exception):
                process.kill()
        shutil.rmtree(ray_temp, ignore_errors=True)
