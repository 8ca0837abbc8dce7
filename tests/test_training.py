"""Party training: the proximal term, what trains, determinism."""

from __future__ import annotations

import torch

from learning.lora import LoraSettings, attach_lora, deltas_from_state, lora_deltas, lora_state, set_trainable
from learning.training import PartyTrainer, TrainSettings, live_lora_pairs, proximal_term
from owner.compress import compress
from tasks.batching import collate
from tasks.datasets import Example
from tasks.prompts import tokenize_examples
from tests.tiny_models import byte_tokenizer, tiny_model

SETTINGS = LoraSettings(r=4, alpha=8)


def compressed_peft(seed: int = 0):
    model, manifest = compress(tiny_model("llama", 8, seed=seed), 2, 0.5, "tiny")
    layers = manifest.emulator_layers + manifest.adapter_layers
    return attach_lora(model, layers, SETTINGS, seed=1), manifest


def randomize_lora(model, layers, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in set_trainable(model, layers):
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        p.requires_grad_(False)


def test_proximal_term_equals_explicit_frobenius_distance():
    model, manifest = compressed_peft()
    layers = manifest.adapter_layers
    randomize_lora(model, layers, 1)
    reference = lora_state(model, layers)
    randomize_lora(model, layers, 2)
    prefixes = [f"model.layers.{i}" for i in layers]
    pairs = live_lora_pairs(model, prefixes)
    assert len(pairs) == 7 * len(layers)
    explicit = sum(
        (d - deltas_from_state(reference, SETTINGS)[name]).pow(2).sum()
        for name, d in lora_deltas(model, layers).items()
    )
    fast = proximal_term(pairs, reference, SETTINGS.scale)
    assert torch.allclose(fast, explicit, rtol=1e-4), (fast, explicit)
    assert float(fast) > 0


def test_proximal_gradient_is_nonzero_and_pulls_towards_reference():
    model, manifest = compressed_peft()
    layers = manifest.adapter_layers
    randomize_lora(model, layers, 1)
    reference = lora_state(model, layers)
    randomize_lora(model, layers, 2)
    params = set_trainable(model, layers)
    pairs = live_lora_pairs(model, [f"model.layers.{i}" for i in layers])
    before = float(proximal_term(pairs, reference, SETTINGS.scale).detach())
    opt = torch.optim.SGD(params, lr=0.05)
    for _ in range(20):
        opt.zero_grad()
        loss = proximal_term(pairs, reference, SETTINGS.scale)
        loss.backward()
        assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in params)
        opt.step()
    after = float(proximal_term(pairs, reference, SETTINGS.scale).detach())
    assert after < 0.5 * before


def _party(model, manifest, tokenizer, seed=0, prox=0.01):
    examples = [Example(f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}.") for i in range(12)]
    data = tokenize_examples(examples, tokenizer, 64, "plain")
    settings = TrainSettings(local_steps=6, batch_size=3, lr=1e-2, prox_eps=prox)
    return PartyTrainer("p", model, manifest, data, tokenizer.pad_token_id, SETTINGS, settings, seed)


def test_train_round_changes_only_the_adapter_lora_and_loss_falls():
    tokenizer = byte_tokenizer()
    model, manifest = compressed_peft()
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    adapter = lora_state(model, manifest.adapter_layers)
    emulator = lora_state(model, manifest.emulator_layers)
    update = _party(model, manifest, tokenizer).train_round(0, adapter, emulator)
    assert update.adapter_state.keys() == adapter.keys()
    changed = [n for n in adapter if not torch.equal(adapter[n], update.adapter_state[n])]
    assert changed, "the adapter LoRA did not change"
    after_emulator = lora_state(model, manifest.emulator_layers)
    assert all(torch.equal(emulator[n], after_emulator[n]) for n in emulator)
    for n, p in model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(base_before[n], p), n
    assert update.stats["loss_last"] < update.stats["loss_first"]
    assert update.n_examples == 12


def test_train_round_is_deterministic_in_seed_and_round():
    tokenizer = byte_tokenizer()
    model, manifest = compressed_peft()
    adapter = lora_state(model, manifest.adapter_layers)
    emulator = lora_state(model, manifest.emulator_layers)
    party = _party(model, manifest, tokenizer, seed=5)
    a = party.train_round(1, adapter, emulator).adapter_state
    b = party.train_round(1, adapter, emulator).adapter_state
    c = party.train_round(2, adapter, emulator).adapter_state
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)


def test_party_loss_is_response_cross_entropy_plus_half_eps_times_the_proximal_term():
    """Eq. 9: CE on response tokens (full forward, logits everywhere, masked by labels) + eps/2 ||dW - dW_t||^2."""
    tokenizer = byte_tokenizer()
    model, manifest = compressed_peft()
    layers = manifest.adapter_layers
    randomize_lora(model, layers, 1)
    reference = lora_state(model, layers)
    randomize_lora(model, layers, 2)
    party = _party(model, manifest, tokenizer, prox=0.3)
    pairs = live_lora_pairs(model, party.adapter_prefixes)
    batch = collate(party.data[:3], tokenizer.pad_token_id)
    with torch.no_grad():
        total, ce = party.loss(batch, reference, pairs)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        expected_ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                                        ignore_index=-100)
        prox = proximal_term(pairs, reference, SETTINGS.scale)
    assert float(prox) > 1e-3
    assert torch.allclose(ce, expected_ce, rtol=1e-5)
    assert torch.allclose(total, expected_ce + 0.5 * 0.3 * prox, rtol=1e-5)


def test_folding_the_frozen_emulator_lora_trains_the_same_adapter():
    tokenizer = byte_tokenizer()
    results = {}
    for fold in (False, True):
        model, manifest = compressed_peft()
        randomize_lora(model, manifest.emulator_layers, seed=3)  # an aligned emulator: a non-zero LoRA
        adapter = lora_state(model, manifest.adapter_layers)
        emulator = lora_state(model, manifest.emulator_layers)
        party = _party(model, manifest, tokenizer)
        party.fold_emulator = fold
        results[fold] = party.train_round(0, adapter, emulator)
    plain, folded = results[False].adapter_state, results[True].adapter_state
    assert any(not torch.equal(plain[n], adapter[n]) for n in plain)
    assert all(torch.allclose(plain[n], folded[n], atol=1e-5) for n in plain)
    assert abs(results[False].stats["loss_first"] - results[True].stats["loss_first"]) < 1e-5
