"""Serving a finished run: its student + knowledge store behind an autoscaled Ray Serve endpoint, and
local prediction without a server.

One Serve application of two deployments:
- `Ingress` (FastAPI, one replica): the bearer token, the request limits (413), the input checks
  (422), and the routes `/healthz`, `/v1/info`, `/v1/classify`, `/v1/admin/reload` (also at its older
  path `/v1/admin/reload-store`), `/openapi.json`.
- `StudentStore` (autoscaled): the run's current version (versions.py: v0 is `student/model` and
  `student/store`, `retrikt grow` adds more), its student and store always together; it batches
  requests with `@serve.batch`, predicts with `predict_examples`, the function evaluation uses, and
  with `serve.capture` keeps the inputs it predicted (capture.py).

Reloads: the admin route asks one StudentStore replica to load the current version again (student and
store, or only the store when the version is the same and its store changed on disk), then stamps every
later request with the time of that reload. A replica that receives a stamp later than its last reload
loads the version before predicting that batch, and a batch already running keeps the student and store
it started with: in-flight requests finish on the old version, later ones use the new one, none fails,
and every answer names the version it used.
"""

# No `from __future__ import annotations` here: FastAPI reads the routes' annotations in the replica,
# where Serve's pickled copy of the Ingress class does not see this module's names.
import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import PydanticCustomError
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import versions
from .capture import TrafficWriter
from .config import ServeSpec, SpecError
from .knowledge_store import KnowledgeStore
from .retrieval_student import RetrievalStudent, encoder_fingerprint, predict_examples, predict_neighbors
from .tasks import Example, Task, normalise
from .versions import load_run_spec

APP_NAME = "retrikt"
INGRESS = "Ingress"
STUDENT_STORE = "StudentStore"
IMPORT_PATH = "retrikt_ray.serve:build_app"

logger = logging.getLogger("ray.serve")  # Serve writes this logger to the replica's log


# ------------------------------------------------------------------------------------ a finished run
def store_folder(run_dir) -> Path:
    """The store whose keys match the current version's student: the one that is served (and reloaded)."""
    return versions.current(run_dir).store_dir


class Predictor:
    """A run's task, trained student and store: per-example results, computed as evaluation computes them."""

    def __init__(
        self,
        task: Task,
        student: RetrievalStudent,
        store: KnowledgeStore,
        batch_size: int,
        fingerprint: str | None = None,
        version: str = versions.ORIGINAL,
    ):
        self.fingerprint = fingerprint or encoder_fingerprint(student.encoder)
        if store.encoder_fingerprint != self.fingerprint:
            raise ValueError(
                f"the store's keys come from encoder {store.encoder_fingerprint}, "
                f"the student's encoder is {self.fingerprint}"
            )
        if store.num_labels != student.num_labels:
            raise ValueError(f"the store has {store.num_labels} labels per row, the student {student.num_labels}")
        self.task = task
        self.student = student
        self.store = store
        self.store_version = store.version
        self.batch_size = batch_size
        self.version = version

    @classmethod
    def load(cls, run_dir, version: str | None = None) -> "Predictor":
        """A version's student and store (default: the run's current version), predicting in batches of
        evaluate.batch_size like evaluation."""
        spec = load_run_spec(run_dir)
        chosen = versions.get(run_dir, version) if version else versions.current(run_dir)
        student = RetrievalStudent.load(chosen.model_dir, spec.student.trust_remote_code, spec.student.dtype)
        student.embed([("warm-up", None)])  # makes the weights' copy in the compute dtype before the first request
        store = KnowledgeStore.load(chosen.store_dir)
        return cls(Task.from_spec(spec.task), student, store, spec.evaluate.batch_size, version=chosen.name)

    def with_store(self, store: KnowledgeStore) -> "Predictor":
        """The same student with another store; ValueError when its keys do not come from this student."""
        return Predictor(self.task, self.student, store, self.batch_size, self.fingerprint, self.version)

    def results(self, examples: list[Example], neighbors: list[bool]) -> list[dict]:
        """Per example: its label, the probability of every label and, where asked, its neighbours."""
        names = self.task.label_names
        probs = predict_examples(self.task, self.student, self.store, examples, self.batch_size)["p"]
        results = [
            {"label": names[int(row.argmax())], "probabilities": dict(zip(names, row.tolist()))} for row in probs
        ]
        asked = [index for index, wanted in enumerate(neighbors) if wanted]
        if asked:
            found = predict_neighbors(
                self.task, self.student, self.store, [examples[i] for i in asked], self.batch_size
            )
            for index, (ids, weights) in zip(asked, found):
                results[index]["neighbors"] = self._neighbor_rows(ids, weights)
        return results

    def _neighbor_rows(self, ids, weights) -> list[dict]:
        # A choice task has one student row per alternative, and each retrieves its own neighbours.
        alternatives = self.task.choice_fields or [None]
        rows = []
        for alternative, row_ids, row_weights in zip(alternatives, ids, weights):
            for row_id, weight in zip(row_ids.tolist(), row_weights.tolist()):
                if row_id < 0:
                    continue
                text, text_pair = self.store.inputs[row_id]
                row = {
                    "id": row_id,
                    "text": text,
                    "text_pair": text_pair,
                    "label": int(self.store.labels[row_id]),
                    "soft_label": self.store.soft_labels[row_id].tolist(),
                    "weight": weight,
                    "alternative": alternative,
                }
                # text_pair and alternative only where the task has them
                rows.append({key: value for key, value in row.items() if value is not None})
        return rows


