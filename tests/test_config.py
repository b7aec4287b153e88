"""Job spec validation, overrides and the one-line errors users see."""

import subprocess
import sys
from pathlib import Path

import pytest

from retrikt_ray.config import JobSpec, SpecError, load_spec
from retrikt_ray.pipeline import plan

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, text, name="job.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_follow_method():
    spec = JobSpec()
    assert spec.data.shots == 16
    assert spec.prompt.num_virtual_tokens == 20
    assert (spec.ppo.alpha, spec.ppo.beta, spec.ppo.gamma, spec.ppo.kl_coef) == (1.0, 0.5, 1.0, 0.05)
    assert (spec.ppo.gae_lambda, spec.ppo.discount, spec.ppo.clip_eps, spec.ppo.top_p) == (0.95, 1.0, 0.2, 0.95)
    assert (spec.student.k, spec.student.tau, spec.student.lam, spec.student.a, spec.student.b) == (
        16,
        0.05,
        0.5,
        1.0,
        1.0,
    )
    assert (spec.student.tau_teacher, spec.student.tau_student) == (0.05, 0.05)
    assert spec.generate.near_duplicate_cosine == 0.95
    assert spec.store.exact_max_rows == 200_000


def test_demo_job_is_valid():
    spec = load_spec(REPO / "jobs" / "demo.yaml")
    assert spec.name == "demo" and spec.task.name == "sst2" and spec.data.shots == 16


@pytest.mark.parametrize(
    "text, message",
    [
        ("student:\n  lr: -1\n", "student.lr: Input should be greater than 0"),
        ("student:\n  learning_rate: 0.1\n", "student.learning_rate: unknown field"),
        ("ppo:\n  updates: many\n", "ppo.updates: Input should be a valid integer"),
        ("generate:\n  min_words: 9\n  max_words: 3\n", "generate: min_words is larger than max_words"),
        ("deepspeed:\n  zero_stage: 4\n", "deepspeed.zero_stage: Input should be 0, 1, 2 or 3"),
        (
            "deepspeed:\n  zero_stage: 2\n  offload_parameters: true\n",
            "deepspeed: offload_parameters needs zero_stage 3",
        ),
        (
            "ppo:\n  deepspeed:\n    offload_optimizer: true\n",
            "ppo.deepspeed: offload_optimizer needs zero_stage 1, 2 or 3",
        ),
        (
            "deepspeed:\n  zero_stage: 3\n  offload_optimizer: true\n",
            "deepspeed: offloading moves GPU memory to the CPU and needs resources.use_gpu: true",
        ),
        (
            "student:\n  deepspeed:\n    precision: fp16\n",
            "student.deepspeed.precision: fp16 needs GPUs (resources.use_gpu: true)",
        ),
        (
            "student:\n  deepspeed:\n    micro_batch_size: 1\n",
            "student.deepspeed.micro_batch_size: L_rank (student.b > 0) needs at least 2",
        ),
        (
            "prompt:\n  deepspeed:\n    config_file: /nowhere/ds.json\n",
            "prompt.deepspeed: config_file: file not found: /nowhere/ds.json",
        ),
        (
            "deepspeed:\n  config_file: ds.json\n  zero_stage: 2\n",
            "deepspeed: config_file is used as is: leave out zero_stage",
        ),
        ("name: 'bad name'\n", "name: String should match pattern"),
        ("resources:\n  gpus_per_replica: 2\n", "resources.gpus_per_replica: Input should be less than or equal to 1"),
    ],
)
def test_errors_name_the_field(tmp_path, text, message):
    with pytest.raises(SpecError) as error:
        load_spec(write(tmp_path, text))
    assert str(error.value).startswith(message)


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = write(tmp_path, "name: demo\nstudent:\n  lr: [1,\n")
    with pytest.raises(SpecError, match=rf"{path}:\d+: not valid YAML"):
        load_spec(path)


