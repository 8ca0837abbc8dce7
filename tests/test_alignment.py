"""Owner alignment (Eq. 7): the terms as the paper defines them, zero when nothing is dropped, falls when
layers are dropped."""

from __future__ import annotations

import torch

from learning.lora import LoraSettings, attach_lora, lora_state
from owner.alignment import AlignSettings, EmulatorAligner, alignment_loss
from owner.compress import compress
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


def reference_loss(student, teacher, manifest, batch, kl_weight):
    """Eq. 7 written out with full forwards: L2 between the hidden states entering the first adapter layer,
    normalised by the teacher's RMS, + KL(teacher || student) of the next-token distributions, both only at
    positions whose next token is a labelled response token."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        t = teacher(**inputs, output_hidden_states=True)
        s = student(**inputs, output_hidden_states=True)
    mask = torch.zeros_like(batch["labels"], dtype=torch.bool)
    mask[:, :-1] = batch["labels"][:, 1:] != -100
    emu_t = t.hidden_states[manifest.n_layers - manifest.adapter_size][mask]
    emu_s = s.hidden_states[len(manifest.emulator_layers)][mask]
    l2 = ((emu_t - emu_s) / emu_t.pow(2).mean(-1, keepdim=True).sqrt()).pow(2).mean()
    kl = torch.nn.functional.kl_div(torch.log_softmax(s.logits[mask], -1), torch.log_softmax(t.logits[mask], -1),
                                    log_target=True, reduction="batchmean")
    return l2 + kl_weight * kl, l2, kl


def test_alignment_loss_matches_eq7_on_response_tokens_only():
    tokenizer = byte_tokenizer()
    student, teacher, manifest = build(0.5)
    randomize = torch.Generator().manual_seed(4)
    with torch.no_grad():  # a non-zero emulator LoRA, so student and teacher differ in both terms
        for name, p in student.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=randomize) * 0.1)
    data = public_data(tokenizer)
    batch = collate(data[:4], tokenizer.pad_token_id)
    terms = alignment_loss(student, teacher, manifest, batch, 0.7)
    total, l2, kl = reference_loss(student, teacher, manifest, batch, 0.7)
    assert float(l2) > 1e-3 and float(kl) > 1e-4
    assert torch.allclose(terms.l2, l2, rtol=1e-4) and torch.allclose(terms.kl, kl, rtol=1e-4)
    assert torch.allclose(terms.total.detach(), total, rtol=1e-4)
    # KL(student || teacher) is a different number: the direction is the paper's
    reverse = torch.nn.functional.kl_div(
        torch.log_softmax(teacher(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits, -1),
        torch.log_softmax(student(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits, -1),
        log_target=True, reduction="none").sum(-1)
    assert abs(float(reverse[batch["labels"].roll(-1, 1) != -100].mean()) - float(kl)) > 1e-6
    # padding does not count: five more padded positions on every row leave the loss as it was
    extra = 5
    padded = {
        "input_ids": torch.nn.functional.pad(batch["input_ids"], (0, extra), value=tokenizer.pad_token_id),
        "attention_mask": torch.nn.functional.pad(batch["attention_mask"], (0, extra), value=0),
        "labels": torch.nn.functional.pad(batch["labels"], (0, extra), value=-100),
    }
    assert torch.allclose(alignment_loss(student, teacher, manifest, padded, 0.7).total, terms.total, rtol=1e-4)