# ------------------------------------------------------------------------------------------ the API
EMPTY_TEXT = "empty text: an input needs words to classify"


def has_text(raw: str | dict[str, str]) -> str | dict[str, str]:
    """A text input must hold more than whitespace (422 at `inputs.i`); an object's fields are checked by
    `parse_inputs`, which knows the task's fields."""
    if isinstance(raw, str) and not raw.strip():
        raise PydanticCustomError("empty_text", EMPTY_TEXT)
    return raw


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: list[Annotated[str | dict[str, str], AfterValidator(has_text)]] = Field(
        min_length=1,
        description="A text per input for a task with one text field, "
        "else an object with the task's input fields (see /v1/info)",
    )
    return_neighbors: bool = Field(
        False, description="Also return the store rows each input retrieved, with their weights"
    )


class Neighbor(BaseModel):
    id: int = Field(description="Row of the knowledge store")
    text: str
    text_pair: str | None = Field(None, description="Second text of a pair task's row")
    label: int = Field(description="The row's label index (choice tasks: 1 = the right alternative, 0 = a wrong one)")
    soft_label: list[float] = Field(description="The teacher's calibrated probabilities for the row")
    weight: float = Field(description="The row's weight in the retrieval distribution of its input")
    alternative: str | None = Field(None, description="Choice tasks: the alternative whose row retrieved it")


class Result(BaseModel):
    label: str = Field(description="The most probable label")
    probabilities: dict[str, float] = Field(description="p = lam * p_ret + (1 - lam) * p_head of every label")
    neighbors: list[Neighbor] | None = Field(None, description="Only with return_neighbors")


class ClassifyResponse(BaseModel):
    results: list[Result] = Field(description="One per input, in order")
    version: str = Field(description="Version of the run's model (student + store) that answered: v0, v1, ...")
    store_version: str = Field(description="Content hash of the store these predictions used")


class StoreInfo(BaseModel):
    rows: int
    version: str = Field(description="Content hash of the store")
    index: str = Field(description="FAISS index kind")


class Info(BaseModel):
    run: str
    task: str
    kind: str = Field(description="classification or choice")
    version: str = Field(description="Version of the run's model being served (retrikt versions lists them)")
    labels: list[str]
    input_fields: list[str] = Field(description="Fields of an input object")
    models: dict[str, str] = Field(description="Student and teacher model ids, and the trained encoder's fingerprint")
    store: StoreInfo
    limits: dict[str, int]


class Reloaded(BaseModel):
    run: str
    version: str = Field(description="Version of the run's model served from now on")
    previous: str = Field(description="Version served before")
    store_version: str = Field(description="Content hash of the store served from now on")
    previous_version: str = Field(description="Content hash of the store served before")
    rows: int


class TooLarge(ValueError):
    """A request over the serve section's limits (HTTP 413)."""


class InputError(ValueError):
    """Inputs that do not fit the task (HTTP 422); `errors` in pydantic's shape, each naming its field."""

    def __init__(self, errors: list[dict]):
        super().__init__("; ".join(f"{'.'.join(map(str, error['loc']))}: {error['msg']}" for error in errors))
        self.errors = errors


