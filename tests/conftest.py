"""Shared fixtures: tiny checkpoints on disk and offline hub settings."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.tiny_models import save_tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A tiny 8-layer Llama checkpoint with a byte-level tokenizer (plain prompt template)."""
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"), "llama", n_layers=8)


@pytest.fixture(scope="session")
def tiny_chat_dir(tmp_path_factory):
    """A tiny 6-layer Qwen2 checkpoint whose tokenizer has a chat template."""
    return save_tiny(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2", n_layers=6, chat_template=True)
