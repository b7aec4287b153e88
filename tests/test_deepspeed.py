"""DeepSpeed under Ray Train on CPU (gloo), real Ray, tiny 2-layer models.

On the shared pipeline run (conftest's `sst2_run`: 2 workers, ZeRO-2) every training stage's loss falls, both ranks
end with the same trainable weights, and each rank trained on different data. Then a worker of the
student stage, and one of the prompt stage, is killed by its pid and the stage resumes from its checkpoint, and a
`retrikt run` stopped by SIGTERM during PPO leaves none of its processes behind and resumes PPO at its saved update.
"""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import manifest, run_logged, still_running, tiny_spec

from retrikt_ray import pipeline
from retrikt_ray.training import RAY_TRAIN_POLL_ENV, RAY_TRAIN_PREEMPTION_ENV, TRAIN_STORAGE

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("stage", ["prompt", "ppo", "student"])
def test_two_ranks_stay_in_sync_on_different_data(sst2_run, stage):
    _, run_dir = sst2_run
    metrics = manifest(run_dir, stage)["metrics"]
    assert metrics["workers"] == 2
    digests = metrics["weights_digest"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert metrics["items_shared"] == 0
    assert all(count > 0 for count in metrics["items_seen"])
    assert metrics["worker_devices"] == ["cpu", "cpu"] and metrics["precision"] == "fp32"
    assert not (run_dir / stage / TRAIN_STORAGE).exists()


def test_every_training_stage_lowers_its_loss_under_zero2(sst2_run):
    _, run_dir = sst2_run
    prompt = manifest(run_dir, "prompt")["metrics"]["loss_per_epoch"]
    assert prompt[-1] < prompt[0]
    student = [entry["loss"] for entry in manifest(run_dir, "student")["metrics"]["history"]]
    assert student[-1] < student[0]
    ppo = [entry["value_loss"] for entry in manifest(run_dir, "ppo")["metrics"]["history"]]
    assert ppo[-1] < ppo[0]


def test_resolved_deepspeed_config_is_recorded(sst2_run):
    spec, run_dir = sst2_run
    config = yaml.safe_load((run_dir / "student" / "config.yaml").read_text())
    assert config["deepspeed"]["zero_stage"] == 2


def train_worker_pids() -> list[int]:
    import ray
    from ray.util.state import list_actors

    actors = list_actors(
        address=ray.get_runtime_context().gcs_address,
        filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
        raise_on_missing_output=False,
    )
    return [actor.pid for actor in actors]


def wait_for_checkpoint(storage: Path, deadline: float) -> None:
    """Until Ray Train has registered a checkpoint of the run (its snapshot lists one)."""
    while time.monotonic() < deadline:
        for snapshot in storage.glob("*/checkpoint_manager_snapshot.json"):
            try:
                if "checkpoint_" in snapshot.read_text():
                    return
            except OSError:
                pass
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint under {storage} in time")


def run_killing_a_worker(spec, stage: str, stage_dir: Path) -> None:
    """Run `stage` alone; once it has a checkpoint, kill one of its Ray Train workers by its pid."""
    outcome = {}
    runner = threading.Thread(target=lambda: outcome.update(lines=run_logged(spec, only=stage)[1]))
    runner.start()
    try:
        wait_for_checkpoint(stage_dir / TRAIN_STORAGE, time.monotonic() + 300)
        pids = train_worker_pids()
        assert pids, "no Ray Train worker alive"
        os.kill(pids[-1], signal.SIGKILL)
    finally:
        runner.join(timeout=600)
    assert "lines" in outcome, f"the {stage} stage did not finish after the worker was killed"


def test_the_local_rays_stages_train_with_the_report_poll_and_no_preemption_watcher(sst2_run):
    """training.fit hands Ray Train its settings: the controllers of the shared run's training stages were started
    with them, and the local Ray never started a preemption watcher."""
    import ray
    from ray.util.state import list_actors

    def actors(class_name: str) -> list:
        address = ray.get_runtime_context().gcs_address
        return list_actors(address=address, filters=[("class_name", "=", class_name)], detail=True, limit=10_000)

    controllers = actors("TrainController")
    assert len(controllers) >= 3  # prompt, ppo and student
    for controller in controllers:
        env_vars = json.loads(controller.serialized_runtime_env)["env_vars"]
        assert env_vars[RAY_TRAIN_POLL_ENV] == "0.25" and env_vars[RAY_TRAIN_PREEMPTION_ENV] == "0"
    assert actors("PreemptionWatcher") == []


def test_killed_worker_resumes_from_checkpoint(sst2_run, tmp_path):
    spec, run_dir = sst2_run
    spec = spec.model_copy(deep=True)
    spec.storage.runs_dir = str(tmp_path / "runs")
    copy = tmp_path / "runs" / run_dir.name
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("student", "evaluate"))
    run_killing_a_worker(spec, "student", copy / "student")

    resumed = manifest(copy, "student")["metrics"]
    uninterrupted = manifest(run_dir, "student")["metrics"]
    assert resumed["resumed_from_step"] and 0 < resumed["resumed_from_step"] < resumed["steps"]
    assert resumed["steps"] == uninterrupted["steps"]
    assert resumed["final_loss"] == pytest.approx(uninterrupted["final_loss"], rel=0.05, abs=0.02)