def check_limits(inputs: list[str | dict[str, str]], settings: ServeSpec) -> None:
    """Raise TooLarge for too many inputs or an input with too many characters (its fields together)."""
    if len(inputs) > settings.max_inputs_per_request:
        raise TooLarge(f"inputs: {len(inputs)} given, at most {settings.max_inputs_per_request} per request")
    for index, raw in enumerate(inputs):
        characters = len(raw) if isinstance(raw, str) else sum(map(len, raw.values()))
        if characters > settings.max_chars_per_input:
            raise TooLarge(f"inputs.{index}: {characters} characters, at most {settings.max_chars_per_input} per input")


def max_body_bytes(settings: ServeSpec) -> int:
    """The longest body a request within the limits can need: a character takes up to 12 bytes in JSON
    (an escaped surrogate pair), plus room for field names and punctuation."""
    return settings.max_inputs_per_request * (12 * settings.max_chars_per_input + 1024) + 1024


def parse_inputs(task: Task, inputs: list[str | dict[str, str]]) -> list[Example]:
    """API inputs as examples (whitespace-normalised, like loaded ones); InputError names every bad field."""
    fields = task.input_fields
    examples, errors = [], []
    for index, raw in enumerate(inputs):
        where = ("inputs", index)
        text_input = isinstance(raw, str)
        if text_input:
            if len(fields) > 1:
                errors.append(
                    {"type": "value_error", "loc": where, "msg": f"expected an object with the fields {fields}"}
                )
                continue
            raw = {fields[0]: raw}
        problems = [
            {"type": "extra_forbidden", "loc": (*where, name), "msg": "unknown field"}
            for name in raw
            if name not in fields
        ]
        problems += [
            {"type": "missing", "loc": (*where, name), "msg": "field required"} for name in fields if name not in raw
        ]
        values = {name: normalise(raw[name]) for name in fields if name in raw}
        problems += [
            {"type": "empty_text", "loc": where if text_input else (*where, name), "msg": EMPTY_TEXT}
            for name, value in values.items()
            if not value
        ]
        question = task.question_field
        if values.get(question) and values[question] not in task.connectives:
            problems.append(
                {"type": "value_error", "loc": (*where, question), "msg": f"expected one of {list(task.connectives)}"}
            )
        errors += problems
        if not problems:
            examples.append(Example(fields=values, label=-1))
    if errors:
        raise InputError(errors)
    return examples


# ------------------------------------------------------------------------------------------ security
def read_token(settings: ServeSpec) -> str | None:
    """The bearer token from serve.token_file (which must then hold one), else the serve.token_env variable."""
    if settings.token_file:
        path = Path(settings.token_file).expanduser()
        try:
            token = path.read_text().strip()
        except OSError as error:
            raise SpecError(f"serve.token_file: cannot read {path} ({error.strerror})") from None
        if not token:
            raise SpecError(f"serve.token_file: {path} is empty")
        return token
    if settings.token_env:
        return os.environ.get(settings.token_env, "").strip() or None
    return None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost may resolve to anything
        return False


def check_exposure(host: str, token: str | None) -> None:
    """Refuse to serve beyond loopback without a token."""
    if token is None and not is_loopback(host):
        raise SpecError(
            f"serve.host {host}: not a loopback address, so a token is required (serve.token_file or serve.token_env)"
        )


async def undecodable_body_is_malformed_json(request: Request, error: StarletteHTTPException):
    """FastAPI answers 400 to a body that is not UTF-8; it is malformed JSON like any other (422)."""
    if isinstance(error.__cause__, UnicodeDecodeError):
        problem = {"type": "json_invalid", "loc": ["body"], "msg": "JSON decode error", "ctx": {"error": "not UTF-8"}}
        return JSONResponse({"detail": [problem]}, status_code=422)
    return await http_exception_handler(request, error)


BEARER = HTTPBearer(auto_error=False, description="The token of serve.token_file or of the serve.token_env variable")


