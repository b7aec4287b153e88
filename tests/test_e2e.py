"""End to end: the real `retrikt` CLI on the packaged models (SmolLM2-135M-Instruct, MiniLM) with tiny
budgets, on its own in-process Ray. Asserts the artifact tree, metrics in range, and that a second
run skips every stage."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGES = ["prompt", "ppo", "generate", "unlabelled", "store", "student", "evaluate"]
EXPECTED_FILES = {
    "prompt": ["soft_prompt.safetensors", "adapter/adapter_config.json"],
    "ppo": ["soft_prompt.safetensors", "value_head.safetensors", "ppo_curves.png"],
    "generate": ["samples.parquet"],
    "unlabelled": ["samples.parquet"],
    "store": ["rows.parquet", "keys.npy", "index.faiss", "store.json"],
    "student": ["model/student.json", "model/encoder/config.json", "store/index.faiss", "store/store.json"],
    "evaluate": ["predictions.parquet"],
}

TINY_JOB = """
name: e2e
task: {name: sst2}
data: {shots: 4, dev_limit: 48}
prompt: {epochs: 2, batch_size: 4}
ppo: {updates: 1, rollouts_per_update: 4, ppo_epochs: 1, minibatch_size: 4, max_new_tokens: 20,
      eval_samples_per_label: 4}
generate: {samples_per_label: 24, batch_size: 12, rows_per_task: 12, max_new_tokens: 32}
student: {epochs: 1, batch_size: 16, gold_per_batch: 4}
evaluate: {latency_examples: 4}
resources: {num_workers: 1, cpus_per_worker: 2, cpus_per_replica: 1}
storage: {runs_dir: RUNS}
"""


def retrikt(*args):
    return subprocess.run([sys.executable, "cli.py", *args], cwd=REPO, capture_output=True, text=True, timeout=1200)


@pytest.mark.e2e
def test_run_end_to_end_then_skip_then_show(tmp_path):
    job = tmp_path / "e2e.yaml"
    job.write_text(TINY_JOB.replace("RUNS", str(tmp_path / "runs")))

    first = retrikt("run", str(job))
    assert first.returncode == 0, first.stderr[-3000:]
    (run_dir,) = [path for path in (tmp_path / "runs").iterdir() if (path / "job.yaml").is_file()]  # not mlflow/
    assert (run_dir / "job.yaml").is_file()
    for stage in STAGES:
        manifest = json.loads((run_dir / stage / "manifest.json").read_text())
        assert manifest["status"] == "done"
        assert (run_dir / stage / "config.yaml").is_file()
        for name in EXPECTED_FILES[stage]:
            assert (run_dir / stage / name).is_file(), f"{stage}/{name}"
        assert f"[{stage}]" in first.stdout

    metrics = json.loads((run_dir / "evaluate" / "manifest.json").read_text())["metrics"]
    for key in (
        "accuracy_student_store",
        "accuracy_student_head",
        "accuracy_teacher_zero_shot",
        "macro_f1_student_store",
    ):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["dev_examples"] == 48
    # The packaged teacher is far better than chance on SST-2 even on 48 examples.
    assert metrics["accuracy_teacher_zero_shot"] >= 0.6
    assert metrics["params_teacher"] > 100_000_000 and 20_000_000 < metrics["params_student"] < 30_000_000

    second = retrikt("run", str(job))
    assert second.returncode == 0, second.stderr[-3000:]
    assert [line for line in second.stdout.splitlines() if "finished earlier, skipped" in line] == [
        f"[{stage}] finished earlier, skipped" for stage in STAGES
    ]

    shown = retrikt("show", str(run_dir))
    assert shown.returncode == 0
    for stage in STAGES:
        assert stage in shown.stdout


def test_show_rejects_a_folder_that_is_not_a_run(tmp_path):
    result = retrikt("show", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {tmp_path}: not a run directory (no job.yaml)"
