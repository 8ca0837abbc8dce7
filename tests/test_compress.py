"""Layer selection (paper Alg. 1 / Table 5), compressed checkpoints, and the manifest."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from errors import DataError, FedbiotError, ModelError
from learning.compressed_model import MANIFEST_NAME, Manifest, load_compressed
from owner.compress import compress, emulator_layer_indices, save_compressed
from tests.tiny_models import ARCHITECTURES, byte_tokenizer, tiny_model

TOKENS = torch.tensor([[257, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 33, 10, 65]])


@pytest.mark.parametrize(("s", "beta", "expected"), [(2, 0.2, 24), (2, 0.5, 15), (4, 0.2, 22)])
def test_table5_emulator_sizes(s, beta, expected):
    kept = emulator_layer_indices(32, s, beta)
    assert len(kept) == expected
    assert kept[0] == 0 and kept[-1] == 32 - s - 1
    assert kept == sorted(set(kept))


def test_indices_follow_the_stride():
    # n=10, s=2, beta=0.5: E* = 0..7, n' = 4, stride 7/3 -> int(0, 2.33, 4.67, 7)
    assert emulator_layer_indices(10, 2, 0.5) == [0, 2, 4, 7]
    assert emulator_layer_indices(10, 2, 0.0) == list(range(8))


def test_single_emulator_layer():
    assert emulator_layer_indices(4, 3, 0.0) == [0]
    assert emulator_layer_indices(6, 2, 0.9) == [0]


@pytest.mark.parametrize(("n", "s", "beta"), [(8, 0, 0.2), (8, 8, 0.2), (8, 9, 0.0), (8, 2, 1.0),
                                              (8, 2, -0.1), (8, 2, float("nan")), (1, 1, 0.0)])
def test_bad_split_is_rejected(n, s, beta):
    with pytest.raises(ModelError) as info:
        emulator_layer_indices(n, s, beta)
    assert str(info.value)


def _logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_compressed_checkpoint_loads_with_plain_transformers(arch, tmp_path):
    full = tiny_model(arch, n_layers=8, seed=3)
    compressed, manifest = compress(full, adapter_size=2, drop_rate=0.5, base_identity="org/base")
    # E* = 0..5, n' = round(0.5 * 6) = 3, stride 5/2 -> 0, 2, 5; adapter 6, 7
    assert manifest.kept_layers == [0, 2, 5, 6, 7]
    assert compressed.config.num_hidden_layers == 5
    assert len(compressed.model.layers) == 5
    save_compressed(compressed, byte_tokenizer(), manifest, tmp_path / "c")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "c", dtype=torch.float32).eval()
    assert torch.equal(_logits(compressed), _logits(reloaded))
    # Weights really come from the kept layers of the full model, in order.
    for new_i, orig_i in enumerate(manifest.kept_layers):
        assert torch.equal(reloaded.model.layers[new_i].self_attn.q_proj.weight,
                           full.model.layers[orig_i].self_attn.q_proj.weight)
    if full.config.tie_word_embeddings:
        assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    if getattr(full.config, "layer_types", None) is not None:
        assert reloaded.config.layer_types == [full.config.layer_types[i] for i in manifest.kept_layers]
    model, _, loaded_manifest = load_compressed(tmp_path / "c")
    assert loaded_manifest == manifest
    assert torch.equal(_logits(model), _logits(compressed))


def test_gemma3_layer_types_follow_kept_layers():
    full = tiny_model("gemma3_text", n_layers=8)
    types = full.config.layer_types
    assert len(set(types)) == 2  # the test needs both kinds present
    compressed, manifest = compress(full, 2, 0.5, "base")
    assert compressed.config.layer_types == [types[i] for i in manifest.kept_layers]
    assert [layer.self_attn.is_sliding for layer in compressed.model.layers] == [
        types[i] == "sliding_attention" for i in manifest.kept_layers]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3_text"])
def test_nothing_dropped_means_same_logits(arch):
    full = tiny_model(arch, n_layers=6, seed=1)
    compressed, manifest = compress(full, adapter_size=2, drop_rate=0.0, base_identity="x")
    assert manifest.kept_layers == list(range(6))
    assert torch.allclose(_logits(full), _logits(compressed), atol=0, rtol=0)


def test_compress_copies_weights():
    full = tiny_model("llama", n_layers=4)
    compressed, _ = compress(full, 1, 0.0, "x")
    before = full.model.layers[0].mlp.up_proj.weight.clone()
    with torch.no_grad():
        compressed.model.layers[0].mlp.up_proj.weight.add_(1.0)
    assert torch.equal(full.model.layers[0].mlp.up_proj.weight, before)


def test_manifest_records_given_identity():
    full = tiny_model("llama", n_layers=4)
    full.config._name_or_path = "/somewhere/else"
    _, manifest = compress(full, 1, 0.0, "org/model")
    assert manifest.base_model == "org/model"
    assert manifest.n_layers == 4 and manifest.adapter_size == 1


def test_save_compressed_is_atomic_and_replaces(tmp_path):
    full = tiny_model("llama", n_layers=6)
    c1, m1 = compress(full, 2, 0.5, "x")
    save_compressed(c1, byte_tokenizer(), m1, tmp_path / "out")
    c2, m2 = compress(full, 2, 0.0, "x")
    save_compressed(c2, byte_tokenizer(), m2, tmp_path / "out")
    assert Manifest.load(tmp_path / "out").kept_layers == list(range(6))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp dirs left behind
    with pytest.raises(ModelError):  # manifest/model mismatch writes nothing
        save_compressed(c1, byte_tokenizer(), m2, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ----------------------------------------------------------------------------------------- manifest

def _manifest(**over) -> dict:
    d = dict(format_version=1, base_model="org/m", n_layers=8, adapter_size=2, drop_rate=0.5,
             kept_layers=[0, 2, 5, 6, 7])
    d.update(over)
    return d


def test_manifest_properties_and_round_trip(tmp_path):
    m = Manifest.from_dict(_manifest())
    assert m.n_compressed == 5
    assert m.emulator_layers == [0, 1, 2]
    assert m.adapter_layers == [3, 4]
    assert m.full_adapter_layers == [6, 7]
    d = m.to_dict()
    assert d["emulator_layers"] == [0, 1, 2] and d["adapter_layers"] == [3, 4]
    assert Manifest.from_dict(json.loads(json.dumps(d))) == m
    m.save(tmp_path)
    assert Manifest.load(tmp_path) == m


@pytest.mark.parametrize("bad", [
    {"format_version": 2}, {"base_model": ""}, {"n_layers": "8"}, {"adapter_size": 0},
    {"adapter_size": 8}, {"drop_rate": 1.5}, {"kept_layers": [0, 3, 2, 6, 7]},
    {"kept_layers": [0, 2, 3, 5, 7]}, {"kept_layers": [1, 2, 6, 7]}, {"kept_layers": [6, 7]},
    {"kept_layers": [0, 2, "x", 6, 7]}, {"adapter_layers": [2, 3]}, {"n_layers": True},
])
def test_manifest_rejects_bad_fields(bad):
    with pytest.raises(DataError):
        Manifest.from_dict(_manifest(**bad))


@pytest.mark.parametrize("field", ["format_version", "base_model", "n_layers", "adapter_size", "drop_rate",
                                   "kept_layers"])
def test_manifest_rejects_missing_field(field):
    d = _manifest()
    del d[field]
    with pytest.raises(DataError, match=field):
        Manifest.from_dict(d)


def test_load_compressed_errors(tmp_path, tiny_llama_dir):
    with pytest.raises(ModelError, match="does not exist"):
        load_compressed(tmp_path / "nope")
    with pytest.raises(FedbiotError, match=MANIFEST_NAME):
        load_compressed(tiny_llama_dir)
    (tmp_path / "bad.json").mkdir()
    (tmp_path / "bad.json" / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(DataError):
        Manifest.load(tmp_path / "bad.json")


def test_load_compressed_layer_count_mismatch(tmp_path):
    full = tiny_model("llama", n_layers=6)
    compressed, manifest = compress(full, 2, 0.5, "x")
    save_compressed(compressed, byte_tokenizer(), manifest, tmp_path / "c")
    wrong = Manifest.from_dict({**manifest.to_dict(), "kept_layers": [0, 1, 2, 3, 4, 5],
                                "emulator_layers": [0, 1, 2, 3], "adapter_layers": [4, 5]})
    wrong.save(tmp_path / "c")
    with pytest.raises(ModelError, match="layers"):
        load_compressed(tmp_path / "c")


def test_models_with_lora_are_refused(tmp_path):
    from learning.lora import LoraSettings, attach_lora

    full = tiny_model("llama", n_layers=4)
    compressed, manifest = compress(full, 1, 0.0, "x")
    attach_lora(compressed, [3], LoraSettings(), seed=0)
    with pytest.raises(ModelError, match="LoRA"):
        save_compressed(compressed, byte_tokenizer(), manifest, tmp_path / "c")
    assert not (tmp_path / "c").exists()
    attach_lora(full, [3], LoraSettings(), seed=0)
    with pytest.raises(ModelError, match="LoRA"):
        compress(full, 1, 0.0, "x")
