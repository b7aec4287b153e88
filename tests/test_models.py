"""Model resolution: the packaged GGUF teacher converts to a plain model with the same outputs."""

from pathlib import Path

import pytest
import torch

from retrikt_ray.models import ModelNotFound, check_model_name, load_encoder, load_teacher, student_path, teacher_path

CACHE = Path("~/.cache/retrikt")


def test_converted_teacher_matches_the_gguf_and_is_trainable(tmp_path):
    from transformers import AutoModelForCausalLM

    from retrikt_ray.models import PACKAGED_TEACHERS, _package_folder

    module, gguf_name = PACKAGED_TEACHERS["smollm2-135m-instruct"]
    quantized = AutoModelForCausalLM.from_pretrained(_package_folder(module), gguf_file=gguf_name, dtype=torch.float32)
    model, tokenizer = load_teacher("smollm2-135m-instruct", CACHE)
    assert getattr(model.config, "quantization_config", None) is None
    ids = tokenizer("The movie was a delight from start to finish.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, quantized(ids).logits, atol=1e-4)
    assert (Path(teacher_path("smollm2-135m-instruct", CACHE)) / "model.safetensors").is_file()
    assert not any(parameter.requires_grad for parameter in model.parameters())  # load_teacher freezes it
    # What the GGUF model cannot do: once unfrozen, an optimizer step moves weights and lowers the loss, and the
    # trained model saves and loads back with those weights.
    model.train()
    model.requires_grad_(True)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert all(parameter.grad is not None for parameter in model.parameters())
    before = model.model.norm.weight.detach().clone()
    optimizer.step()
    assert not torch.equal(model.model.norm.weight, before)
    model.eval()
    with torch.no_grad():
        trained_logits = model(ids).logits
        assert model(ids, labels=ids).loss < loss
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert getattr(reloaded.config, "quantization_config", None) is None
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, trained_logits, atol=1e-5)


def test_packaged_student_loads():
    encoder, tokenizer = load_encoder("all-minilm-l6-v2")
    assert sum(p.numel() for p in encoder.parameters()) == 22_713_216
    assert Path(student_path("all-minilm-l6-v2")).is_dir()


def test_model_names_are_checked_without_loading(tmp_path):
    check_model_name("smollm2-135m-instruct")
    check_model_name("org/some-model")  # a hub id: resolved when loaded
    with pytest.raises(ModelNotFound, match="unknown model 'tiny'"):
        check_model_name("tiny")
    with pytest.raises(ModelNotFound, match="folder without config.json"):
        check_model_name(str(tmp_path))
