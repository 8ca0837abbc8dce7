"""LoRA on chosen layers: canonical names, strict state loading, trainable selection, deltas."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from torch import nn

from errors import ConfigError, ModelError
from learning.lora import (
    LoraSettings,
    attach_lora,
    deltas_from_state,
    initial_lora,
    linear_module_names,
    load_lora_state,
    lora_deltas,
    lora_state,
    lora_state_spec,
    remap_layer_indices,
    set_trainable,
)
from owner.models import decoder_layers, decoder_layers_path
from tests.tiny_models import ARCHITECTURES, tiny_model

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _peft(arch="llama", n_layers=6, layers=(4, 5), seed=0, **kw):
    return attach_lora(tiny_model(arch, n_layers), layers, LoraSettings(**kw), seed=seed)


def test_settings_dict_round_trip_and_scale():
    s = LoraSettings(r=4, alpha=16, dropout=0.1, target_modules=("q_proj", "v_proj"))
    assert s.scale == 4.0
    assert LoraSettings.from_dict(s.to_dict()) == s
    assert LoraSettings.from_dict({}) == LoraSettings()
    for bad in ({"r": 0}, {"alpha": -1}, {"dropout": 1.0}, {"target_modules": "q_proj"}, {"rank": 8}):
        with pytest.raises(ConfigError):
            LoraSettings.from_dict(bad)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_decoder_layers_found(arch):
    model = tiny_model(arch, n_layers=3)
    assert decoder_layers_path(model) == "model.layers"
    assert len(decoder_layers(model)) == 3
    assert linear_module_names(model) == LINEARS


def test_no_decoder_layer_list():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = tiny_model("llama", 2).config
            self.blocks = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))

    with pytest.raises(ModelError, match="no decoder layer list"):
        decoder_layers(Odd())
    with pytest.raises(ModelError, match="no decoder layer list"):
        decoder_layers(nn.Linear(2, 2))


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_canonical_names_only_on_chosen_layers(arch):
    model = _peft(arch)
    assert isinstance(model, PeftModel)
    state = lora_state(model)
    expected = {f"model.layers.{i}.{lin}.lora_{ab}.weight" for i in (4, 5) for lin in LINEARS for ab in "AB"}
    assert set(state) == expected
    a = state["model.layers.4.self_attn.q_proj.lora_A.weight"]
    assert a.shape == (8, 32) and a.dtype == torch.float32 and a.is_contiguous() and not a.requires_grad
    assert torch.count_nonzero(state["model.layers.4.self_attn.q_proj.lora_B.weight"]) == 0
    assert decoder_layers_path(model) == "model.layers"
    # Layers outside `layers` have no LoRA at all.
    assert not any(".lora_" in n for n, _ in decoder_layers(model)[3].named_parameters())


def test_target_modules_subset():
    model = _peft(target_modules=("q_proj", "down_proj"))
    assert {n.split(".", 3)[3].rsplit(".", 2)[0] for n in lora_state(model)} == {
        "self_attn.q_proj", "mlp.down_proj"}
    with pytest.raises(ModelError, match="nope"):
        _peft(target_modules=("nope",))


def test_init_is_seeded_and_starts_frozen():
    s1, s2, s3 = (lora_state(_peft(seed=s)) for s in (7, 7, 8))
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert not torch.equal(s1["model.layers.4.mlp.up_proj.lora_A.weight"],
                           s3["model.layers.4.mlp.up_proj.lora_A.weight"])
    # A module's initial A does not depend on which other layers got LoRA.
    only5 = lora_state(_peft(layers=(5,), seed=7))
    assert all(torch.equal(only5[k], s1[k]) for k in only5)
    model = _peft()
    assert not any(p.requires_grad for p in model.parameters())


def test_owner_and_every_party_start_from_the_same_lora(tiny_llama_dir, tmp_path):
    """`initial_lora` is the one place a run's LoRA is attached: the owner's student (on the compressed model
    sharing the full model's weights) and a party's model (loaded from the shipped checkpoint) start equal."""
    from learning.party_model import PartyModel
    from owner.compress import compress, save_compressed
    from owner.models import load_model

    base = load_model(str(tiny_llama_dir))
    compressed, manifest = compress(base.model, 2, 0.5, base.identity, share_weights=True)
    save_compressed(compressed, base.tokenizer, manifest, tmp_path / "compressed")
    lora = LoraSettings(r=4, alpha=8)
    student = initial_lora(compressed, manifest, lora, 7)
    teacher = initial_lora(base.model, manifest, lora, 7, full_model=True)
    owner_state = lora_state(student)
    for party in (PartyModel.load(tmp_path / "compressed", lora, 7), PartyModel.load(tmp_path / "compressed", lora, 7)):
        party_state = lora_state(party.model)
        assert set(party_state) == set(owner_state)
        assert all(torch.equal(party_state[k], owner_state[k]) for k in owner_state)
    layers = {int(k.split(".")[2]) for k in owner_state}
    assert layers == {*manifest.emulator_layers, *manifest.adapter_layers}
    assert {int(k.split(".")[2]) for k in lora_state(teacher)} == set(manifest.full_adapter_layers)
    other = lora_state(initial_lora(tiny_model("llama", 8), manifest, lora, 8))
    assert not torch.equal(other[next(iter(other))], owner_state[next(iter(other))])


def test_lora_state_subset_and_spec():
    model = _peft(layers=(1, 4, 5))
    sub = lora_state(model, [4])
    assert sub and all(k.startswith("model.layers.4.") for k in sub)
    spec = lora_state_spec(model, [4])
    assert set(spec) == set(sub)
    assert all(spec[k] == (tuple(v.shape), torch.float32) for k, v in sub.items())
    with pytest.raises(ModelError, match="no LoRA"):
        lora_state(model, [2])
    with pytest.raises(ModelError, match="out of range"):
        lora_state(model, [6])


def _random_state(model, layers=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in lora_state(model, layers).items()}


def test_load_lora_state_round_trip():
    model = _peft()
    new = _random_state(model)
    load_lora_state(model, new)
    got = lora_state(model)
    assert all(torch.equal(got[k], new[k]) for k in new)
    # Half precision input is accepted and converted.
    load_lora_state(model, {k: v.half() for k, v in new.items()})
    assert torch.allclose(lora_state(model)["model.layers.5.mlp.down_proj.lora_B.weight"],
                          new["model.layers.5.mlp.down_proj.lora_B.weight"], atol=1e-2)


def _corruptions(state):
    key = "model.layers.4.self_attn.q_proj.lora_A.weight"
    missing = dict(state)
    del missing[key]
    extra = {**state, "model.layers.4.self_attn.q_proj.lora_C.weight": state[key]}
    renamed = dict(missing)
    renamed["base_model.model." + key] = state[key]
    shape = {**state, key: torch.zeros(8, 33)}
    nan = {**state, key: state[key].clone()}
    nan[key][0, 0] = float("nan")
    inf = {**state, key: state[key].clone()}
    inf[key][1, 1] = float("inf")
    integer = {**state, key: torch.zeros(state[key].shape, dtype=torch.int64)}
    return {"missing": missing, "extra": extra, "renamed": renamed, "shape": shape, "nan": nan, "inf": inf,
            "int": integer}


@pytest.mark.parametrize("kind", ["missing", "extra", "renamed", "shape", "nan", "inf", "int"])
def test_load_lora_state_rejects_and_leaves_model_unchanged(kind):
    model = _peft()
    before = lora_state(model)
    bad = _corruptions(_random_state(model))[kind]
    with pytest.raises(ModelError) as info:
        load_lora_state(model, bad)
    assert "LoRA state" in str(info.value)
    after = lora_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_load_lora_state_for_some_layers():
    model = _peft(layers=(3, 4, 5))
    part = _random_state(model, [3])
    load_lora_state(model, part, layers=[3])
    assert torch.equal(lora_state(model, [3])["model.layers.3.mlp.up_proj.lora_A.weight"],
                       part["model.layers.3.mlp.up_proj.lora_A.weight"])
    with pytest.raises(ModelError, match="unexpected"):
        load_lora_state(model, {**part, **_random_state(model, [4])}, layers=[3])


def test_set_trainable_selects_layers():
    model = _peft(layers=(2, 4, 5))
    params = set_trainable(model, [4, 5])
    assert len(params) == 2 * 2 * len(LINEARS)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all((".layers.4." in n or ".layers.5." in n) and ".lora_" in n for n in trainable)
    assert {id(p) for p in params} == {id(p) for p in model.parameters() if p.requires_grad}
    again = set_trainable(model, [4, 5])
    assert [id(p) for p in again] == [id(p) for p in params]  # stable order
    set_trainable(model, [2])
    assert all(".layers.2." in n for n, p in model.named_parameters() if p.requires_grad)


def test_lora_deltas_match_state_and_have_gradient():
    model = _peft(r=4, alpha=8)
    load_lora_state(model, _random_state(model))
    params = set_trainable(model, [5])
    deltas = lora_deltas(model, [5])
    assert set(deltas) == {f"model.layers.5.{lin}" for lin in LINEARS}
    ref = deltas_from_state(lora_state(model, [5]), LoraSettings(r=4, alpha=8))
    for name, d in deltas.items():
        assert d.shape == model.get_base_model().get_submodule(name).base_layer.weight.shape
        assert torch.allclose(d.detach(), ref[name], atol=1e-6)
    loss = sum((d ** 2).sum() for d in deltas.values())
    loss.backward()
    assert all(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in params)


def test_deltas_equal_weight_change_in_forward():
    """scale * B @ A is what the LoRA adds to the layer's weight, so merging it reproduces the output."""
    model = _peft(n_layers=3, layers=(2,), r=4, alpha=12)
    load_lora_state(model, _random_state(model))
    x = torch.randint(0, 256, (1, 7))
    with torch.no_grad():
        want = model(input_ids=x).logits
        plain = tiny_model("llama", 3)
        for name, delta in deltas_from_state(lora_state(model), LoraSettings(r=4, alpha=12)).items():
            plain.get_submodule(name).weight.add_(delta)
        got = plain(input_ids=x).logits
    assert torch.allclose(want, got, atol=1e-5)


def test_deltas_from_state_needs_both_matrices():
    state = {"model.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(2, 3)}
    with pytest.raises(ModelError, match="lora_B"):
        deltas_from_state(state, LoraSettings(r=2))


def test_remap_layer_indices():
    t = torch.ones(1)
    state = {"model.layers.3.mlp.up_proj.lora_A.weight": t, "model.layers.4.mlp.up_proj.lora_A.weight": t * 2,
             "model.norm.weight": t}
    out = remap_layer_indices(state, {3: 10, 4: 11})
    assert set(out) == {"model.layers.10.mlp.up_proj.lora_A.weight",
                        "model.layers.11.mlp.up_proj.lora_A.weight", "model.norm.weight"}
    moved = out["model.layers.11.mlp.up_proj.lora_A.weight"]
    assert moved is state["model.layers.4.mlp.up_proj.lora_A.weight"]
    with pytest.raises(ModelError, match="layer 4"):
        remap_layer_indices(state, {3: 10})
    with pytest.raises(ModelError, match="two"):
        remap_layer_indices(state, {3: 10, 4: 10})


def test_state_names_survive_opacus_wrapper():
    from opacus import GradSampleModule

    model = _peft()
    set_trainable(model, [4, 5])
    plain_names = set(lora_state(model))
    wrapped = GradSampleModule(model)
    assert any(k.startswith("_module.") for k in wrapped.state_dict())
    assert set(lora_state(wrapped)) == plain_names
    new = _random_state(model)
    load_lora_state(wrapped, new)
    assert torch.equal(lora_state(model)["model.layers.4.mlp.up_proj.lora_A.weight"],
                       new["model.layers.4.mlp.up_proj.lora_A.weight"])
    assert set(lora_deltas(wrapped, [4])) == {f"model.layers.4.{lin}" for lin in LINEARS}


def _base_weights(model, layers):
    return {n: p.detach().clone() for n, p in model.named_parameters()
            if "lora_" not in n and any(f"layers.{i}." in n for i in layers) and n.endswith("base_layer.weight")}


def _expected_weights(base, state, scale):
    out = {}
    for n, w in base.items():
        module = n.replace("base_model.model.", "").replace(".base_layer.weight", "")
        a, b = state[module + ".lora_A.weight"], state[module + ".lora_B.weight"]
        out[n] = w + scale * (b @ a)
    return out


def test_folding_a_frozen_lora_keeps_the_output_and_moves_it_into_the_weights():
    settings = LoraSettings(r=4, alpha=8)
    model = attach_lora(tiny_model("llama", 6), (3, 4, 5), settings, seed=0)
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    base = _base_weights(model, (3, 4))
    first, second = _random_state(model, [3, 4], seed=1), _random_state(model, [3, 4], seed=2)
    load_lora_state(model, first, [3, 4])
    unfolded = model(input_ids=ids).logits
    load_lora_state(model, first, [3, 4], fold=True)
    assert torch.allclose(model(input_ids=ids).logits, unfolded, atol=1e-4)
    weights = dict(model.named_parameters())
    for n, want in _expected_weights(base, first, settings.scale).items():
        assert torch.allclose(weights[n], want, atol=1e-6), n
    assert all(torch.equal(v, first[k]) for k, v in lora_state(model, [3, 4]).items())  # the state still reads back
    folded = {n: weights[n].detach().clone() for n in base}
    load_lora_state(model, first, [3, 4], fold=True)  # the same state again (another party): not folded twice
    assert all(torch.equal(weights[n], folded[n]) for n in base)
    # A new state replaces the old delta; the layers outside `layers` keep their live LoRA.
    load_lora_state(model, second, [3, 4], fold=True)
    for n, want in _expected_weights(base, second, settings.scale).items():
        assert torch.allclose(weights[n], want, atol=1e-6), n
    assert torch.allclose(model(input_ids=ids).logits, load_and_run(second, ids), atol=1e-4)
    load_lora_state(model, second, [3, 4])
    assert torch.allclose(model(input_ids=ids).logits, load_and_run(second, ids), atol=1e-4)
    for n, w in base.items():  # unfolded: plain base weights again, LoRA modules live
        assert torch.allclose(weights[n], w, atol=1e-6), n
    assert not any(p.requires_grad for p in model.parameters())


def load_and_run(state, ids):
    """Logits of a freshly built model with `state` as live (never folded) LoRA."""
    fresh = attach_lora(tiny_model("llama", 6), (3, 4, 5), LoraSettings(r=4, alpha=8), seed=0)
    load_lora_state(fresh, state, [3, 4])
    return fresh(input_ids=ids).logits


def test_half_precision_weights_keep_the_lora_unfolded():
    model = attach_lora(tiny_model("llama", 6).to(torch.bfloat16), (4, 5), LoraSettings(r=4, alpha=8), seed=0)
    base = _base_weights(model, (4,))
    load_lora_state(model, _random_state(model, [4]), [4], fold=True)
    weights = dict(model.named_parameters())
    assert all(torch.equal(weights[n], w) for n, w in base.items())
