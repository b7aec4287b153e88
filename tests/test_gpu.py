"""The GPU path, skipped without CUDA: the whole pipeline on tiny 2-layer models, every training stage under
DeepSpeed ZeRO-2 in bf16 on the GPU, the teacher in bf16 generating and annotating there through Ray Data."""

import pytest
import torch
from test_stages import manifest, run_logged, tiny_spec

from retrikt_ray import pipeline

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_the_pipeline_trains_in_bf16_on_the_gpu(ray_local, tiny_models, tmp_path):
    spec = tiny_spec(tiny_models, tmp_path, unlabelled__samples=16)
    spec.teacher.dtype = "bfloat16"
    spec.deepspeed.zero_stage, spec.deepspeed.precision = 2, "bf16"
    spec.resources.use_gpu, spec.resources.generation_replicas = True, 1
    run_dir, _ = run_logged(spec)
    assert [manifest(run_dir, name)["status"] for name in pipeline.STAGE_NAMES] == ["done"] * len(pipeline.STAGE_NAMES)
    for stage in ("prompt", "ppo", "student"):
        metrics = manifest(run_dir, stage)["metrics"]
        assert metrics["precision"] == "bf16" and all(device.startswith("cuda") for device in metrics["worker_devices"])
    assert manifest(run_dir, "unlabelled")["counts"]["annotated"] == 16
    assert 0.0 <= manifest(run_dir, "evaluate")["metrics"]["accuracy_student_store"] <= 1.0
