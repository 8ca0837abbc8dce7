"""DP-SGD on the adapter LoRA: per-sample clipping, accounting, Poisson draws, clean unwrapping, the CLI."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from console.options import add_options
from errors import ConfigError
from learning.dp import (
    BudgetSpent,
    DPPartyTrainer,
    DPSettings,
    PrivacyLedger,
    default_delta,
    has_opacus_hooks,
    per_sample_ce,
    private_optimizer,
    set_empty_grad_sample,
)
from learning.lora import LoraSettings, attach_lora, lora_state, set_trainable
from learning.training import PartyTrainer, TrainSettings
from owner.cli import config_from_args, main
from owner.compress import compress
from owner.config import RunConfig
from owner.options import run_options
from tasks.batching import collate, poisson_indices
from tasks.datasets import Example
from tasks.prompts import tokenize_examples
from tests.tiny_models import byte_tokenizer, tiny_model

LORA = LoraSettings(r=4, alpha=8)


def compressed_peft(seed: int = 0):
    model, manifest = compress(tiny_model("llama", 8, seed=seed), 2, 0.5, "tiny")
    return attach_lora(model, manifest.emulator_layers + manifest.adapter_layers, LORA, seed=1), manifest


def randomize_adapter(model, layers, seed: int) -> None:
    """Non-zero A and B, so every LoRA matrix gets a non-zero gradient."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in set_trainable(model, layers):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            p.requires_grad_(False)


def arithmetic(tokenizer, n: int = 12):
    examples = [Example(f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}.") for i in range(n)]
    return tokenize_examples(examples, tokenizer, 64, "plain")


def hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._backward_hooks) + len(m._forward_pre_hooks)
               for m in model.modules())


def states(model, manifest):
    return lora_state(model, manifest.adapter_layers), lora_state(model, manifest.emulator_layers)


def dp_trainer(model, manifest, data, pad_id, dp, rounds=2, steps=3, batch=4, lr=1e-2, prox=0.01, **kw):
    settings = TrainSettings(local_steps=steps, batch_size=batch, lr=lr, prox_eps=prox)
    return DPPartyTrainer("p", model, manifest, data, pad_id, LORA, settings, 0, dp=dp, rounds=rounds, **kw)


# ------------------------------------------------------------------------------------------ settings

def test_settings_need_exactly_one_of_noise_and_target_epsilon():
    with pytest.raises(ConfigError, match="exactly one"):
        DPSettings()
    with pytest.raises(ConfigError, match="exactly one"):
        DPSettings(noise_multiplier=1.0, target_epsilon=3.0)
    for bad in [dict(noise_multiplier=-1.0), dict(target_epsilon=0.0), dict(noise_multiplier=1.0, delta=1.0),
                dict(noise_multiplier=1.0, max_grad_norm=0.0), dict(noise_multiplier=1.0, accountant="gdp")]:
        with pytest.raises(ConfigError):
            DPSettings(**bad)
    dp = DPSettings(target_epsilon=4.0, delta=1e-6, max_grad_norm=0.5, accountant="prv")
    assert DPSettings.from_dict(json.loads(json.dumps(dp.to_dict()))) == dp
    with pytest.raises(ConfigError, match="unknown"):
        DPSettings.from_dict({**dp.to_dict(), "sigma": 1})
    config = RunConfig(dp=DPSettings(noise_multiplier=0.7))
    assert RunConfig.from_dict(json.loads(json.dumps(config.to_dict()))).dp == config.dp
    assert RunConfig.from_dict(RunConfig().to_dict()).dp is None
    assert default_delta(50) == 1e-5 and default_delta(10**6) == pytest.approx(1e6 ** -1.1)


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_options(p, run_options())
    return p.parse_args(list(argv))


def test_cli_flags_build_dp_settings():
    assert config_from_args(parse(), 2, False).dp is None
    dp = config_from_args(parse("--dp-noise", "0.5", "--dp-clip", "2.0"), 2, False).dp
    assert dp == DPSettings(noise_multiplier=0.5, max_grad_norm=2.0)
    dp = config_from_args(parse("--dp-epsilon", "8", "--dp-delta", "1e-6"), 2, False).dp
    assert dp.target_epsilon == 8.0 and dp.delta == 1e-6 and dp.max_grad_norm == 1.0
    with pytest.raises(ConfigError, match="exactly one"):
        config_from_args(parse("--dp-noise", "0.5", "--dp-epsilon", "8"), 2, False)
    with pytest.raises(ConfigError, match="without --dp-noise"):
        config_from_args(parse("--dp-clip", "2.0"), 2, False)