# ---------------------------------------------------------------------------------------- deployments
@serve.deployment(name=STUDENT_STORE)
class StudentStore:
    """The run's student and store in one replica: batches requests and predicts as evaluation does."""

    def __init__(self, run_dir: str):
        self.run_dir = Path(run_dir)
        self.predictor = Predictor.load(self.run_dir)
        self.reloaded_at = 0  # stamp of the latest reload this replica has followed (ns since the epoch)
        self._reload_lock = asyncio.Lock()
        settings = load_run_spec(self.run_dir).serve
        capture = settings.capture
        self.traffic = (
            TrafficWriter(self.run_dir, capture.max_rows, capture.max_confidence) if capture.enabled else None
        )
        self.classify_batch.set_max_batch_size(settings.batch_max_size)
        self.classify_batch.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)

    async def classify(self, request: dict) -> dict:
        """request: examples, neighbors (bool) and reloaded_at (the ingress's latest reload stamp)."""
        return await self.classify_batch(request)

    @serve.batch
    async def classify_batch(self, requests: list[dict]) -> list[dict]:
        await self._follow_reload(max(request["reloaded_at"] for request in requests))
        predictor = self.predictor  # the whole batch on one store, even if a reload lands meanwhile
        examples = [example for request in requests for example in request["examples"]]
        neighbors = [request["neighbors"] for request in requests for _ in request["examples"]]
        # In a thread, so that the replica keeps answering reloads and health checks meanwhile.
        results = await asyncio.to_thread(predictor.results, examples, neighbors)
        if self.traffic is not None:
            await asyncio.to_thread(self._capture, examples, results, predictor.version)
        answers, start = [], 0
        for request in requests:
            end = start + len(request["examples"])
            answers.append(
                {
                    "results": results[start:end],
                    "version": predictor.version,
                    "store_version": predictor.store_version,
                }
            )
            start = end
        return answers

    def _capture(self, examples: list[Example], results: list[dict], version: str) -> None:
        try:
            self.traffic.append(
                [example.fields for example in examples],
                [result["label"] for result in results],
                [result["probabilities"][result["label"]] for result in results],
                version,
            )
        except OSError as error:  # capture must never fail a request
            logger.warning("traffic not captured: %s", error)

    async def reload(self, reloaded_at: int) -> dict:
        """Load the current version again (the admin route); {"error": ...} when it cannot be served."""
        async with self._reload_lock:
            previous, previous_store = self.predictor.version, self.predictor.store_version
            try:
                self.predictor = await asyncio.to_thread(self._load_current)
            except (OSError, ValueError, KeyError, SpecError) as error:
                return {"error": str(error)}
            self.reloaded_at = max(self.reloaded_at, reloaded_at)
            return {
                "version": self.predictor.version,
                "previous": previous,
                "store_version": self.predictor.store_version,
                "previous_version": previous_store,
                "rows": len(self.predictor.store),
            }

    async def _follow_reload(self, reloaded_at: int) -> None:
        """Load the store again when the ingress stamps a reload later than this replica's last one."""
        if reloaded_at <= self.reloaded_at:
            return
        async with self._reload_lock:
            if reloaded_at <= self.reloaded_at:
                return
            try:
                self.predictor = await asyncio.to_thread(self._load_current)
            except (OSError, ValueError, KeyError, SpecError) as error:
                logger.warning("not reloaded, still serving version %s: %s", self.predictor.version, error)
            # Followed even when the load failed: one warning per reload, not one per batch.
            self.reloaded_at = reloaded_at

    def _load_current(self) -> Predictor:
        """The current version: a new student and store, or the same student with its store read again when
        the version is the same and its store changed on disk."""
        version = versions.current(self.run_dir)
        if version.name != self.predictor.version:
            return Predictor.load(self.run_dir, version.name)
        if KnowledgeStore.saved_version(version.store_dir) == self.predictor.store_version:
            return self.predictor
        return self.predictor.with_store(KnowledgeStore.load(version.store_dir))

    def info(self) -> dict:
        store = self.predictor.store
        return {
            "rows": len(store),
            "version": self.predictor.store_version,
            "index": store.index_kind,
            "encoder": self.predictor.fingerprint,
            "model_version": self.predictor.version,
        }