def test_overrides_reach_any_field(tmp_path):
    spec = load_spec(write(tmp_path, "name: x\n"), ["student.lr=0.001", "ppo.enabled=false", "task.name=rte"])
    assert spec.student.lr == 0.001 and spec.ppo.enabled is False and spec.task.name == "rte"
    with pytest.raises(SpecError, match="--set student: expected section.field=value"):
        load_spec(write(tmp_path, "name: x\n"), ["student"])
    with pytest.raises(SpecError, match="student.nope: unknown field"):
        load_spec(write(tmp_path, "name: x\n"), ["student.nope=1"])


def test_relative_data_paths_resolve_against_the_spec(tmp_path):
    (tmp_path / "d").mkdir()
    spec = load_spec(write(tmp_path / "d", "data:\n  train_file: train.jsonl\nunlabelled:\n  file: texts.jsonl\n"))
    assert spec.data.train_file == str(tmp_path / "d" / "train.jsonl")
    assert spec.unlabelled.file == str(tmp_path / "d" / "texts.jsonl")


def test_stage_hashes_change_only_downstream_of_the_change(tmp_path):
    base = JobSpec(name="h")
    before = {stage.name: stage.stage_hash for stage in plan(base, tmp_path)}

    def rerun(section: str, field: str, value) -> list[str]:
        """The stages whose hash a change of section.field gives another value."""
        changed = base.model_copy(deep=True)
        setattr(getattr(changed, section), field, value)
        after = {stage.name: stage.stage_hash for stage in plan(changed, tmp_path)}
        return [name for name in before if before[name] != after[name]]

    assert rerun("student", "lr", 1e-4) == ["student", "evaluate"]
    assert rerun("generate", "samples_per_label", 7) == ["generate", "store", "student", "evaluate"]
    assert rerun("teacher", "soft_label_temperature", 0.5) == ["generate", "unlabelled", "store", "student", "evaluate"]
    assert rerun("unlabelled", "samples", 100) == ["unlabelled", "store", "student", "evaluate"]
    # The world size sets a training stage's global batch and each worker's share of the data: the training
    # stages rerun, and the stages downstream of them (not unlabelled, which reads none of their outputs).
    assert rerun("resources", "num_workers", 4) == ["prompt", "ppo", "generate", "store", "student", "evaluate"]
    wider = base.model_copy(deep=True)
    wider.resources.num_workers = 4
    assert wider.spec_hash() != base.spec_hash()  # another run folder
    # Where and how fast the work runs, where runs are kept, how they are served, and batch sizes that change
    # speed only (config.NOT_RESULTS): no stage reruns, and the run folder is the same.
    moved = base.model_copy(deep=True)
    for section, field, value in [
        ("resources", "generation_replicas", 4),
        ("resources", "cpus_per_worker", 3.0),
        ("resources", "cpus_per_replica", 2.0),
        ("resources", "torch_threads", 2),
        ("resources", "placement", "spread"),
        ("resources", "max_failures", 3),
        ("resources", "checkpoint_every_steps", 5),
        ("resources", "checkpoint_every_updates", None),
        ("resources", "address", "auto"),
        ("storage", "runs_dir", "elsewhere"),
        ("serve", "port", 9000),
        ("generate", "batch_size", 7),
        ("teacher", "classify_batch_size", 5),
    ]:
        setattr(getattr(moved, section), field, value)
    assert {stage.name: stage.stage_hash for stage in plan(moved, tmp_path)} == before
    assert moved.spec_hash() == base.spec_hash()