# ------------------------------------------------------------------------------------ Poisson sampling

def test_poisson_draws_are_seeded_per_step_and_have_rate_q():
    draws = poisson_indices(200, 3, 40, 0.1, seed=7)
    assert draws == poisson_indices(200, 3, 40, 0.1, seed=7)
    assert draws != poisson_indices(200, 4, 40, 0.1, seed=7)
    assert len({tuple(d) for d in draws}) == 40  # every step draws afresh
    sizes = [len(d) for d in draws]
    assert 14 < sum(sizes) / len(sizes) < 26  # mean 20, sd of the mean ~0.67
    assert len(set(sizes)) > 1  # the batch size varies: not a fixed-size sample
    assert all(d == sorted(set(d)) and all(0 <= i < 200 for i in d) for d in draws)
    assert any(not d for d in poisson_indices(5, 0, 50, 0.05, seed=1))  # empty steps happen
    with pytest.raises(ConfigError):
        poisson_indices(10, 0, 3, 0.0, seed=1)


# ------------------------------------------------------------------------------- per-sample gradients

def test_per_sample_gradients_are_clipped_summed_and_divided_by_expected_batch():
    tokenizer = byte_tokenizer()
    model, manifest = compressed_peft()
    randomize_adapter(model, manifest.adapter_layers, 3)
    data = arithmetic(tokenizer, 4)
    clip, expected = 0.05, 3  # expected batch size deliberately differs from the 4 drawn
    params = set_trainable(model, manifest.adapter_layers)
    model.train()
    # Reference: each example's gradient alone, with plain autograd and no Opacus.
    manual = []
    for item in data:
        loss = per_sample_ce(model, collate([item], tokenizer.pad_token_id)).sum()
        manual.append(torch.autograd.grad(loss, params))
    norms = [float(torch.sqrt(sum(g.pow(2).sum() for g in grads))) for grads in manual]
    assert min(norms) > clip  # every example gets clipped
    expect = [sum(grads[k] * min(1.0, clip / (n + 1e-6)) for grads, n in zip(manual, norms, strict=True))
              / expected for k in range(len(params))]

    batch = collate(data, tokenizer.pad_token_id)
    with private_optimizer(model, torch.optim.SGD(params, lr=0.1), 0.0, clip, expected) as opt:
        opt.zero_grad(set_to_none=True)
        per_sample_ce(model, batch).mean().backward()
        sample_norms = torch.sqrt(sum(p.grad_sample.reshape(4, -1).pow(2).sum(1) for p in params))
        assert torch.allclose(sample_norms, torch.tensor(norms), rtol=1e-4)  # grad_sample[i] = grad of loss i
        opt.pre_step()
        for p, e in zip(params, expect, strict=True):
            assert torch.allclose(p.grad, e, rtol=1e-4, atol=1e-7)
        total = float(torch.sqrt(sum(p.grad.pow(2).sum() for p in params)))
        assert total <= 4 * clip / expected + 1e-6
        # An empty Poisson draw releases zeros without noise, and N(0, (sigma C / B)^2) with it.
        opt.zero_grad(set_to_none=True)
        set_empty_grad_sample(params)
        opt.pre_step()
        assert all(float(p.grad.abs().max()) == 0.0 for p in params)
        opt.noise_multiplier = 2.0
        opt.zero_grad(set_to_none=True)
        set_empty_grad_sample(params)
        opt.pre_step()
        noise = torch.cat([p.grad.flatten() for p in params])
        assert float(noise.std()) == pytest.approx(2.0 * clip / expected, rel=0.1)
    for p in params:
        p.requires_grad_(False)


# ----------------------------------------------------------------------------------------- accounting

