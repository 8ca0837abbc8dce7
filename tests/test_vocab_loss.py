"""Losses over the vocabulary a chunk of positions at a time (learning.vocab_loss): the same values and gradients
as the whole-vocabulary form, without any [positions, vocabulary] tensor kept for the backward pass; and the
alignment step's recomputed activations, which change no number."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import learning.vocab_loss as vocab_loss
from learning.forward import response_logits, response_positions, response_token_losses
from learning.lora import LoraSettings, attach_lora, lora_state, set_trainable
from learning.vocab_loss import chunk_rows, head_losses
from owner.alignment import AlignSettings, EmulatorAligner, alignment_loss, distillation_kl, recomputed_activations
from owner.compress import compress
from tasks.batching import collate
from tasks.datasets import Example
from tasks.prompts import tokenize_examples
from tests.tiny_models import VOCAB_SIZE, byte_tokenizer, tiny_model

LORA = LoraSettings(r=4, alpha=8)


def data(count: int = 12):
    examples = [Example(f"Name colour {i}.", f"Colour {i} is {'red blue green'.split()[i % 3]} and bright.")
                for i in range(count)]
    return tokenize_examples(examples, byte_tokenizer(), 64, "plain")


def owner_pair(arch: str = "llama"):
    full = tiny_model(arch, 8, seed=3)
    compressed, manifest = compress(full, 2, 0.5, "tiny", share_weights=True)
    student = attach_lora(compressed, manifest.emulator_layers + manifest.adapter_layers, LORA, seed=1)
    teacher = attach_lora(full, manifest.full_adapter_layers, LORA, seed=1)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():  # a non-zero emulator LoRA, so the student differs from the teacher
        for name, p in student.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return student, teacher, manifest


def close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5) -> bool:
    """Equal up to float rounding: the difference's norm within `rel` of the reference's."""
    return float((got - want).norm()) <= rel * float(want.norm()) + 1e-12


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of MIN_CHUNK_ROWS rows, so every batch here takes several."""
    monkeypatch.setattr(vocab_loss, "CHUNK_BYTES", 1)
    assert chunk_rows(VOCAB_SIZE) == vocab_loss.MIN_CHUNK_ROWS


def vocab_sized_saves(fn) -> list[tuple[int, ...]]:
    """Shapes of the tensors with a vocabulary-sized axis that the graph `fn` returns keeps for its backward
    pass (the output projection's own [vocab, hidden] weight aside)."""
    saved: list[weakref.ref] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 2 and t.shape[1] == VOCAB_SIZE:
            saved.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    gc.collect()
    kept = [tuple(t.shape) for t in (ref() for ref in saved) if t is not None]
    del result
    return kept


def test_head_losses_equal_the_whole_computation_in_value_and_gradient():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(50, 8, generator=g)
    hidden = torch.randn(23, 8, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (23,), generator=g)
    scale = torch.rand(23, generator=g)

    def row_loss(logits: torch.Tensor, sl: slice) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(logits, targets[sl], reduction="none")

    whole = torch.nn.functional.cross_entropy(hidden @ weight.T, targets, reduction="none")
    (grad_whole,) = torch.autograd.grad((whole * scale).sum(), hidden)
    for rows in (1, 5, 23, 100):
        chunked = head_losses(hidden, lambda h: h @ weight.T, row_loss, rows)
        (grad,) = torch.autograd.grad((chunked * scale).sum(), hidden)
        assert torch.allclose(chunked, whole, atol=1e-6), rows
        assert torch.allclose(grad, grad_whole, atol=1e-6), rows
    with torch.no_grad():
        assert torch.allclose(head_losses(hidden, lambda h: h @ weight.T, row_loss, 4), whole, atol=1e-6)


def test_a_head_with_trainable_parameters_gets_its_gradient():
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(30, 6, generator=g, requires_grad=True)
    hidden = torch.randn(9, 6, generator=g)
    targets = torch.randint(0, 30, (9,), generator=g)

    def row_loss(logits: torch.Tensor, sl: slice) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(logits, targets[sl], reduction="none")

    losses = head_losses(hidden, lambda h: h @ weight.T, row_loss, 2, trainable=(weight,))
    (grad,) = torch.autograd.grad(losses.mean(), weight)
    (expected,) = torch.autograd.grad(torch.nn.functional.cross_entropy(hidden @ weight.T, targets), weight)
    assert float(grad.abs().sum()) > 0 and torch.allclose(grad, expected, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])  # gemma: logit soft-capping inside the projection
def test_response_cross_entropy_is_chunked_and_unchanged(arch, small_chunks):
    tokenizer = byte_tokenizer()
    model, manifest = compress(tiny_model(arch, 8, seed=0), 2, 0.5, "tiny")
    model = attach_lora(model, manifest.adapter_layers, LORA, seed=1)
    params = set_trainable(model, manifest.adapter_layers)
    batch = collate(data()[:6], tokenizer.pad_token_id)
    out = response_logits(model, batch)
    assert out.targets.numel() > 3 * vocab_loss.MIN_CHUNK_ROWS
    whole = torch.nn.functional.cross_entropy(out.logits, out.targets)
    expected = torch.autograd.grad(whole, params)
    saves = vocab_sized_saves(lambda: response_token_losses(model, batch))
    chunked = response_token_losses(model, batch).losses.mean()
    grads = torch.autograd.grad(chunked, params)
    assert torch.allclose(chunked, whole, rtol=1e-6, atol=1e-7)
    assert any(float(g.abs().sum()) > 0 for g in grads)
    assert all(close(g, e) for g, e in zip(grads, expected, strict=True))
    assert saves == []
    assert vocab_sized_saves(lambda: response_logits(model, batch).logits.sum())  # the check sees logits