def cli(*args, cwd=REPO):
    return subprocess.run(
        [sys.executable, "-m", "retrikt_ray.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_cli_validate_reports_one_line_and_exit_2(tmp_path):
    ok = cli("validate", "jobs/demo.yaml")
    assert ok.returncode == 0 and ok.stdout.startswith("ok: demo: task sst2")

    bad = cli("validate", str(write(tmp_path, "student:\n  lr: 0\n")))
    assert bad.returncode == 2
    assert bad.stderr.strip() == "error: student.lr: Input should be greater than 0"
    assert "Traceback" not in bad.stderr

    missing = cli("validate", str(tmp_path / "absent.yaml"))
    assert missing.returncode == 2 and missing.stderr.strip().endswith("absent.yaml: job spec not found")

    model = cli("validate", "jobs/demo.yaml", "--set", "student.model=no-such-encoder")
    assert model.returncode == 2 and model.stderr.startswith("error: student.model: unknown model 'no-such-encoder'")


def test_cli_validate_names_the_bad_data_line(tmp_path):
    data = tmp_path / "reviews.jsonl"
    rows = [f'{{"text": "review {i}", "stars": "{"good" if i % 2 else "bad"}"}}' for i in range(6)]
    rows[4] = '{"text": "a review with a typo", "stars": "goood"}'
    data.write_text("\n".join(rows) + "\n")
    job = write(
        tmp_path,
        f"""
task:
  name: reviews
  format: jsonl
  text_fields: [text]
  label_field: stars
  label_values: [bad, good]
  description: Short product reviews
data:
  train_file: {data}
  dev_file: {data}
  shots: 1
""",
    )
    result = cli("validate", str(job))
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {data}:5: ")
    assert len(result.stderr.strip().splitlines()) == 1

    # Unlabelled texts need no label field, but every row must carry the input fields.
    rows[4] = '{"text": "a review without typos", "stars": "good"}'
    data.write_text("\n".join(rows) + "\n")
    texts = tmp_path / "texts.jsonl"
    texts.write_text('{"text": "an unlabelled review"}\n{"body": "a field of another name"}\n')
    result = cli("validate", str(job), "--set", f"unlabelled.file={texts}")
    assert result.returncode == 2 and result.stderr.strip() == f"error: {texts}:2: missing field 'text'"
    texts.write_text('{"text": "an unlabelled review"}\n{"text": "another one", "stars": "unknown"}\n')
    assert cli("validate", str(job), "--set", f"unlabelled.file={texts}").returncode == 0


def test_cli_validate_asks_for_task_columns_when_the_first_line_is_data(tmp_path):
    data = tmp_path / "cola.tsv"  # GLUE's CoLA as distributed: source, label, original_label, sentence; no header
    data.write_text("gj04\t1\t\tOur friends won't buy this analysis.\ngj04\t0\t*\tThey drank the pub.\n")
    job = write(
        tmp_path,
        f"""
task:
  name: cola
  format: tsv
  text_fields: [sentence]
  label_field: label
  label_values: ["0", "1"]
  description: Sentences and whether they are grammatical
data:
  train_file: {data}
  dev_file: {data}
  shots: 1
""",
    )
    result = cli("validate", str(job))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {data}:1: the first line looks like data, not a header (no column 'sentence'): "
        "for a file without a header line, name its columns with task.columns"
    ]
    named = cli("validate", str(job), "--set", "task.columns=[source, label, original_label, sentence]")
    assert named.returncode == 0, named.stderr


def test_deepspeed_settings_become_a_complete_engine_config(tmp_path):
    from retrikt_ray.training import deepspeed_config

    spec = load_spec(
        write(
            tmp_path,
            "deepspeed: {zero_stage: 2, precision: bf16, gradient_accumulation_steps: 2}\n"
            "student:\n  deepspeed: {zero_stage: 1, micro_batch_size: 4}\nresources: {num_workers: 2}\n",
        )
    )
    prompt = deepspeed_config(spec, "prompt", batch_size=8)
    assert prompt["zero_optimization"] == {"stage": 2} and prompt["bf16"] == {"enabled": True}
    assert (
        prompt["train_micro_batch_size_per_gpu"],
        prompt["gradient_accumulation_steps"],
        prompt["train_batch_size"],
    ) == (8, 2, 32)
    assert prompt["optimizer"]["params"] == {"torch_adam": True}
    student = deepspeed_config(spec, "student", batch_size=32)  # its own section replaces the shared one
    assert student["zero_optimization"] == {"stage": 1} and student["bf16"] == {"enabled": False}
    assert (student["train_micro_batch_size_per_gpu"], student["train_batch_size"]) == (4, 8)


def test_ray_train_is_handed_the_report_poll_and_the_watcher_setting_unless_the_user_set_rays_variables(monkeypatch):
    """What Ray Train passes on to its controller and workers while a stage trains (its own function), with and
    without the user's variables; the preemption watcher is off on the local in-process Ray only."""
    from ray.train.v2._internal.constants import get_env_vars_to_propagate

    from retrikt_ray.tracking import environment
    from retrikt_ray.training import RAY_TRAIN_POLL_ENV, RAY_TRAIN_PREEMPTION_ENV, ray_train_environment

    def passed_on() -> dict[str, str]:
        ours = (RAY_TRAIN_POLL_ENV, RAY_TRAIN_PREEMPTION_ENV)
        return {name: value for name, value in get_env_vars_to_propagate().items() if name in ours}

    monkeypatch.delenv(RAY_TRAIN_POLL_ENV, raising=False)
    monkeypatch.delenv(RAY_TRAIN_PREEMPTION_ENV, raising=False)
    local = JobSpec().resources
    with environment(ray_train_environment(local), override=False):
        assert passed_on() == {RAY_TRAIN_POLL_ENV: "0.25", RAY_TRAIN_PREEMPTION_ENV: "0"}
    assert passed_on() == {}
    cluster = local.model_copy(update={"address": "auto"})
    with environment(ray_train_environment(cluster), override=False):
        assert passed_on() == {RAY_TRAIN_POLL_ENV: "0.25"}
    monkeypatch.setenv(RAY_TRAIN_POLL_ENV, "5")
    monkeypatch.setenv(RAY_TRAIN_PREEMPTION_ENV, "1")
    with environment(ray_train_environment(local), override=False):
        assert passed_on() == {RAY_TRAIN_POLL_ENV: "5", RAY_TRAIN_PREEMPTION_ENV: "1"}


def test_deepspeed_json_file_is_used_as_is_and_hashed_by_content(tmp_path):
    from retrikt_ray.training import deepspeed_config

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "ds.json").write_text('{"zero_optimization": {"stage": 3}, "gradient_accumulation_steps": 4}')
    spec = load_spec(write(tmp_path / "d", "deepspeed:\n  config_file: ds.json\n"))
    assert spec.deepspeed.config_file == str(tmp_path / "d" / "ds.json")
    config = deepspeed_config(spec, "ppo", batch_size=8)
    assert config["zero_optimization"] == {"stage": 3} and "optimizer" not in config
    assert (
        config["train_micro_batch_size_per_gpu"],
        config["gradient_accumulation_steps"],
        config["train_batch_size"],
    ) == (8, 4, 32)
    before = {stage.name: stage.stage_hash for stage in plan(spec, tmp_path)}
    (tmp_path / "d" / "ds.json").write_text('{"zero_optimization": {"stage": 2}}')
    after = {stage.name: stage.stage_hash for stage in plan(spec, tmp_path)}
    assert [name for name in before if before[name] != after[name]] == [
        "prompt",
        "ppo",
        "generate",
        "store",
        "student",
        "evaluate",
    ]
    (tmp_path / "d" / "ds.json").write_text('{"zero_optimization": ')
    with pytest.raises(SpecError, match=r"deepspeed: config_file: .*ds.json is not valid JSON \(line 1\)"):
        load_spec(tmp_path / "d" / "job.yaml")


def test_the_configuration_reference_is_generated_from_the_spec():
    """docs/configuration.md is what `python -m retrikt_ray.config_reference` writes: it lists every field."""
    from retrikt_ray.config_reference import reference

    committed = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    assert committed == reference(), "regenerate: python -m retrikt_ray.config_reference > docs/configuration.md"
    for section, field in JobSpec.model_fields.items():
        if hasattr(field.annotation, "model_fields"):
            for name in field.annotation.model_fields:
                assert f"| `{name}` |" in committed, f"{section}.{name}"