def test_reported_epsilon_equals_opacus_accountant_for_the_same_steps():
    tokenizer = byte_tokenizer()
    model, manifest = compressed_peft()
    data = arithmetic(tokenizer)
    trainer = dp_trainer(model, manifest, data, tokenizer.pad_token_id, DPSettings(noise_multiplier=0.8),
                         secret_seed=1)
    adapter, emulator = states(model, manifest)
    first = trainer.train_round(0, adapter, emulator).stats
    second = trainer.train_round(1, adapter, emulator).stats
    q = 4 / 12
    reference = RDPAccountant()
    for _ in range(2 * 3):
        reference.step(noise_multiplier=0.8, sample_rate=q)
    assert second["delta"] == default_delta(12) == 1e-5
    assert second["epsilon"] == reference.get_epsilon(1e-5)
    assert 0 < first["epsilon"] < second["epsilon"]
    assert second["accountant_history"] == [[0.8, q, 6]] and second["dp_steps_total"] == 6
    assert set(DPPartyTrainer.shareable_stats(second)) >= {"epsilon", "delta"}
    assert not {"loss_mean", "tokens"} & set(DPPartyTrainer.shareable_stats(second))


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
def test_target_epsilon_sets_the_noise_and_the_run_spends_at_most_the_target():
    tokenizer = byte_tokenizer()
    model, manifest = compressed_peft()
    data = arithmetic(tokenizer)
    dp = DPSettings(target_epsilon=3.0, delta=1e-4)
    trainer = dp_trainer(model, manifest, data, tokenizer.pad_token_id, dp, rounds=2, steps=2)
    sigma = get_noise_multiplier(target_epsilon=3.0, target_delta=1e-4, sample_rate=4 / 12, steps=4)
    assert trainer.noise_multiplier == sigma > 0
    adapter, emulator = states(model, manifest)
    for r in range(2):
        stats = trainer.train_round(r, adapter, emulator).stats
        assert stats["epsilon"] <= 3.0
    assert stats["noise_multiplier"] == sigma and stats["delta"] == 1e-4
    assert 3.0 - 0.05 < stats["epsilon"] <= 3.0
    # A third round (a retried one, or a run extended on resume) would overspend: refused, nothing spent.
    steps_before = trainer.ledger.steps
    with pytest.raises(BudgetSpent, match="past the target 3"):
        trainer.train_round(2, adapter, emulator)
    assert trainer.ledger.steps == steps_before and trainer.epsilon <= 3.0
    fixed = dp_trainer(model, manifest, data, tokenizer.pad_token_id, DPSettings(noise_multiplier=sigma), rounds=2,
                       steps=2)
    for r in range(3):  # a fixed noise multiplier sets no budget: only reported, never refused
        stats = fixed.train_round(r, adapter, emulator).stats
    assert stats["epsilon"] > 3.0
    with pytest.raises(ConfigError, match="no noise multiplier"):
        dp_trainer(model, manifest, data, tokenizer.pad_token_id, DPSettings(target_epsilon=1e-9), rounds=2)


def test_ledger_state_is_json_and_a_restarted_party_continues_exactly():
    tokenizer = byte_tokenizer()
    model, manifest = compressed_peft()
    data = arithmetic(tokenizer)
    dp = DPSettings(noise_multiplier=1.0)
    adapter, emulator = states(model, manifest)
    first = dp_trainer(model, manifest, data, tokenizer.pad_token_id, dp, steps=2)
    first.train_round(0, adapter, emulator)
    saved = json.loads(json.dumps(first.state_dict()))
    straight = first.train_round(1, adapter, emulator)
    restarted = dp_trainer(model, manifest, data, tokenizer.pad_token_id, dp, steps=2)
    assert restarted.secret_seed != first.secret_seed  # by default the secret comes from the OS
    restarted.load_state_dict(saved)
    again = restarted.train_round(1, adapter, emulator)
    assert all(torch.equal(straight.adapter_state[n], again.adapter_state[n]) for n in adapter)
    assert again.stats["epsilon"] == straight.stats["epsilon"]
    ledger = PrivacyLedger.from_dict(restarted.ledger.to_dict())
    assert ledger.steps == 4 and ledger.epsilon(1e-5) == again.stats["epsilon"]
    assert PrivacyLedger().epsilon(1e-5) == 0.0
    zero = PrivacyLedger()
    zero.step(0.0, 0.5)
    assert zero.epsilon(1e-5) == math.inf


# ------------------------------------------------------------------------------------------ training

def test_noisy_training_changes_the_lora_and_the_loss_falls():
    tokenizer = byte_tokenizer()
    model, manifest = compressed_peft()
    data = tokenize_examples([Example("Repeat: abc", "abcabcabcabc")] * 16, tokenizer, 64, "plain")
    trainer = dp_trainer(model, manifest, data, tokenizer.pad_token_id, DPSettings(noise_multiplier=0.5),
                         rounds=3, steps=5, batch=8, secret_seed=2)
    adapter, emulator = states(model, manifest)
    start = adapter
    losses = []
    for r in range(3):
        update = trainer.train_round(r, adapter, emulator)
        adapter = update.adapter_state
        losses.append(update.stats["loss_mean"])
    assert any(not torch.equal(start[n], adapter[n]) for n in start)
    assert losses[-1] < losses[0] - 0.1, losses
    assert update.stats["epsilon"] > 0 and update.stats["empty_steps"] == 0


