"""The overhead benchmark: the analytic FLOP count against torch's counter, wire bytes, and a --quick smoke run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from benchmarks import overhead
from benchmarks.flops import counted_flops, step_flops
from benchmarks.overhead_wire import protocol_transit, round_bytes
from learning.lora import LoraSettings, attach_lora, lora_state, set_trainable
from learning.secure_update import secagg_config
from learning.training import PartyTrainer, TrainSettings, live_lora_pairs
from owner.compress import compress
from secure_agg import aggregate_in_process
from tasks.batching import collate
from tasks.prompts import IGNORE_INDEX, TokenizedExample
from tests.tiny_models import tiny_model

LORA = LoraSettings(r=4, alpha=8)


def _examples() -> list[TokenizedExample]:
    out = []
    for n in (21, 33, 17, 28):  # uneven lengths: padding, and a response of half the tokens
        ids = [(7 * i + n) % 250 + 3 for i in range(n)]
        out.append(TokenizedExample(ids, [IGNORE_INDEX] * (n // 2) + ids[n // 2:]))
    return out


@pytest.mark.parametrize(("arch", "bottom", "top", "prox"), [
    ("llama", 0, 2, 0.01),  # FedBiOT: backward stops at the adapter
    ("llama", 2, 2, 0.01),  # FedOT: trainable first layers, backward runs through the emulator
    ("qwen2", 0, 8, 0.0),  # FedAvg-LoRA on the full model, no proximal term
    ("gemma3_text", 0, 3, 0.01),
])
def test_analytic_flops_match_torch_flop_counter(arch, bottom, top, prox):
    compressed, manifest = compress(tiny_model(arch, 8), top, 0.5, "tiny", bottom)
    model = attach_lora(compressed, list(manifest.emulator_layers) + list(manifest.adapter_layers), LORA, 1)
    data = _examples()
    trainer = PartyTrainer("p", model, manifest, data, 0, LORA, TrainSettings(prox_eps=prox), 0)
    reference = lora_state(model, manifest.adapter_layers)
    set_trainable(model, manifest.adapter_layers)
    pairs = live_lora_pairs(model, trainer.adapter_prefixes)
    batch = collate(data, 0)
    model.train()

    def step() -> None:
        total, _ = trainer.loss(batch, reference, pairs)
        total.backward()

    counted, per_op = counted_flops(step)
    n_logits = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    analytic = step_flops(model, manifest.adapter_layers, *batch["input_ids"].shape, n_logits, prox=prox > 0)
    assert any("attention" in op for op in per_op)  # the CPU attention kernels are counted too
    assert analytic.total == pytest.approx(counted, rel=0.02)
    assert analytic.backward_total > 0 and analytic.forward_total > analytic.forward["lm_head"]


def test_fedbiot_backward_is_cheaper_than_fedot_and_full():
    """The count follows autograd: a top-adapter party's backward stops at the adapter."""
    shapes = (4, 32, 40)
    backward = {}
    for name, (bottom, top) in {"fedbiot": (0, 2), "fedot": (2, 2), "full": (0, 8)}.items():
        compressed, manifest = compress(tiny_model("llama", 8), top, 0.5, "tiny", bottom)
        model = attach_lora(compressed, list(manifest.emulator_layers) + list(manifest.adapter_layers), LORA, 1)
        backward[name] = step_flops(model, manifest.adapter_layers, *shapes).backward_total
    assert backward["fedbiot"] < backward["fedot"] < backward["full"]


def test_round_bytes_masked_uplink_costs_four_bytes_per_parameter():
    def states(width: int) -> tuple[dict, dict]:
        adapter = {f"model.layers.1.mlp.up_proj.lora_{ab}.weight": torch.zeros(8, width) for ab in "AB"}
        emulator = {"model.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(8, width)}
        return adapter, emulator

    small, large = round_bytes(*states(256), [130, 140, 120]), round_bytes(*states(1280), [130, 140, 120])
    assert small.ring_bits == large.ring_bits == 32
    # 4 bytes per extra element; the JSON headers differ only in the digits of the lengths
    assert abs(large.up_secure - small.up_secure - 4 * 2 * 8 * (1280 - 256)) <= 16
    assert large.raw_adapter == 4 * 2 * 8 * 1280
    assert large.down_plain > large.up_plain  # the owner also sends the emulator LoRA


def test_protocol_transit_gives_the_same_aggregate_and_counts_protocol_frames():
    rng = np.random.default_rng(3)
    vectors = [rng.normal(0, 1e-3, 500) for _ in range(4)]
    weights = [10, 20, 30, 40]
    config = secagg_config(weights, 0)
    plain = aggregate_in_process(vectors, weights, config, round_id=2, seed=0)
    wired = aggregate_in_process(vectors, weights, config, round_id=2, seed=0, transit=protocol_transit(2))
    assert np.array_equal(plain.weighted_sum, wired.weighted_sum)
    assert plain.total_weight == wired.total_weight == sum(weights)
    assert all(w > p for w, p in zip(wired.party_sent, plain.party_sent, strict=True))  # protocol envelope


def test_quick_run_writes_report_json_and_plots(tmp_path, tiny_llama_dir):
    out = tmp_path / "bench"
    assert overhead.main(["--out", str(out), "--quick", "--model", str(tiny_llama_dir)]) == 0
    text = (out / "overhead.md").read_text()
    result = json.loads((out / "overhead.json").read_text())
    for name in ("overhead_bytes.png", "overhead_compute.png", "overhead_scaling.png"):
        assert (out / name).stat().st_size > 1000
        assert f"]({name})" in text
    methods = result["models"][0]["methods"]
    assert set(methods) == set(overhead.QUICK_METHODS)
    for record in methods.values():
        party = record["party"]
        assert party["flop_check"]["ratio"] == pytest.approx(1.0, abs=0.02)
        assert party["main"]["tokens_per_s"] > 0 and party["peak_rss_mb"] > 0
        assert record["bytes"]["up_secure"] > record["bytes"]["raw_adapter"]
    fedbiot, full = methods[overhead.QUICK_METHODS[0]], methods[overhead.FULL]
    assert fedbiot["trainable_params"] < full["trainable_params"]
    assert fedbiot["party"]["gflop_per_token"] < full["party"]["gflop_per_token"]
    paired = result["models"][0]["paired"]
    assert paired["ratio"] == pytest.approx(paired[fedbiot["key"]]["tokens_per_s"]
                                            / paired[overhead.FULL]["tokens_per_s"])
    assert [row["parties"] for row in result["scaling"]] == [3, 4]
    assert all(row["summary"]["ring_bits"] == 32 for row in result["scaling"])
    assert {t["target"].split()[0] for t in result["targets"]} >= {"secure", "uplink"}
    assert "## Targets" in text and "| FedAvg-LoRA, full model |" in text
    assert not any(p.name.startswith(".overhead-work") for p in out.iterdir())  # temp work removed


def test_reports_are_written_whole_readable_and_without_the_home_directory(tmp_path, monkeypatch):
    from benchmarks.reports import write_report  # noqa: PLC0415

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    target = tmp_path / "report.md"
    write_report(target, f"model at {tmp_path / 'home' / '.cache' / 'm'}; elsewhere {tmp_path / 'homes'}\n")
    assert target.read_text() == f"model at ~/.cache/m; elsewhere {tmp_path / 'homes'}\n"
    assert target.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == ["report.md"]  # no temporary file left
