"""The GPU path, skipped without CUDA: the whole pipeline on tiny 2-layer models, every training stage under
DeepSpeed ZeRO-2 in bf16 on the GPU, two teacher replicas in bf16 sharing the GPU (half each) to generate and
annotate through Ray Data. On a machine without the packaged models: `pytest tests/test_gpu.py --tiny-models DIR`
with DIR built elsewhere by `build_tiny_models` (tests/conftest.py)."""

import pytest
import torch
from helpers import manifest, run_logged, tiny_spec

from retrikt_ray import pipeline

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_the_pipeline_trains_in_bf16_on_the_gpu(ray_local, tiny_models, tmp_path):
    spec = tiny_spec(tiny_models, tmp_path, unlabelled__samples=16)
    spec.teacher.dtype = "bfloat16"
    spec.deepspeed.zero_stage, spec.deepspeed.precision = 2, "bf16"
    spec.resources.use_gpu, spec.resources.generation_replicas, spec.resources.gpus_per_replica = True, 2, 0.5
    spec.resources.placement = "spread"  # a fixed pool: both replicas start before any work is handed out
    run_dir, _ = run_logged(spec)
    assert [manifest(run_dir, name)["status"] for name in pipeline.STAGE_NAMES] == ["done"] * len(pipeline.STAGE_NAMES)
    for stage in ("prompt", "ppo", "student"):
        metrics = manifest(run_dir, stage)["metrics"]
        assert metrics["precision"] == "bf16" and all(device.startswith("cuda") for device in metrics["worker_devices"])
    generated = manifest(run_dir, "generate")["metrics"]
    assert generated["replicas"] == 2 and generated["replica_devices"] == ["cuda:0"]
    assert manifest(run_dir, "unlabelled")["counts"]["annotated"] == 16
    assert 0.0 <= manifest(run_dir, "evaluate")["metrics"]["accuracy_student_store"] <= 1.0