def test_empty_draws_are_noise_only_steps_and_still_counted():
    tokenizer = byte_tokenizer()
    model, manifest = compressed_peft()
    data = arithmetic(tokenizer, 40)  # q = 1/40: about a third of the steps draw nobody
    trainer = dp_trainer(model, manifest, data, tokenizer.pad_token_id, DPSettings(noise_multiplier=1.0),
                         steps=12, batch=1, secret_seed=4)
    adapter, emulator = states(model, manifest)
    stats = trainer.train_round(0, adapter, emulator).stats
    assert stats["empty_steps"] >= 1 and stats["dp_steps_total"] == 12


def test_returned_names_are_canonical_and_no_opacus_state_is_left_behind():
    tokenizer = byte_tokenizer()
    data = arithmetic(tokenizer)
    model, manifest = compressed_peft()
    adapter, emulator = states(model, manifest)
    hooks_before = hook_count(model)
    params = set_trainable(model, manifest.adapter_layers)
    with private_optimizer(model, torch.optim.SGD(params, lr=0.1), 1.0, 1.0, 4):
        assert has_opacus_hooks(model) and hook_count(model) > hooks_before
        assert set(lora_state(model, manifest.adapter_layers)) == set(adapter)
    for p in params:
        p.requires_grad_(False)

    update = dp_trainer(model, manifest, data, tokenizer.pad_token_id,
                        DPSettings(noise_multiplier=1.0)).train_round(0, adapter, emulator)
    assert set(update.adapter_state) == set(adapter)
    assert not any("_module" in n or "default" in n for n in update.adapter_state)
    assert not has_opacus_hooks(model) and hook_count(model) == hooks_before
    assert not any(p.requires_grad or p.grad is not None for p in model.parameters())

    # A plain party trained on this model afterwards gets exactly what it gets on a fresh model.
    settings = TrainSettings(local_steps=3, batch_size=4, lr=1e-2)
    after = PartyTrainer("q", model, manifest, data, tokenizer.pad_token_id, LORA, settings, 9)
    fresh_model, _ = compressed_peft()
    fresh = PartyTrainer("q", fresh_model, manifest, data, tokenizer.pad_token_id, LORA, settings, 9)
    a = after.train_round(0, adapter, emulator)
    b = fresh.train_round(0, adapter, emulator)
    assert all(torch.equal(a.adapter_state[n], b.adapter_state[n]) for n in adapter)
    assert a.stats["loss_first"] == b.stats["loss_first"]


# ---------------------------------------------------------------------------------------- simulation

def test_simulated_dp_run_reports_epsilon_each_round_and_across_resume(tiny_llama_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    train = [{"instruction": f"Colour of item {i}?", "input": "", "output": f"Item {i} is red."}
             for i in range(16)]
    public = [{"instruction": f"Say hi {i}.", "context": "", "response": "hi " * (i % 3 + 1),
               "category": "open_qa"} for i in range(8)]
    evaluation = [{"question": f"What is {i} + 1?", "answer": f"#### {i + 1}"} for i in range(4)]
    for name, rows in [("train.jsonl", train), ("public.jsonl", public), ("eval.jsonl", evaluation)]:
        (data / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    argv = ["--simulate", "2", "--rounds", "1", "--out", str(out), "--model", str(tiny_llama_dir),
            "--party-data", str(data / "train.jsonl"), "--public-data", str(data / "public.jsonl"),
            "--eval-data", str(data / "eval.jsonl"), "--eval-items", "4", "--max-length", "64",
            "--local-steps", "2", "--batch-size", "4", "--align-pre-steps", "1", "--align-steps", "1",
            "--quiet", "--dp-noise", "0.9", "--dp-clip", "0.5"]
    assert main(argv) == 0
    # One round, then --resume to two: each party's accountant continues from the checkpointed history.
    argv[argv.index("--rounds") + 1] = "2"
    assert main([*argv, "--resume"]) == 0
    reference = RDPAccountant()
    for _ in range(2 * 2):
        reference.step(noise_multiplier=0.9, sample_rate=4 / 8)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["dp"]) == {"party-1", "party-2"}
    for report in summary["dp"].values():
        assert report["epsilon"] == reference.get_epsilon(1e-5) and report["delta"] == 1e-5
        assert report["max_grad_norm"] == 0.5
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in rounds if r["event"] == "round"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[0]["dp"]["party-1"]["epsilon"] < rounds[1]["dp"]["party-1"]["epsilon"]
    assert json.loads((out / "config.json").read_text())["dp"]["noise_multiplier"] == 0.9
