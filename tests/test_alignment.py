"""Owner alignment (Eq. 7): zero when nothing is dropped, falls when layers are dropped."""

from __future__ import annotations

import torch

from owner.alignment import AlignSettings, EmulatorAligner, alignment_loss
from owner.compress import compress
from party.lora import LoraSettings, attach_lora, lora_state
from tasks.batching import collate
from tasks.datasets import Example
from tasks.prompts import tokenize_examples
from tests.tiny_models import byte_tokenizer, tiny_model

LORA = LoraSettings(r=4, alpha=8)


def build(drop_rate: float):
    full = tiny_model("llama", 8, seed=3)
    compressed, manifest = compress(full, 2, drop_rate, "tiny")
    student = attach_lora(compressed, manifest.emulator_layers + manifest.adapter_layers, LORA, seed=1)
    teacher = attach_lora(full, manifest.full_adapter_layers, LORA, seed=1)
    return student, teacher, manifest


def public_data(tokenizer):
    examples = [Example(f"Name a colour number {i}.", f"Colour {i} is {'red blue green'.split()[i % 3]}.")
                for i in range(16)]
    return tokenize_examples(examples, tokenizer, 64, "plain")


def test_alignment_loss_is_zero_without_compression():
    tokenizer = byte_tokenizer()
    student, teacher, manifest = build(0.0)
    assert len(manifest.emulator_layers) == 6
    batch = collate(public_data(tokenizer)[:4], tokenizer.pad_token_id)
    terms = alignment_loss(student, teacher, manifest, batch, 1.0)
    assert float(terms.total) < 1e-6


def test_alignment_loss_falls_and_only_emulator_lora_trains():
    tokenizer = byte_tokenizer()
    student, teacher, manifest = build(0.5)
    adapter_before = lora_state(student, manifest.adapter_layers)
    emulator_before = lora_state(student, manifest.emulator_layers)
    aligner = EmulatorAligner(student, teacher, manifest, public_data(tokenizer), tokenizer.pad_token_id,
                              AlignSettings(batch_size=4, lr=1e-2), seed=0)
    batch = collate(public_data(tokenizer)[:8], tokenizer.pad_token_id)
    with torch.no_grad():
        before = float(alignment_loss(student, teacher, manifest, batch, 1.0).total)
    info = aligner.run(30, -1)
    with torch.no_grad():
        after = float(alignment_loss(student, teacher, manifest, batch, 1.0).total)
    assert info["steps"] == 30
    assert after < 0.8 * before, (before, after)
    adapter_after = lora_state(student, manifest.adapter_layers)
    assert all(torch.equal(adapter_before[n], adapter_after[n]) for n in adapter_before)
    emulator_after = lora_state(student, manifest.emulator_layers)
    assert any(not torch.equal(emulator_before[n], emulator_after[n]) for n in emulator_before)