@serve.deployment(name=INGRESS)
@serve.ingress()
class Ingress:
    """The HTTP front (FastAPI): token, limits and input checks, then the StudentStore deployment."""

    def __init__(self, student_store: DeploymentHandle, run_dir: str, host: str):
        self.spec = load_run_spec(run_dir)
        self.settings = self.spec.serve
        self.task = Task.from_spec(self.spec.task)
        self.token = read_token(self.settings)
        check_exposure(host, self.token)
        self.student_store = student_store
        self.run = Path(run_dir).name
        self.reloaded_at = 0  # stamp of the latest store reload; sent with every request (module docstring)
        self._reload_lock = asyncio.Lock()

    def __serve_build_asgi_app__(self) -> FastAPI:
        api = FastAPI(
            title="retrikt",
            summary=f"{self.task.name} with the RetriKT student + knowledge store of run {self.run}",
            openapi_url=None,  # served below, behind the token
            docs_url=None,
            redoc_url=None,
            max_body_size=max_body_bytes(self.settings),
        )
        api.add_exception_handler(StarletteHTTPException, undecodable_body_is_malformed_json)
        api.add_api_route("/healthz", self.healthz, methods=["GET"])
        guarded = APIRouter(dependencies=[Depends(self.authorise)])
        guarded.add_api_route("/v1/info", self.info, methods=["GET"], response_model=Info)
        guarded.add_api_route(
            "/v1/classify",
            self.classify,
            methods=["POST"],
            response_model=ClassifyResponse,
            response_model_exclude_none=True,
            responses={413: {"description": "Over serve.max_inputs_per_request or serve.max_chars_per_input"}},
        )
        for path in ("/v1/admin/reload", "/v1/admin/reload-store"):
            guarded.add_api_route(
                path,
                self.reload,
                methods=["POST"],
                response_model=Reloaded,
                responses={409: {"description": "The current version cannot be served; the old one stays"}},
                include_in_schema=path == "/v1/admin/reload",
            )
        guarded.add_api_route(
            "/openapi.json", api.openapi, methods=["GET"], response_model=None, include_in_schema=False
        )
        api.include_router(guarded)
        return api

    async def authorise(self, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]) -> None:
        if self.token is None:
            return
        given = credentials.credentials if credentials else ""
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    async def healthz(self) -> dict:
        """Liveness; the only route without a token."""
        return {"status": "ok"}

    async def info(self) -> dict:
        """The task, its labels and input fields, the model ids, the store and the request limits."""
        store = await self.student_store.info.remote()
        return {
            "run": self.run,
            "task": self.task.name,
            "version": store["model_version"],
            "kind": self.task.kind,
            "labels": self.task.label_names,
            "input_fields": self.task.input_fields,
            "models": {
                "student": self.spec.student.model,
                "student_encoder": store["encoder"],
                "teacher": self.spec.teacher.model,
            },
            "store": {"rows": store["rows"], "version": store["version"], "index": store["index"]},
            "limits": {
                "max_inputs_per_request": self.settings.max_inputs_per_request,
                "max_chars_per_input": self.settings.max_chars_per_input,
            },
        }

    async def classify(self, request: ClassifyRequest) -> dict:
        """Classify the inputs with the student + store: per input the label and the probabilities."""
        try:
            check_limits(request.inputs, self.settings)
            examples = parse_inputs(self.task, request.inputs)
        except TooLarge as error:
            raise HTTPException(413, str(error)) from None
        except InputError as error:
            raise RequestValidationError(
                [{**problem, "loc": ("body", *problem["loc"])} for problem in error.errors]
            ) from None
        return await self.student_store.classify.remote(
            {"examples": examples, "neighbors": request.return_neighbors, "reloaded_at": self.reloaded_at}
        )

    async def reload(self) -> dict:
        """Load the run's current version (student and store) again; requests after this answer use it, none
        fails meanwhile."""
        async with self._reload_lock:
            stamp = max(time.time_ns(), self.reloaded_at + 1)
            outcome = await self.student_store.reload.remote(stamp)
            if "error" in outcome:
                raise HTTPException(409, f"not reloaded: {outcome['error']}")
            self.reloaded_at = stamp
        return {"run": self.run, **outcome}


def deployment_options(settings: ServeSpec) -> dict[str, dict]:
    """Serve options of both deployments, as `.options()` takes them and as a Serve config lists them."""
    return {
        INGRESS: {
            "num_replicas": 1,  # it holds the latest reload stamp
            # It forwards everything the StudentStore replicas can hold at once.
            "max_ongoing_requests": settings.max_replicas * settings.max_ongoing_requests,
            "ray_actor_options": {"num_cpus": settings.ingress_num_cpus},
        },
        STUDENT_STORE: {
            "autoscaling_config": {
                "min_replicas": settings.min_replicas,
                "max_replicas": settings.max_replicas,
                "target_ongoing_requests": settings.target_ongoing_requests,
            },
            "max_ongoing_requests": settings.max_ongoing_requests,
            "ray_actor_options": {"num_cpus": settings.num_cpus},
        },
    }


