"""The stage contract: what a stage is, declared once in its module as `STAGE = Stage(...)`.

A stage's hash (pipeline.plan) covers the config it reads, the bytes of the data files it reads and its
inputs' hashes. The config is hashed by exclusion, as distilabel's signatures are: a section named in `reads`
counts whole, less the fields `config.NOT_RESULTS` lists with the reason they do not change results, so a
field added to a section a stage reads is hashed by default. A field path (`student.model`) takes a few fields
of another stage's section. A training stage (Ray Train workers under DeepSpeed) also reads the shared
`deepspeed` section, its DeepSpeed config file and the world size `resources.num_workers`, which sets the
global batch (training.deepspeed_config), the steps of an epoch, each rank's share of the data and, in PPO,
of the rollouts and their seeds.

tests/test_stage_contract.py runs every stage with its spec wrapped in `SpecReads`, which records the path of
every field the stage's code reads (in its Ray workers too, through `worker_spec`), and fails on a read that
neither a hash covers nor NOT_RESULTS or the stage's `ignores` excuse.
"""

from __future__ import annotations

import os
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from .config import JobSpec, not_results, results_only

if TYPE_CHECKING:
    from .artifacts import StageResult, StageRun

# What a training stage reads beyond its own `reads`: the shared DeepSpeed settings and the world size.
TRAINING_READS = ("deepspeed", "resources.num_workers")
# The retrieval settings RetrievalStudent.from_spec reads: unused where a stage's student only embeds (`ignores`).
EMBEDDING_ONLY = {
    path: "a retrieval setting of the untrained student, which only embeds in this stage"
    for path in ("student.k", "student.tau", "student.lam")
}
# The data files a stage may read: the labelled pool, the dev split, `unlabelled.file` (when set).
DATA_FILES = ("train", "dev", "unlabelled")
# The key of a recorded spec's dump that names the folder its Ray workers record their reads in (`worker_spec`).
RECORD_READS_KEY = "__record_reads_to__"


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + ".")


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: its name, the stages whose outputs it reads, the config and data files it reads,
    whether it trains in Ray Train workers under DeepSpeed, and `run(spec, stage_run) -> StageResult`."""

    name: str
    run: Callable[[JobSpec, StageRun], StageResult]
    inputs: tuple[str, ...] = ()
    reads: tuple[str, ...] = ()  # config sections (whole, less config.NOT_RESULTS) or field paths
    files: tuple[str, ...] = ()  # of DATA_FILES
    trains: bool = False
    # Fields its code reads that change none of its results, each with the reason (NOT_RESULTS: for every stage).
    ignores: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self):
        for role, paths in (("reads", self.reads), ("ignores", self.ignores)):
            for path in paths:
                try:
                    JobSpec().lookup(path)
                except (KeyError, TypeError):
                    raise ValueError(f"stage {self.name}: {role} '{path}', which is not a job spec field") from None
        for path in self.reads:
            if not_results(path) is not None:
                raise ValueError(f"stage {self.name}: reads '{path}', which config.NOT_RESULTS says changes no result")
        for path in self.ignores:
            if self.hashes(path):
                raise ValueError(f"stage {self.name}: ignores '{path}', which its hash covers")
        unknown = set(self.files) - set(DATA_FILES)
        if unknown:
            raise ValueError(f"stage {self.name}: unknown data files {sorted(unknown)} (one of {DATA_FILES})")
        if self.trains and self.name not in JobSpec.training_sections():
            raise ValueError(
                f"stage {self.name}: a training stage needs a job spec section of its name with `deepspeed`"
            )

    @property
    def hashed(self) -> tuple[str, ...]:
        """The config paths in the stage's hash."""
        return self.reads + (TRAINING_READS if self.trains else ())

    def config(self, spec: JobSpec) -> dict[str, Any]:
        """The resolved config the stage reads, as its run folder's config.yaml records it."""
        return {path: spec.lookup(path) for path in self.hashed}

    def hashed_config(self, spec: JobSpec) -> dict[str, Any]:
        """`config` less the fields that change no result: what the stage's hash covers."""
        return {path: results_only(path, value) for path, value in self.config(spec).items()}

    def data_files(self, spec: JobSpec, train: str | os.PathLike, dev: str | os.PathLike) -> list[Path]:
        """The files whose bytes the stage's hash covers; `train`, `dev`: the job's resolved data files."""
        files = [Path(train)] if "train" in self.files else []
        files += [Path(dev)] if "dev" in self.files else []
        if "unlabelled" in self.files and spec.unlabelled.file is not None:
            files.append(Path(spec.unlabelled.file))
        if self.trains and spec.deepspeed_for(self.name).config_file is not None:
            files.append(Path(spec.deepspeed_for(self.name).config_file))
        return files

    def excuse(self, path: str) -> str | None:
        """Why reading the field at `path` changes none of the stage's results (NOT_RESULTS, `ignores`), or None."""
        reason = not_results(path)
        return reason or next((why for ignored, why in self.ignores.items() if _under(path, ignored)), None)

    def hashes(self, path: str) -> bool:
        """Whether the field at `path` (or a field under it, for a section) is in the stage's own hash."""
        if not_results(path) is not None:
            return False
        return any(_under(path, hashed) or _under(hashed, path) for hashed in self.hashed)