def test_alignment_kl_is_chunked_with_the_gradient_of_the_whole_vocabulary_form(small_chunks):
    tokenizer = byte_tokenizer()
    student, teacher, manifest = owner_pair()
    params = set_trainable(student, manifest.emulator_layers)
    batch = collate(data()[:6], tokenizer.pad_token_id)
    saves = vocab_sized_saves(lambda: alignment_loss(student, teacher, manifest, batch, 1.0))
    assert saves == []
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    mask, _ = response_positions(batch["labels"])
    with torch.no_grad():
        hidden_t = teacher.get_base_model().model(**inputs).last_hidden_state[mask]
    hidden_s = student.get_base_model().model(**inputs).last_hidden_state[mask]
    assert hidden_s.shape[0] > 3 * vocab_loss.MIN_CHUNK_ROWS
    kl = distillation_kl(student, teacher, hidden_s, hidden_t).mean()
    # Eq. 7's KL written with [N, vocab] log-probabilities of both models at once (the earlier form)
    log_p_t = torch.log_softmax(teacher.get_base_model().lm_head(hidden_t), -1)
    log_p_s = torch.log_softmax(student.get_base_model().lm_head(hidden_s), -1)
    reference = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean()
    assert float(kl.detach()) > 1e-4 and torch.allclose(kl, reference, rtol=1e-5)
    assert torch.allclose(alignment_loss(student, teacher, manifest, batch, 1.0).kl, reference, rtol=1e-5)
    got = torch.autograd.grad(kl, params, retain_graph=True)
    want = torch.autograd.grad(reference, params)
    assert any(float(w.abs().sum()) > 0 for w in want)
    assert all(close(g, w) for g, w in zip(got, want, strict=True))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_recomputed_activations_change_no_number_and_are_switched_off_after(arch):
    tokenizer = byte_tokenizer()
    runs = {}
    for recompute in (False, True):
        student, teacher, manifest = owner_pair(arch)
        aligner = EmulatorAligner(student, teacher, manifest, data(), tokenizer.pad_token_id,
                                  AlignSettings(batch_size=4, lr=1e-2, checkpoint_activations=recompute), seed=0)
        seen: list[int] = []
        projection = student.get_base_model().model.layers[0].self_attn.q_proj  # inside the checkpointed forward
        projection.register_forward_hook(lambda *_, seen=seen: seen.append(1))
        info = aligner.run(3, -1)
        runs[recompute] = (info["loss_first"], info["loss_last"], lora_state(student, manifest.emulator_layers),
                           len(seen))
        lm = student.get_base_model()
        assert not any(getattr(m, "gradient_checkpointing", False) for m in lm.modules())
        assert not getattr(lm, "_require_grads_hooks", None)
    assert runs[True][:2] == runs[False][:2]
    assert all(torch.equal(runs[True][2][n], runs[False][2][n]) for n in runs[False][2])
    assert runs[True][3] == 2 * runs[False][3] == 6  # each step ran layer 0 twice: forward and recomputation


def test_recomputed_activations_hold_less_for_the_backward_pass():
    tokenizer = byte_tokenizer()
    student, teacher, manifest = owner_pair()
    set_trainable(student, manifest.emulator_layers)
    student.train()
    batch = collate(data()[:6], tokenizer.pad_token_id)

    def saved_bytes() -> int:
        ptrs: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            ptrs.setdefault(t.data_ptr(), t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            alignment_loss(student, teacher, manifest, batch, 1.0)
        return sum(ptrs.values())

    kept = saved_bytes()
    with recomputed_activations(student):
        recomputed = saved_bytes()
    assert recomputed < 0.5 * kept, (recomputed, kept)


def test_per_sample_loss_and_nll_equal_the_whole_vocabulary_form(small_chunks):
    """DP's per-example loss (value and the gradient of any weighting of it, which is what per-sample clipping
    differentiates) and the evaluation NLL, against cross-entropy over [N, vocab] logits."""
    from learning.dp import per_sample_ce
    from learning.forward import response_nll_sum
    from owner.evaluate import mean_response_nll

    tokenizer = byte_tokenizer()
    model, manifest = compress(tiny_model("llama", 8, seed=2), 2, 0.5, "tiny")
    model = attach_lora(model, manifest.adapter_layers, LORA, seed=1)
    params = set_trainable(model, manifest.adapter_layers)
    items = data()[:6]
    batch = collate(items, tokenizer.pad_token_id)
    out = response_logits(model, batch)
    token = torch.nn.functional.cross_entropy(out.logits, out.targets, reduction="none")
    rows = out.positions[:, 0]
    want = torch.zeros(6).index_add(0, rows, token) / torch.bincount(rows, minlength=6).float()
    weights = torch.linspace(0.5, 2.0, 6)
    expected = torch.autograd.grad((want * weights).sum(), params)
    got = per_sample_ce(model, batch)
    assert got.shape == (6,) and torch.allclose(got, want.detach(), rtol=1e-6, atol=1e-7)
    grads = torch.autograd.grad((got * weights).sum(), params)
    assert any(float(g.abs().sum()) > 0 for g in grads)
    assert all(close(g, e) for g, e in zip(grads, expected, strict=True))

    with torch.no_grad():
        nll, count = response_nll_sum(model, batch)
        reference = torch.nn.functional.cross_entropy(response_logits(model, batch).logits, out.targets,
                                                      reduction="sum")
    assert count == out.targets.numel() and torch.allclose(nll, reference, rtol=1e-6)
    assert abs(mean_response_nll(model, items, tokenizer.pad_token_id, batch_size=6)
               - float(reference) / count) < 1e-5
