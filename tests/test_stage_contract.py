"""The stage contract (retrikt_ray/stage_contract.py) against what the stages' code reads.

Every stage of a tiny SST-2 run (tiny models, one worker, tiny budgets, its optional paths on) runs with its job
spec behind a recorder of the field paths read through it: in the driver directly, and in the stage's Ray Train
workers, generation and annotation replicas through `stage_contract.worker_spec`, which records in files of the
folder that the recorded spec's dump names. A field a stage reads must be in its hash (its own, or an input's,
which its hash includes), or in config.NOT_RESULTS or the stage's `ignores` with the reason it changes no result.
"""

import pytest
from helpers import tiny_spec

from retrikt_ray import pipeline
from retrikt_ray.artifacts import run_dir_for
from retrikt_ray.config import NOT_RESULTS, JobSpec, ResourcesSpec, not_results
from retrikt_ray.stage_contract import Stage, recorded_reads, recording

CONTRACTS = {stage.name: stage for stage in pipeline.STAGES}


def in_hash(stage: Stage, path: str) -> bool:
    """Whether the stage's hash covers the field: its own config, or an input's hash (transitively)."""
    return stage.hashes(path) or any(in_hash(CONTRACTS[name], path) for name in stage.inputs)


def uncovered(stage: Stage, reads: set[str]) -> list[str]:
    """The fields read that the stage's hash does not cover and neither NOT_RESULTS nor its `ignores` excuse."""
    return sorted(path for path in reads if stage.excuse(path) is None and not in_hash(stage, path))


def contract_spec(tiny_models, runs_dir) -> JobSpec:
    """The tiny job with every optional path a field steers taken, at the smallest budgets."""
    spec = tiny_spec(tiny_models, runs_dir)
    spec.data.dev_limit = 8
    spec.prompt.epochs = 1
    spec.ppo.updates = 1
    spec.generate.samples_per_label = 6
    spec.unlabelled.samples = 4
    spec.store.fraction = 0.9
    spec.student.epochs = 1
    spec.student.rank_lists = "store"
    spec.evaluate.latency_examples = 2
    spec.resources.checkpoint_every_steps = 1
    spec.resources.checkpoint_every_updates = 1
    return spec


@pytest.fixture(scope="module")
def stage_reads(ray_local, tiny_models, tmp_path_factory) -> dict[str, set[str]]:
    """The fields each stage read, in the driver and in its Ray workers together."""
    folder = tmp_path_factory.mktemp("reads")
    spec = contract_spec(tiny_models, tmp_path_factory.mktemp("runs"))
    reads = {}
    for stage_run in pipeline.plan(spec, run_dir_for(spec)):
        driver: set[str] = set()
        stage_run.prepare()
        stage_run.finish(CONTRACTS[stage_run.name].run(recording(spec, driver, folder), stage_run), 0.0)
        reads[stage_run.name] = driver | recorded_reads(folder)
        for path in folder.iterdir():
            path.unlink()
    return reads


def test_every_field_a_stage_reads_is_in_its_hash_or_changes_no_result(stage_reads):
    assert set(stage_reads) == set(pipeline.STAGE_NAMES)
    missing = {name: uncovered(CONTRACTS[name], reads) for name, reads in stage_reads.items()}
    assert missing == {name: [] for name in stage_reads}, (
        "fields read but in no hash: add them to the stage's STAGE.reads, "
        "or to config.NOT_RESULTS (or its STAGE.ignores) with the reason they change no result"
    )


def test_the_recording_sees_what_the_workers_read(stage_reads):
    """Fields that only the Ray Train loops, the generation replicas and the annotation replicas read."""
    assert {"prompt.lr", "prompt.max_length", "prompt.init_from_description"} <= stage_reads["prompt"]
    assert {"ppo.clip_eps", "ppo.gae_lambda", "generate.min_words"} <= stage_reads["ppo"]
    assert {"student.tau_teacher", "student.rank_list_size", "student.gold_per_batch"} <= stage_reads["student"]
    assert {"generate.top_k", "generate.batch_size", "teacher.hidden_layer"} <= stage_reads["generate"]
    assert {"teacher.hidden_layer", "teacher.state"} <= stage_reads["unlabelled"]
    assert "generate.seed" in stage_reads["store"]  # store.fraction < 1 draws with it


def test_a_read_that_no_hash_covers_is_caught(stage_reads):
    # The student stage as if it declared only the student's model: its loop reads the learning rates.
    narrow = Stage(name="student", run=CONTRACTS["student"].run, inputs=("store",), reads=("student.model",))
    assert {"student.lr", "student.head_lr", "student.epochs"} <= set(uncovered(narrow, stage_reads["student"]))
    # A stage that reads a field of a section it does not declare.
    reads: set[str] = set()
    spec = recording(JobSpec(), reads)
    assert spec.deepspeed_for("ppo").zero_stage == 0 and spec.evaluate.batch_size == 64
    assert reads == {"ppo.deepspeed", "deepspeed.zero_stage", "evaluate.batch_size"}
    store = Stage(name="store", run=CONTRACTS["store"].run, reads=("store",))
    assert uncovered(store, reads) == ["deepspeed.zero_stage", "evaluate.batch_size", "ppo.deepspeed"]


def test_every_field_of_a_section_a_stage_reads_is_hashed(tmp_path):
    """Every field changes the hash of each stage that covers it, and of no other stage: sections are hashed
    whole, less NOT_RESULTS."""
    base = JobSpec(name="h")
    before = {stage.name: stage.stage_hash for stage in pipeline.plan(base, tmp_path)}
    for path in ("student.weight_decay", "generate.near_duplicate_cosine", "teacher.soft_label_temperature"):
        section, field = path.split(".")
        changed = base.model_copy(deep=True)
        setattr(getattr(changed, section), field, 0.5)
        after = {stage.name: stage.stage_hash for stage in pipeline.plan(changed, tmp_path)}
        assert {name for name in before if before[name] != after[name]} == {
            name for name, stage in CONTRACTS.items() if in_hash(stage, path)
        }, path


def test_every_field_that_changes_no_result_exists_and_says_why():
    for path, reason in NOT_RESULTS.items():
        JobSpec().lookup(path)
        assert len(reason.split()) >= 3, path
    # Of where the work runs, only the world size changes results: it is in the training stages' hashes.
    assert [name for name in ResourcesSpec.model_fields if not_results(f"resources.{name}") is None] == ["num_workers"]
    assert [stage.name for stage in pipeline.STAGES if stage.hashes("resources.num_workers")] == [
        "prompt",
        "ppo",
        "student",
    ]


def test_contracts_are_checked_when_declared():
    assert {stage.name for stage in pipeline.STAGES if stage.trains} == set(JobSpec.training_sections())
    with pytest.raises(ValueError, match="a training stage needs a job spec section of its name"):
        Stage(name="store", run=CONTRACTS["store"].run, trains=True)
    with pytest.raises(ValueError, match="which config.NOT_RESULTS says changes no result"):
        Stage(name="generate", run=CONTRACTS["generate"].run, reads=("generate.batch_size",))
    with pytest.raises(ValueError, match="not a job spec field"):
        Stage(name="generate", run=CONTRACTS["generate"].run, reads=("generate.no_such_field",))
    with pytest.raises(ValueError, match="ignores 'student.k', which its hash covers"):
        Stage(name="student", run=CONTRACTS["student"].run, reads=("student",), ignores={"student.k": "unused"})