# ------------------------------------------------------------------------------------ recording reads
class SpecReads:
    """A job spec, or one of its sections, that records the dotted path of every field read through it.

    A section read as a whole (`model_dump`, `model_copy`, ...) records the section. The whole spec's
    `model_dump` is not recorded: stages dump it to hand it to their Ray workers, whose own reads are recorded
    there (`worker_spec`) when the recorder has a folder, which the dump then carries. The spec's methods
    (`deepspeed_for`) run on the recorder, so what they read is recorded too.
    """

    __slots__ = ("_target", "_record", "_path", "_folder")

    def __init__(self, target: BaseModel, record: Callable[[str], None], path: str = "", folder: str | None = None):
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_record", record)
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_folder", folder)

    def __getattr__(self, name: str):
        target, path = self._target, self._path
        value = getattr(target, name)
        if name in type(target).model_fields:
            child = f"{path}.{name}" if path else name
            if isinstance(value, BaseModel):
                return SpecReads(value, self._record, child)
            self._record(child)
            return value
        if hasattr(BaseModel, name):
            if path:
                self._record(path)
            elif name == "model_dump" and self._folder is not None:
                return lambda *args, **kwargs: {**value(*args, **kwargs), RECORD_READS_KEY: self._folder}
            return value
        method = getattr(type(target), name, None)
        if isinstance(method, types.FunctionType):
            return types.MethodType(method, self)
        return value

    def __setattr__(self, name: str, value) -> None:
        raise AttributeError(f"a stage does not change its job spec ({self._path or 'spec'}.{name})")

    def __repr__(self) -> str:
        return f"SpecReads({self._path or 'spec'})"


def recording(spec: JobSpec, reads: set[str], folder: str | os.PathLike | None = None) -> JobSpec:
    """`spec` behind a recorder that adds every field path read through it to `reads`; with a folder, the Ray
    workers it is handed to record theirs in files there (`recorded_reads`)."""
    return SpecReads(spec, reads.add, folder=None if folder is None else str(folder))  # type: ignore[return-value]


class _ReadsFile:
    """Appends each path read, once, as a line of this process's file in the folder (lines this short are
    written whole even when several processes append)."""

    def __init__(self, folder: str):
        self.path = Path(folder) / f"reads-{os.getpid()}.txt"
        self.seen: set[str] = set()

    def __call__(self, path: str) -> None:
        if path not in self.seen:
            self.seen.add(path)
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(path + "\n")


def worker_spec(payload: dict) -> JobSpec:
    """The job spec in a Ray worker or replica, from the driver's dump of it (files it names were read on the
    driver; this node may lack them). A recorder's dump names a folder: the worker records its reads there."""
    payload = dict(payload)
    folder = payload.pop(RECORD_READS_KEY, None)
    spec = JobSpec.model_validate(payload, context={"in_worker": True})
    return spec if folder is None else SpecReads(spec, _ReadsFile(folder))  # type: ignore[return-value]


def recorded_reads(folder: str | os.PathLike) -> set[str]:
    """The paths the workers recorded in the folder."""
    return {line for path in Path(folder).glob("reads-*.txt") for line in path.read_text().split() if line}
