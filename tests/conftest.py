"""Shared fixtures: tiny checkpoints on disk and offline hub settings."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.tiny_models import save_tiny  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` are skipped where torch sees no CUDA GPU (the CPU suite stays green)."""
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu:
        return
    import torch  # noqa: PLC0415

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in gpu:
        item.add_marker(skip)


@pytest.fixture(autouse=True)
def cpu_without_native_bf16(monkeypatch, tmp_path_factory):
    """Tests run as on a CPU without bf16 instructions, so `--dtype auto` is float32 in-process on any machine (on
    one with them it would be bfloat16); a test that needs the other CPU points CPUINFO at flags of its own."""
    import learning.hardware as hw  # noqa: PLC0415

    monkeypatch.setattr(hw, "CPUINFO", str(tmp_path_factory.getbasetemp() / "no-cpuinfo"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A tiny 8-layer Llama checkpoint with a byte-level tokenizer (plain prompt template)."""
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"), "llama", n_layers=8)


@pytest.fixture(scope="session")
def tiny_chat_dir(tmp_path_factory):
    """A tiny 6-layer Qwen2 checkpoint whose tokenizer has a chat template."""
    return save_tiny(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2", n_layers=6, chat_template=True)
