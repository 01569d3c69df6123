"""kvtier.models: the atomic SmolLM2 conversion, random configs, and errors that name the problem."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvtier import models
from kvtier.models import ModelLoadError, load_model


def test_random_models_are_deterministic_and_named() -> None:
    a, b = load_model("random:tiny"), load_model("random:tiny")
    assert a.model_id == b.model_id == "random:tiny@seed0"
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(pa, pb)
    qwen = load_model("random:qwen2-tiny").model
    assert qwen.config.model_type == "qwen2"


def test_bad_specs_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="unknown random model 'nope'"):
        load_model("random:nope")
    with pytest.raises(ModelLoadError, match="local Hugging Face model directory"):
        load_model(str(tmp_path / "missing"))


def test_conversion_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A conversion that dies half-way leaves neither the target nor a temp dir behind."""
    import safetensors.torch
    import transformers

    tiny = load_model("random:tiny")
    monkeypatch.setattr(models, "find_smollm2_gguf", lambda: tmp_path / "fake.gguf")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: tiny.model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: tiny.tokenizer)

    def boom(*a: object, **k: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_model", boom)
    target = tmp_path / "models" / "smol"
    with pytest.raises(OSError, match="disk full"):
        models.convert_smollm2(target)
    assert not target.exists()
    assert list((tmp_path / "models").iterdir()) == []

    monkeypatch.undo()
    monkeypatch.setattr(models, "find_smollm2_gguf", lambda: tmp_path / "fake.gguf")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: tiny.model)
    if tiny.tokenizer is not None:
        monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: tiny.tokenizer)
        models.convert_smollm2(target)
        assert (target / "model.safetensors").is_file() and (target / "config.json").is_file()
        assert [p.name for p in (tmp_path / "models").iterdir()] == ["smol"]


def test_cache_dir_honours_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVTIER_CACHE_DIR", str(tmp_path))
    assert models.cache_dir() == tmp_path
    monkeypatch.delenv("KVTIER_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_dir() == tmp_path / "xdg" / "kvtier"
