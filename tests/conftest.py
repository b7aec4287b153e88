"""Shared fixtures: one local Ray per test session, and tiny models (2 layers) built from configs."""

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def ray_local():
    import ray
    from helpers import start_ray

    start_ray()
    yield
    ray.shutdown()


def pytest_addoption(parser):
    parser.addoption(
        "--tiny-models",
        metavar="DIR",
        help="use the tiny models saved in DIR by build_tiny_models (for a machine without the packaged models)",
    )


def build_tiny_models(root: Path) -> dict[str, str]:
    """A 2-layer Llama teacher (SmolLM2's tokenizer) and a 2-layer BERT student (MiniLM's tokenizer), saved under
    root."""
    from transformers import AutoTokenizer, BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    from retrikt_ray.models import student_path, teacher_path

    root = Path(root)
    torch.manual_seed(0)
    teacher_tokenizer = AutoTokenizer.from_pretrained(teacher_path("smollm2-135m-instruct", Path("~/.cache/retrikt")))
    teacher = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(teacher_tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=True,
            eos_token_id=teacher_tokenizer.eos_token_id,
        )
    )
    teacher.save_pretrained(root / "teacher")
    teacher_tokenizer.save_pretrained(root / "teacher")
    student_tokenizer = AutoTokenizer.from_pretrained(student_path("all-minilm-l6-v2"))
    student = BertModel(
        BertConfig(
            vocab_size=len(student_tokenizer),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=128,
        )
    )
    student.save_pretrained(root / "student")
    student_tokenizer.save_pretrained(root / "student")
    return {"teacher": str(root / "teacher"), "student": str(root / "student")}


@pytest.fixture(scope="session")
def tiny_models(request, tmp_path_factory) -> dict[str, str]:
    saved = request.config.getoption("--tiny-models")
    if saved:
        saved = Path(saved).resolve()  # Ray workers run in folders of their own
        return {"teacher": str(saved / "teacher"), "student": str(saved / "student")}
    return build_tiny_models(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture(scope="session")
def sst2_run(ray_local, tiny_models, tmp_path_factory):
    """The tiny SST-2 pipeline, run once per session and shared by the stage tests and the DeepSpeed
    tests: 2 Ray Train workers under DeepSpeed ZeRO-2, checkpointing every few steps."""
    from helpers import run_logged, tiny_spec

    spec = tiny_spec(tiny_models, tmp_path_factory.mktemp("runs"))
    spec.deepspeed.zero_stage = 2
    spec.resources.num_workers = 2
    spec.resources.cpus_per_worker = 0.5
    spec.resources.checkpoint_every_steps = 4
    spec.resources.checkpoint_every_updates = 1
    spec.ppo.updates = 3
    spec.ppo.lr = 0.05
    # The tests of this run check how PPO moves the prompt, so it always passes on its final prompt.
    spec.ppo.keep_stage1_when_worse = False
    # Long enough (20 steps) for the fault test to kill a worker between checkpoints.
    spec.student.epochs = 20
    spec.unlabelled.samples = 6
    run_dir, _ = run_logged(spec)
    return spec, run_dir