def test_killed_prompt_worker_resumes_where_it_was(ray_local, tiny_models, tmp_path):
    """Prompt tuning alone on one worker, 10 steps with a checkpoint every 4, twice: once uninterrupted, once with
    its worker killed after a checkpoint. The resumed stage (its PromptLoop restored: the examples' order and the
    generator that shuffles them, the losses, the RNG) ends with the losses and the soft prompt of the first."""
    from safetensors.torch import load_file

    from retrikt_ray.artifacts import run_dir_for

    spec = tiny_spec(tiny_models, tmp_path / "uninterrupted")
    spec.prompt.epochs = 5  # 8 examples (4 shots of each label), a batch of 4: two steps per epoch
    spec.resources.num_workers = 1
    spec.resources.checkpoint_every_steps = 4
    reference, _ = run_logged(spec, only="prompt")
    spec.storage.runs_dir = str(tmp_path / "killed")
    killed = run_dir_for(spec)
    run_killing_a_worker(spec, "prompt", killed / "prompt")

    resumed, uninterrupted = manifest(killed, "prompt")["metrics"], manifest(reference, "prompt")["metrics"]
    assert uninterrupted["resumed_from_step"] is None and uninterrupted["steps"] == 10
    assert 0 < resumed["resumed_from_step"] < resumed["steps"] == 10 and len(resumed["loss_per_epoch"]) == 5
    assert resumed["loss_per_epoch"] == pytest.approx(uninterrupted["loss_per_epoch"], abs=1e-5)
    prompts = [load_file(str(run / "prompt" / "soft_prompt.safetensors"))["soft_prompt"] for run in (killed, reference)]
    assert prompts[0].numpy() == pytest.approx(prompts[1].numpy(), abs=1e-5)


def test_interrupted_run_resumes_ppo_at_its_saved_update(sst2_run, tmp_path):
    """The shared run's job, with every stage but PPO copied in: `retrikt run` is stopped by SIGTERM (what
    systemd, Docker and Kubernetes send; it takes Ctrl-C's path) after PPO's first checkpoint. It says so in one
    line, exits 143 and leaves none of the processes it started running (its local Ray's daemons and agents, the
    Ray Train workers); the re-run resumes PPO there and ends with the prompt the uninterrupted run made."""
    import psutil
    from safetensors.torch import load_file

    spec, run_dir = sst2_run
    job = spec.model_dump(mode="json")
    job["storage"]["runs_dir"] = str(tmp_path / "runs")
    # Ray's own 2 s poll: each PPO checkpoint report then waits for it, which leaves the SIGTERM time to land
    # between the first checkpoint and the last. It is in no stage's hash, so the copied stages stay finished.
    job["resources"]["report_poll_s"] = 2.0
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    copy = tmp_path / "runs" / run_dir.name
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("ppo"))
    command = [sys.executable, "cli.py", "run", str(path)]

    first = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started = []
    try:
        deadline = time.monotonic() + 300
        while not (copy / "ppo").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        wait_for_checkpoint(copy / "ppo" / TRAIN_STORAGE, deadline)
        root = psutil.Process(first.pid)
        started = root.children(recursive=True)
        assert {"raylet", "ray::RayTrainWorker"} <= {process.name() for process in started}
        first.send_signal(signal.SIGTERM)
        _, stderr = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            for process in [*started, *psutil.Process(first.pid).children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    process.kill()
            first.kill()
    assert not (copy / "ppo" / "manifest.json").exists(), "PPO finished before it could be interrupted"
    assert first.returncode == 128 + signal.SIGTERM
    assert stderr.strip().splitlines()[-1] == (
        "error: stopped by SIGTERM; finished stages are kept, and running it again resumes"
    )
    assert still_running(started) == []

    second = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "[prompt] finished earlier, skipped" in second.stdout
    metrics = json.loads((copy / "ppo" / "manifest.json").read_text())["metrics"]
    assert 1 <= metrics["resumed_from_update"] < spec.ppo.updates
    assert [entry["update"] for entry in metrics["history"]] == list(range(spec.ppo.updates))
    resumed = load_file(str(copy / "ppo" / "soft_prompt.safetensors"))["soft_prompt"]
    uninterrupted = load_file(str(run_dir / "ppo" / "soft_prompt.safetensors"))["soft_prompt"]
    assert resumed.numpy() == pytest.approx(uninterrupted.numpy(), abs=1e-5)
    for stage in pipeline.STAGE_NAMES:
        assert json.loads((copy / stage / "manifest.json").read_text())["status"] == "done"
        assert f"[{stage}]" in second.stdout
    assert not (copy / "ppo" / TRAIN_STORAGE).exists()


def test_student_trains_under_zero3_in_bf16(sst2_run, tmp_path):
    """ZeRO-3 partitions the student over both ranks; bf16 training, float32 outputs."""
    from retrikt_ray.artifacts import run_dir_for
    from retrikt_ray.config import DeepSpeedSpec
    from retrikt_ray.knowledge_store import KnowledgeStore
    from retrikt_ray.retrieval_student import RetrievalStudent, encoder_fingerprint

    spec, run_dir = sst2_run
    spec = spec.model_copy(deep=True)
    spec.storage.runs_dir = str(tmp_path / "runs")
    spec.student.epochs = 4
    spec.student.deepspeed = DeepSpeedSpec(zero_stage=3, precision="bf16")
    copy = run_dir_for(spec)
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("student", "evaluate"))
    run_logged(spec, only="student")
    metrics = manifest(copy, "student")["metrics"]
    digests = metrics["weights_digest"]
    assert len(digests) == 2 and digests[0] == digests[1] and metrics["precision"] == "bf16"
    losses = [entry["loss"] for entry in metrics["history"]]
    assert losses[-1] < losses[0]
    student = RetrievalStudent.load(copy / "student" / "model")
    assert {parameter.dtype for parameter in student.parameters()} == {torch.float32}
    assert KnowledgeStore.load(copy / "student" / "store").encoder_fingerprint == encoder_fingerprint(student.encoder)
