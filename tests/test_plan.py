"""`owner plan`: the paper's Table 5 from LLaMA-2-7B's config, counts that match real models, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from benchmarks.flops import step_flops
from learning.lora import LoraSettings, attach_lora, load_lora_state, lora_state
from learning.training import TrainSettings
from owner import cli
from owner.alignment import AlignSettings
from owner.compress import compress
from owner.config import RunConfig
from owner.plan import make_plan, party_step_flops, read_model_config, shape_from_config
from tests.tiny_models import tiny_config, tiny_model

CONFIGS = Path(__file__).parent / "fixtures" / "configs"
LLAMA2 = CONFIGS / "llama-2-7b-hf.json"
PAPER_LORA = LoraSettings(r=8, alpha=16, target_modules=("q_proj", "v_proj"))

# Paper Table 5 (LLaMA-2-7B, client side): (beta, method, s) -> adapter layers, emulator layers,
# trainable parameters (M), GFLOP/token, MB/round.
TABLE5 = {
    (0.2, "offsite", 2): (4, 22, 0.524, 10.33, 4.19),
    (0.2, "fedbiot", 2): (2, 24, 0.262, 5.47, 14.68),
    (0.2, "fedbiot", 4): (4, 22, 0.524, 5.87, 15.73),
    (0.5, "offsite", 2): (4, 14, 0.524, 7.09, 4.19),
    (0.5, "fedbiot", 2): (2, 15, 0.262, 3.65, 9.96),
    (0.5, "fedbiot", 4): (4, 14, 0.524, 4.25, 11.53),
}


def _shape(path: Path):
    name, cfg = read_model_config(str(path))
    return shape_from_config(cfg, name)


def _plan(shape, beta: float, method: str, s: int, **kwargs):
    return make_plan(shape, RunConfig(method=method, adapter_size=s, drop_rate=beta, lora=PAPER_LORA, **kwargs))


def test_table5_reproduced_from_the_llama2_config():
    shape = _shape(LLAMA2)
    flops = {}
    for (beta, method, s), (n_adapter, n_emulator, trainable, _, mb) in TABLE5.items():
        plan = _plan(shape, beta, method, s)
        assert (len(plan.adapter_layers), len(plan.emulator_layers)) == (n_adapter, n_emulator)
        assert round(plan.trainable / 1e6, 3) == trainable
        assert round(plan.round_bytes / 1e6, 2) == mb
        flops[beta, method, s] = plan.flops_per_token
    # FedOT moves the same bytes as Offsite-tuning: its emulator is aligned once, never re-sent.
    assert _plan(shape, 0.2, "fedot", 2).round_bytes == _plan(shape, 0.2, "offsite", 2).round_bytes
    # GFLOP/token: the paper counts differently in absolute terms; the ratios between methods must hold.
    ref = (0.2, "fedbiot", 2)
    for key, row in TABLE5.items():
        ours, paper = flops[key] / flops[ref], row[3] / TABLE5[ref][3]
        assert ours == pytest.approx(paper, rel=0.10), key


def test_fedbiot_round_is_emulator_plus_adapter_down_and_adapter_up():
    plan = _plan(_shape(LLAMA2), 0.2, "fedbiot", 2)
    assert plan.up_bytes == 4 * plan.trainable
    assert plan.down_bytes == 4 * (plan.trainable + plan.emulator_lora)
    assert plan.adapter_layers == [30, 31] and plan.emulator_layers[0] == 0 and plan.emulator_layers[-1] == 29
    assert plan.resent_bytes == 0
    fedot = _plan(_shape(LLAMA2), 0.2, "fedot", 2)
    assert fedot.adapter_layers == [0, 1, 30, 31] and fedot.resent_bytes == 4 * fedot.emulator_lora > 0
    full = make_plan(_shape(LLAMA2), RunConfig(method="fedavg-full", lora=PAPER_LORA))
    assert full.emulator_layers == [] and full.trainable == 32 * 131072 and full.down_bytes == full.up_bytes


@pytest.mark.parametrize("name", ["llama-2-7b-hf", "llama-3.1-8b", "qwen2.5-7b"])
def test_parameter_count_matches_the_model_transformers_builds(name):
    shape = _shape(CONFIGS / f"{name}.json")
    cfg = json.loads((CONFIGS / f"{name}.json").read_text())
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    assert shape.params() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral", "gemma3_text"])
def test_compressed_size_and_lora_count_match_real_tiny_models(arch):
    config = tiny_config(arch, 8)
    shape = shape_from_config(config.to_dict(), arch)
    run = RunConfig(method="fedbiot", adapter_size=2, drop_rate=0.5, lora=LoraSettings(r=4, alpha=8))
    plan = make_plan(shape, run)
    compressed, manifest = compress(tiny_model(arch, 8), 2, 0.5, "tiny")
    assert plan.kept_layers == manifest.kept_layers
    assert plan.download_bytes["float32"] == 4 * sum(p.numel() for p in compressed.parameters())
    model = attach_lora(compressed, manifest.adapter_layers, run.lora, 0)
    assert plan.trainable == sum(t.numel() for t in lora_state(model, manifest.adapter_layers).values())


@pytest.mark.parametrize(("arch", "method", "folded"), [
    ("llama", "fedbiot", True),  # a float32 party: the emulator LoRA folded into the weights
    ("llama", "fedbiot", False),
    ("llama", "fedot", True),  # backward runs down to the first layers
    ("qwen2", "fedavg-full", False),
    ("gemma3_text", "fedbiot", False),
])
def test_analytic_flops_agree_with_the_benchmark_count_on_a_live_model(arch, method, folded):
    run = RunConfig(method=method, adapter_size=2, drop_rate=0.5, max_length=24,
                    lora=LoraSettings(r=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj")),
                    train=TrainSettings(batch_size=3, prox_eps=0.01))
    shape = shape_from_config(tiny_config(arch, 8).to_dict(), arch)
    bottom, top = run.adapter_layout(8)
    compressed, manifest = compress(tiny_model(arch, 8), top, run.drop_rate, "tiny", bottom)
    model = attach_lora(compressed, list(manifest.emulator_layers) + list(manifest.adapter_layers), run.lora, 1)
    emulator = set(manifest.emulator_layers)
    if folded and emulator:
        load_lora_state(model, lora_state(model, manifest.emulator_layers), manifest.emulator_layers, fold=True)
    live = step_flops(model, manifest.adapter_layers, 3, 24, n_logits=40)
    ours = party_step_flops(shape, manifest.n_compressed, set(manifest.adapter_layers),
                            set() if folded else emulator, 4, ["q_proj", "v_proj", "down_proj"], 3, 24, 40, True)
    assert ours == {"forward": live.forward, "backward": live.backward}
    if folded:  # the plan itself counts a float32 party, every position projected to the vocabulary
        full = step_flops(model, manifest.adapter_layers, 3, 24, n_logits=3 * 24)
        plan = make_plan(shape, run)
        assert (plan.step_forward_flops, plan.step_backward_flops) == (full.forward_total, full.backward_total)


def test_cli_prints_the_table(capsys):
    code = cli.main(["plan", "--model", str(LLAMA2), "--target-modules", "q_proj", "v_proj", "--drop-rate", "0.2",
                     "--adapter-size", "2"])  # the paper's Table 5 setting
    out = capsys.readouterr().out
    assert code == 0
    for text in ("adapter layers        2 (30-31)", "emulator layers       24", "0.262 M", "14.68 MB",
                 "GFLOP/token", "nf4"):
        assert text in out, text


def test_cli_json_and_model_directory(tmp_path, capsys):
    (tmp_path / "config.json").write_text((CONFIGS / "qwen2.5-7b.json").read_text())
    assert cli.main(["plan", "--model", str(tmp_path), "--method", "fedot", "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["method"] == "fedot" and figures["n_layers"] == 28
    assert figures["down_bytes"] == figures["up_bytes"] == 4 * figures["trainable"]
    mem = figures["party_memory"]
    assert mem["float32"] > mem["bfloat16"] > mem["int8"] > mem["nf4"] > 0
    owner = figures["owner_memory"]
    assert owner["float32"] > 4 * figures["params_full"] > owner["bfloat16"] > 2 * figures["params_full"]
    assert owner["int8"] is None and owner["nf4"] is None  # the owner holds its model unquantised


@pytest.mark.parametrize(("argv", "message"), [
    (["--model", "no/such/config.json"], "does not exist"),
    (["--model", str(LLAMA2), "--drop-rate", "1.5"], "--drop-rate"),
    (["--model", str(LLAMA2), "--method", "fedsgd"], "invalid choice"),
    (["--model", str(LLAMA2), "--adapter-size", "32"], "no emulator"),
    (["--model", str(LLAMA2), "--target-modules", "qkv_proj"], "qkv_proj"),
    (["--model", "meta-llama/Llama-2-7b-hf"], "offline"),
])
def test_bad_input_gives_one_error_line(argv, message, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cli.main(["plan", *argv]) == 2
    captured = capsys.readouterr()
    err = [line for line in captured.err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err
    assert captured.out == ""


def test_an_unreachable_hub_is_one_line_at_once(capsys, monkeypatch):
    """Without a network (and without HF_HUB_OFFLINE) a hub id is read from the cache alone: no retries."""
    import owner.plan

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(owner.plan, "hub_unreachable", lambda: "cannot reach huggingface.co: no answer within 3 s")
    assert cli.main(["plan", "--model", "org/not-in-any-cache"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == ["error: cannot read the config of 'org/not-in-any-cache': cannot reach huggingface.co: no answer "
                   "within 3 s, and it is not in the Hugging Face cache; pass a config.json or a checkpoint "
                   "directory instead"]


def test_config_without_decoder_sizes_or_with_experts_is_refused(tmp_path, capsys):
    (tmp_path / "bert.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 10}))
    moe = {**json.loads(LLAMA2.read_text()), "num_local_experts": 8}
    (tmp_path / "moe.json").write_text(json.dumps(moe))
    assert cli.main(["plan", "--model", str(tmp_path / "bert.json")]) == 2
    assert cli.main(["plan", "--model", str(tmp_path / "moe.json")]) == 2
    err = capsys.readouterr().err
    assert "num_hidden_layers" in err and "mixture-of-experts" in err


def test_target_modules_reach_a_run_config():
    args = cli.build_parser().parse_args(["--simulate", "2", "--out", "x", "--target-modules", "q_proj", "v_proj"])
    config = cli.config_from_args(args, 2, False)
    assert config.lora.target_modules == ("q_proj", "v_proj")
    assert RunConfig.from_dict(config.to_dict()).lora == config.lora


# ------------------------------------------------------------------------------------------ owner memory

LLAMA2_70B = CONFIGS / "llama-2-70b-hf.json"
EIGHT_H100 = {str(i): "80GiB" for i in range(8)}


def test_the_owner_of_a_70b_shares_its_weights_over_eight_80gb_gpus():
    shape = _shape(LLAMA2_70B)
    config = RunConfig(lora=PAPER_LORA, adapter_size=2, dtype="bfloat16", device_map="auto", max_memory=EIGHT_H100)
    plan = make_plan(shape, config, ("auto", {0: "80GiB", 1: "80GiB"}))
    split = plan.owner_split
    assert split["shares"] and set(split["devices"]) == {f"cuda:{i}" for i in range(8)}
    assert not any(split["offloaded"].values())
    weights = sum(d["weights"] for d in split["devices"].values())
    assert weights == pytest.approx(shape.weight_bytes(80, "bfloat16"), rel=1e-6)
    assert all(d["student"] == 0 and 0 < d["total"] < 80 * 2**30 for d in split["devices"].values())
    assert sum(d["total"] for d in split["devices"].values()) == pytest.approx(plan.owner_memory["bfloat16"])
    # the party's 56B compressed model (Table: 112 GB in bfloat16, 30 GB in nf4) over two 80 GB GPUs
    assert plan.download_bytes["bfloat16"] == pytest.approx(110.6e9, rel=0.01)
    assert plan.download_bytes["nf4"] == pytest.approx(29.3e9, rel=0.01)
    party = plan.party_split
    assert set(party["devices"]) == {"cuda:0", "cuda:1"} and all(d["total"] < 80 * 2**30
                                                                 for d in party["devices"].values())
    assert sum(d["weights"] for d in party["devices"].values()) == pytest.approx(plan.download_bytes["bfloat16"],
                                                                                 rel=1e-6)


def test_sharing_and_the_cache_bound_change_the_owner_memory():
    shape = _shape(LLAMA2)
    base = make_plan(shape, RunConfig(lora=PAPER_LORA)).owner_memory["bfloat16"]
    copied = make_plan(shape, RunConfig(lora=PAPER_LORA, share_weights=False)).owner_memory["bfloat16"]
    assert copied - base == pytest.approx(shape.weight_bytes(26, "bfloat16"), rel=1e-3)  # the student's copy
    small = make_plan(shape, RunConfig(lora=PAPER_LORA, align=AlignSettings(cache_memory_mb=100)))
    none = make_plan(shape, RunConfig(lora=PAPER_LORA, align=AlignSettings(cache_teacher=False)))
    cache = 400 * 256 * 4096 * 2  # every public item at max_length, bfloat16 hidden states: under the 1 GiB bound
    assert base - small.owner_memory["bfloat16"] == pytest.approx(cache - 100 * 2**20)
    assert base - none.owner_memory["bfloat16"] == pytest.approx(cache)
    kept = make_plan(shape, RunConfig(lora=PAPER_LORA, align=AlignSettings(checkpoint_activations=False)))
    assert kept.owner_memory["bfloat16"] > base + 1e9  # every layer's activations of an alignment step
    # LLaMA-2-7B in bfloat16: the weights once (13.5 GB), the E* cache and one alignment step
    assert 13.5e9 < base < 16e9


def test_the_plan_places_the_model_as_the_owner_does(tmp_path):
    """The planner's split is `owner_footprint` on transformers' own placement of the model built on meta; the
    owner computes it on the model it loaded: the same numbers."""
    from learning.compressed_model import Manifest
    from owner.footprint import owner_footprint
    from owner.models import Placement, load_model
    from tests.tiny_models import save_tiny

    path = save_tiny(tmp_path / "m", "llama", 8)
    memory = {"cpu": 150_000}
    config = RunConfig(device_map="auto", max_memory=memory, offload_folder=str(tmp_path / "off"), public_limit=8,
                       dtype="float32", adapter_size=2)
    loaded = load_model(str(path), placement=Placement("auto", memory, str(tmp_path / "off"))).model
    plan = make_plan(_shape(path), config)
    kept = plan.kept_layers
    manifest = Manifest(format_version=1, base_model="tiny", n_layers=8, adapter_size=2, drop_rate=0.2,
                        kept_layers=kept, layers_path="model.layers")
    owner = owner_footprint(loaded, loaded.hf_device_map, manifest, config, 8 * config.max_length, 4).to_dict()
    assert owner == plan.owner_split
    assert owner["offloaded"]["disk"] > 0 and owner["devices"]["cpu"]["student"] > 0  # copies of offloaded layers


@pytest.mark.parametrize(("config", "message"), [
    ({"model_type": "bert", "architectures": ["BertForMaskedLM"], "vocab_size": 30522, "hidden_size": 768,
      "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}, "not a decoder-only"),
    ({"model_type": "t5", "is_encoder_decoder": True, "vocab_size": 32128, "hidden_size": 512,
      "num_hidden_layers": 6, "num_attention_heads": 8, "intermediate_size": 2048}, "encoder-decoder"),
])
def test_configs_that_are_not_decoders_are_refused(tmp_path, capsys, config, message):
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert cli.main(["plan", "--model", str(tmp_path / "config.json")]) == 2
    assert message in capsys.readouterr().err


def test_a_party_split_that_offloads_says_the_party_refuses_it():
    from owner.plan import format_plan

    config = RunConfig(lora=PAPER_LORA, dtype="bfloat16")
    plan = make_plan(_shape(LLAMA2), config, ("auto", {0: "4GiB", "cpu": "64GiB"}))
    assert plan.owner_split is None and plan.party_split["offloaded"]["cpu"] > 0
    assert "a party refuses this placement" in format_plan(plan)
    fits = make_plan(_shape(LLAMA2), config, ("auto", {0: "40GiB"}))
    assert set(fits.party_split["devices"]) == {"cuda:0"} and "refuses" not in format_plan(fits)