def build_app(args: dict) -> serve.Application:
    """The Serve application of a run; args: run_dir, and host (the proxy's, default serve.host).

    The import path `retrikt_ray.serve:build_app` of a Serve config file.
    """
    run_dir = str(Path(args["run_dir"]).resolve())
    settings = load_run_spec(run_dir).serve
    options = deployment_options(settings)
    student_store = StudentStore.options(**options[STUDENT_STORE]).bind(run_dir)
    return Ingress.options(**options[INGRESS]).bind(student_store, run_dir, args.get("host", settings.host))


def serve_config(run_dir, host: str, port: int) -> dict:
    """A Serve config file's content (for `serve deploy` or a RayService's serveConfigV2) for the run."""
    run_dir = Path(run_dir).resolve()
    options = deployment_options(load_run_spec(run_dir).serve)
    return {
        "http_options": {"host": host, "port": port},
        "applications": [
            {
                "name": APP_NAME,
                "route_prefix": "/",
                "import_path": IMPORT_PATH,
                "args": {"run_dir": str(run_dir), "host": host},
                "deployments": [{"name": name, **deployment} for name, deployment in options.items()],
            }
        ],
    }


# ------------------------------------------------------------------------------------ entry points
def start(run_dir, host: str, port: int) -> str:
    """Run the application on the connected Ray with Serve's HTTP proxy on host:port; returns its URL."""
    check_exposure(host, read_token(load_run_spec(run_dir).serve))
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app({"run_dir": run_dir, "host": host}), name=APP_NAME, route_prefix="/")
    return f"http://{host}:{port}"


def serve_until_interrupted(run_dir, host: str, port: int, address: str | None, log=print) -> None:
    """`retrikt serve`: start Ray (local, or join `address`), serve the run until Ctrl-C or SIGTERM, then remove
    it; a local Ray it started is shut down with all its processes (ray_session)."""
    from ray.serve.exceptions import RayServeException

    from .ray_session import ray_session, signal_name

    spec = load_run_spec(run_dir)
    check_exposure(host, read_token(spec.serve))  # before Ray starts
    spec.resources.address = address or spec.resources.address
    try:
        with ray_session(spec):  # SIGTERM raises KeyboardInterrupt in it, as Ctrl-C does
            try:
                url = start(run_dir, host, port)
                log(f"serving {run_dir} at {url} (schema: {url}/openapi.json); Ctrl-C stops")
                while True:
                    time.sleep(3600)
            finally:
                with contextlib.suppress(RayServeException):  # stopped before Serve started
                    serve.delete(APP_NAME)
    except KeyboardInterrupt as stop:
        log(f"stopped ({signal_name(stop)})")


def request_reload(run_dir, host: str, port: int, timeout: float = 600) -> dict:
    """`retrikt serve --reload`: ask the server on host:port to load the run's current version."""
    token = read_token(load_run_spec(run_dir).serve)
    connect = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{connect}:{port}/v1/admin/reload"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, method="POST", headers=headers), timeout=timeout
        ) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        raise SpecError(f"{url}: HTTP {error.code} {error.read().decode(errors='replace')[:300]}") from None
    except urllib.error.URLError as error:
        raise SpecError(f"{url}: no server answers ({error.reason})") from None


def predict_texts(run_dir, texts: list[str], neighbors: bool = False) -> list[dict]:
    """`retrikt predict`: results for texts (JSON objects of the task's fields for a multi-field task), no server."""
    predictor = Predictor.load(run_dir)
    fields = predictor.task.input_fields
    inputs = []
    for number, text in enumerate(texts, 1):
        if len(fields) == 1:
            inputs.append(text)
            continue
        try:
            inputs.append(json.loads(text))
        except json.JSONDecodeError:
            raise SpecError(
                f"input {number}: task {predictor.task.name} takes a JSON object with the fields {fields}"
            ) from None
    try:
        request = ClassifyRequest(inputs=inputs, return_neighbors=neighbors)
        examples = parse_inputs(predictor.task, request.inputs)
    except ValidationError as error:
        first = error.errors()[0]
        raise SpecError(f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    except InputError as error:
        raise SpecError(str(error)) from None
    return predictor.results(examples, [neighbors] * len(examples))
