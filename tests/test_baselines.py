"""The baselines on the FedBiOT engine: layer layouts, one-time alignment, Offsite's single party,
FedAvg-LoRA on the full model, and the first-a + last-s adapter mapped onto the full model."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from errors import ConfigError, DataError
from learning.compressed_model import Manifest
from learning.lora import LoraSettings, attach_lora, load_lora_state, lora_state, remap_layer_indices
from learning.training import PartyTrainer, TrainSettings
from owner.alignment import alignment_loss
from owner.compress import compress, kept_layer_indices, save_compressed
from owner.config import RunConfig
from owner.export import export_adapemu, export_adapfu
from owner.metrics import MetricsLog
from owner.simulate import run_simulation
from tasks.batching import eval_batches
from tasks.datasets import Example
from tasks.prompts import tokenize_examples
from tests.tiny_models import byte_tokenizer

N_LAYERS = 8  # the tiny_llama_dir fixture


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("baseline-data")
    words = "red blue green yellow black white".split()
    train = [{"instruction": f"Colour of item {i}?", "input": "", "output": f"Item {i} is {words[i % 6]}."}
             for i in range(18)]
    public = [{"instruction": f"Say hello {i} times.", "context": "", "response": "hello " * (i % 4 + 1),
               "category": "open_qa"} for i in range(12)]
    for name, rows in [("train.jsonl", train), ("public.jsonl", public)]:
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def config_for(model_dir, data, method: str, **over) -> RunConfig:
    settings = dict(
        model=str(model_dir), method=method, rounds=2, parties=3, party_data=str(data / "train.jsonl"),
        public_data=str(data / "public.jsonl"), eval_data=str(data / "train.jsonl"), eval_items=4,
        max_length=64, drop_rate=0.5,
        train=TrainSettings(local_steps=2, batch_size=3, lr=1e-2),
    )
    settings.update(over)
    config = RunConfig(**settings)
    config.align = type(config.align)(pre_steps=2, round_steps=2, batch_size=3)
    return config


def events(out, name: str) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["event"] == name]


# ------------------------------------------------------------------------------------------- layouts

def test_layer_layout_of_each_method():
    layouts = {m: RunConfig(method=m, drop_rate=0.5).adapter_layout(N_LAYERS) for m in
               ("fedbiot", "offsite", "fedot", "fedavg-full")}
    # the defaults: FedBiOT's last 4 against the baselines' first 2 + last 2, four adapter layers each
    assert layouts == {"fedbiot": (0, 4), "offsite": (2, 2), "fedot": (2, 2), "fedavg-full": (0, N_LAYERS)}
    assert RunConfig(method="fedot", adapter_size=3).adapter_layout(N_LAYERS) == (2, 3)  # a given s is kept
    for bad in (0, 1.5, True):
        with pytest.raises(ConfigError, match="adapter-size"):
            RunConfig(adapter_size=bad)
    # FedBiOT: uniform drop of layers 0..5, adapter 6, 7.
    assert kept_layer_indices(N_LAYERS, 2, 0.5) == [0, 2, 5, 6, 7]
    # Offsite/FedOT: adapter 0, 1 and 6, 7; the emulator is a uniform drop of layers 2..5.
    assert kept_layer_indices(N_LAYERS, 2, 0.5, 2) == [0, 1, 2, 5, 6, 7]
    assert kept_layer_indices(N_LAYERS, N_LAYERS, 0.5) == list(range(N_LAYERS))
    with pytest.raises(Exception, match="emulator"):
        kept_layer_indices(N_LAYERS, 7, 0.5, 2)

    m = Manifest(format_version=1, base_model="x", n_layers=N_LAYERS, adapter_size=2, drop_rate=0.5,
                 kept_layers=[0, 1, 2, 5, 6, 7], bottom_adapter_size=2)
    assert m.adapter_layers == [0, 1, 4, 5] and m.emulator_layers == [2, 3]
    assert m.full_adapter_layers == [0, 1, 6, 7] and m.top_adapter_start == 4
    assert Manifest.from_dict(json.loads(json.dumps(m.to_dict()))) == m
    full = Manifest(format_version=1, base_model="x", n_layers=N_LAYERS, adapter_size=N_LAYERS, drop_rate=0.0,
                    kept_layers=list(range(N_LAYERS)))
    assert full.emulator_layers == [] and full.adapter_layers == full.full_adapter_layers == list(range(8))
    # A FedBiOT manifest does not carry the new field, and one written before it existed still loads.
    plain = Manifest(format_version=1, base_model="x", n_layers=N_LAYERS, adapter_size=2, drop_rate=0.5,
                     kept_layers=[0, 2, 5, 6, 7])
    assert "bottom_adapter_size" not in plain.to_dict()
    assert Manifest.from_dict(plain.to_dict()).bottom_adapter_size == 0
    with pytest.raises(DataError, match="bottom adapter"):
        Manifest.from_dict({**m.to_dict(), "kept_layers": [0, 2, 3, 5, 6, 7], "emulator_layers": [2, 3]})


def test_bottom_adapter_overrides_the_methods_layout():
    assert RunConfig(method="fedbiot", bottom_adapter=2, drop_rate=0.5).adapter_layout(N_LAYERS) == (2, 4)  # its own s
    assert RunConfig(method="fedot", bottom_adapter=0, drop_rate=0.5).adapter_layout(N_LAYERS) == (0, 2)
    config = RunConfig(bottom_adapter=3)
    assert RunConfig.from_dict(config.to_dict()).bottom_adapter == 3
    assert RunConfig.from_dict({k: v for k, v in RunConfig().to_dict().items() if k != "bottom_adapter"}) \
        .bottom_adapter is None  # a config.json written before the option existed still loads
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigError, match="--bottom-adapter"):
            RunConfig(bottom_adapter=bad)
    with pytest.raises(ConfigError, match="emulator"):
        RunConfig(bottom_adapter=6, adapter_size=2).adapter_layout(N_LAYERS)


def test_method_is_checked_and_offsite_forces_one_party():
    with pytest.raises(ConfigError, match="method"):
        RunConfig(method="fedprox")
    offsite = RunConfig(method="offsite", parties=3, split="category")
    assert offsite.parties == 1 and offsite.split == "iid"
    assert RunConfig.from_dict(offsite.to_dict()).method == "offsite"
    assert RunConfig(method="fedot", parties=3).parties == 3
    assert not RunConfig(method="fedot").realigns_each_round and RunConfig().realigns_each_round


# ------------------------------------------------------------------------------------------- runs

@pytest.mark.parametrize("method, parties", [("offsite", 1), ("fedot", 3)])
def test_baselines_align_once_and_never_per_round(tiny_llama_dir, data_files, tmp_path, method, parties):
    out = tmp_path / method
    summary = run_simulation(config_for(tiny_llama_dir, data_files, method), out, log=MetricsLog(None, quiet=True))
    assert summary["method"] == method and summary["parties"] == parties
    assert summary["adapter_layers"] == 4 and summary["emulator_layers"] == 2
    rounds = events(out, "round")
    assert len(rounds) == 2
    assert all(len(r["participants"]) == parties for r in rounds)
    assert all(r["alignment"]["steps"] == 0 for r in rounds)
    assert [e["stage"] for e in events(out, "align_step")] == [-1, -1]  # the pre-alignment only
    assert events(out, "pre_alignment")[0]["steps"] == 2
    manifest = Manifest.load(out / "compressed")
    assert manifest.bottom_adapter_size == 2 and manifest.kept_layers == [0, 1, 2, 5, 6, 7]
    # Parties trained both adapter groups: the bottom and the top layers' LoRA B moved off zero.
    adapfu = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    adapfu = PeftModel.from_pretrained(adapfu, out / "adapfu")
    moved = {int(n.split("layers.")[1].split(".")[0]) for n, p in adapfu.named_parameters()
             if "lora_B" in n and float(p.abs().max()) > 0}
    assert moved == {0, 1, 6, 7}


def test_fedbiot_realigns_every_round(tiny_llama_dir, data_files, tmp_path):
    out = tmp_path / "fedbiot"
    run_simulation(config_for(tiny_llama_dir, data_files, "fedbiot", rounds=1), out,
                   log=MetricsLog(None, quiet=True))
    assert [r["alignment"]["steps"] for r in events(out, "round")] == [2]
    assert [e["stage"] for e in events(out, "align_step")] == [-1, -1, 0, 0]


def test_fedbiot_with_a_bottom_adapter_realigns_and_trains_both_groups(tiny_llama_dir, data_files, tmp_path):
    """FedBiOT's re-alignment with the first-a layers in the adapter: E* passes through the adapter LoRA the
    parties just changed, so every round aligns against the current one."""
    out = tmp_path / "fedbiot-bottom"
    summary = run_simulation(config_for(tiny_llama_dir, data_files, "fedbiot", bottom_adapter=2, adapter_size=2),
                             out, log=MetricsLog(None, quiet=True))
    assert summary["adapter_layers"] == 4 and summary["emulator_layers"] == 2
    assert [r["alignment"]["steps"] for r in events(out, "round")] == [2, 2]
    assert Manifest.load(out / "compressed").kept_layers == [0, 1, 2, 5, 6, 7]
    assert RunConfig.load(out / "config.json").bottom_adapter == 2
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), out / "adapfu")
    moved = {int(n.split("layers.")[1].split(".")[0]) for n, p in model.named_parameters()
             if "lora_B" in n and float(p.abs().max()) > 0}
    assert moved == {0, 1, 6, 7}


def test_fedavg_full_trains_lora_on_every_layer(tiny_llama_dir, data_files, tmp_path):
    out = tmp_path / "fedavg"
    summary = run_simulation(config_for(tiny_llama_dir, data_files, "fedavg-full", rounds=1), out,
                             log=MetricsLog(None, quiet=True))
    assert summary["emulator_layers"] == 0 and summary["adapter_layers"] == N_LAYERS
    assert summary["emulator_lora_params"] == 0
    assert not events(out, "align_step")
    assert summary["nll_adapemu"] == pytest.approx(summary["nll_adapfu"], rel=1e-5)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    model = PeftModel.from_pretrained(base, out / "adapfu")
    layers = {int(n.split("layers.")[1].split(".")[0]) for n, _ in model.named_parameters() if "lora_" in n}
    assert layers == set(range(N_LAYERS))
    moved = {int(n.split("layers.")[1].split(".")[0]) for n, p in model.named_parameters()
             if "lora_B" in n and float(p.abs().max()) > 0}
    assert moved == set(range(N_LAYERS))
    assert torch.isfinite(model(torch.tensor([[5, 6, 7, 8]])).logits).all()


# ------------------------------------------------------------------------------- bottom + top adapter

def _tokens(tokenizer, n: int = 6):
    examples = [Example(f"Colour of item {i}?", f"Item {i} is red.") for i in range(n)]
    return tokenize_examples(examples, tokenizer, 96, "plain")


def test_bottom_and_top_adapter_export_reproduces_the_trained_logits(tiny_llama_dir, tmp_path):
    """With beta = 0 the compressed model computes what the full model does, so AdapFu on the full model
    and AdapEmu on the compressed checkpoint must give exactly the logits the party trained."""
    full = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    tokenizer = byte_tokenizer()
    compressed, manifest = compress(full, 2, 0.0, str(tiny_llama_dir), bottom_adapter_size=2)
    assert manifest.adapter_layers == [0, 1, 6, 7] and manifest.emulator_layers == [2, 3, 4, 5]
    save_compressed(compressed, tokenizer, manifest, tmp_path / "compressed")
    lora = LoraSettings()
    model = attach_lora(compressed, manifest.emulator_layers + manifest.adapter_layers, lora, seed=0)
    data = _tokens(tokenizer)
    pad = tokenizer.pad_token_id
    trainer = PartyTrainer("p", model, manifest, data, pad, lora, TrainSettings(local_steps=3, batch_size=3,
                                                                                   lr=5e-2), seed=0)
    emulator = lora_state(model, manifest.emulator_layers)
    update = trainer.train_round(0, lora_state(model, manifest.adapter_layers), emulator)
    assert all(float(update.adapter_state[n].abs().max()) > 0 for n in update.adapter_state if "lora_B" in n)
    load_lora_state(model, update.adapter_state, manifest.adapter_layers)
    batch = next(iter(eval_batches(data, 6, pad)))
    with torch.no_grad():
        trained = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    # beta = 0: the compressed model's layer indices are the full model's
    teacher = attach_lora(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), manifest.full_adapter_layers, lora, 0)
    load_lora_state(teacher, update.adapter_state, manifest.full_adapter_layers)
    export_adapfu(teacher, manifest, str(tiny_llama_dir), tmp_path / "adapfu")
    export_adapemu(model, manifest, tmp_path / "compressed", tmp_path / "adapemu")
    fu = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), tmp_path / "adapfu")
    emu = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "compressed"),
                                    tmp_path / "adapemu")
    with torch.no_grad():
        for loaded in (fu.eval(), emu.eval()):
            logits = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            assert torch.allclose(logits, trained, atol=1e-5), float((logits - trained).abs().max())
    with torch.no_grad():
        plain = full(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert float((plain - trained).abs().max()) > 1e-3  # the adapter changed the model


def test_alignment_boundary_with_a_bottom_adapter(tiny_llama_dir):
    """Bottom adapter layers run with the adapter LoRA in teacher and student, and the L2 term compares
    the inputs of the first top adapter layer: at beta = 0 with the same LoRA both terms vanish."""
    full = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    tokenizer = byte_tokenizer()
    compressed, manifest = compress(full, 2, 0.0, str(tiny_llama_dir), bottom_adapter_size=2)
    lora = LoraSettings()
    student = attach_lora(compressed, manifest.emulator_layers + manifest.adapter_layers, lora, seed=0)
    teacher = attach_lora(full, manifest.full_adapter_layers, lora, seed=0)
    g = torch.Generator().manual_seed(3)
    adapter = {k: torch.randn(v.shape, generator=g) * 0.5 for k, v in
               lora_state(student, manifest.adapter_layers).items()}
    load_lora_state(student, adapter, manifest.adapter_layers)
    mapping = dict(zip(manifest.adapter_layers, manifest.full_adapter_layers, strict=True))
    load_lora_state(teacher, remap_layer_indices(adapter, mapping), manifest.full_adapter_layers)
    batch = next(iter(eval_batches(_tokens(tokenizer), 6, tokenizer.pad_token_id)))
    terms = alignment_loss(student, teacher, manifest, batch, kl_weight=1.0)
    assert float(terms.l2) < 1e-8 and float(terms.kl) < 1e-6
    # Without the bottom adapter LoRA in the teacher the emulator inputs differ: the term can fail.
    load_lora_state(teacher, {k: torch.zeros_like(v) for k, v in lora_state(teacher, [0, 1]).items()}, [0, 1])
    assert float(alignment_loss(student, teacher, manifest, batch, kl_weight=1.0).l2) > 1e-4
