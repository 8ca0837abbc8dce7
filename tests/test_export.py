"""AdapFu / AdapEmu export: directories that plain transformers + peft load, reproducing the LoRA."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from errors import ModelError
from learning.lora import LoraSettings, attach_lora, load_lora_state, lora_state, remap_layer_indices
from owner.compress import compress, save_compressed
from owner.export import export_adapemu, export_adapfu
from owner.generate import generate, main
from tests.tiny_models import byte_tokenizer

TOKENS = torch.tensor([[257, 87, 104, 97, 116, 32, 105, 115, 32, 49, 50, 32, 42, 32, 55, 63]])
SETTINGS = LoraSettings(r=4, alpha=8)


def _load(path):
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def _logits(model):
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


def _randomise(model, layers, seed=0):
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=g) * 0.2 for k, v in lora_state(model, layers).items()}
    load_lora_state(model, state, layers)
    return state


def _compressed_peft(base_dir, drop_rate, seed=0):
    compressed, manifest = compress(_load(base_dir), 2, drop_rate, str(base_dir))
    peft = attach_lora(compressed, list(range(manifest.n_compressed)), SETTINGS, seed=seed)
    return peft, manifest


def _teacher(base_dir, manifest, adapter_state):
    """The full model with the adapter LoRA moved onto its last layers, as the owner holds it (AdapFu's source)."""
    teacher = attach_lora(_load(base_dir), manifest.full_adapter_layers, SETTINGS, seed=0)
    mapping = dict(zip(manifest.adapter_layers, manifest.full_adapter_layers, strict=True))
    load_lora_state(teacher, remap_layer_indices(adapter_state, mapping), manifest.full_adapter_layers)
    return teacher


def test_adapfu_with_zero_lora_is_the_base(tiny_llama_dir, tmp_path):
    peft, manifest = _compressed_peft(tiny_llama_dir, 0.5)
    teacher = _teacher(tiny_llama_dir, manifest, lora_state(peft, manifest.adapter_layers))
    export_adapfu(teacher, manifest, str(tiny_llama_dir), tmp_path / "adapfu")
    loaded = PeftModel.from_pretrained(_load(tiny_llama_dir), tmp_path / "adapfu")
    assert torch.equal(_logits(loaded), _logits(_load(tiny_llama_dir)))


def test_adapfu_files_and_weights(tiny_llama_dir, tmp_path):
    peft, manifest = _compressed_peft(tiny_llama_dir, 0.5)
    state = _randomise(peft, manifest.adapter_layers)
    export_adapfu(_teacher(tiny_llama_dir, manifest, state), manifest, "org/some-model", tmp_path / "adapfu",
                  tokenizer=byte_tokenizer())
    config = json.loads((tmp_path / "adapfu" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "org/some-model"  # the name given, not where it was loaded from
    assert config["task_type"] == "CAUSAL_LM"
    assert config["r"] == 4 and config["lora_alpha"] == 8
    assert sorted({t.split(".")[2] for t in config["target_modules"]}) == ["6", "7"]
    assert (tmp_path / "adapfu" / "tokenizer.json").is_file()
    loaded = PeftModel.from_pretrained(_load(tiny_llama_dir), tmp_path / "adapfu")
    got = lora_state(loaded)
    # compressed adapter layers 3, 4 (of 5) become the full model's layers 6, 7 (of 8)
    assert manifest.adapter_layers == [3, 4] and manifest.full_adapter_layers == [6, 7]
    assert set(got) == {k.replace("layers.3.", "layers.6.").replace("layers.4.", "layers.7.") for k in state}
    for k, v in state.items():
        assert torch.equal(got[k.replace("layers.3.", "layers.6.").replace("layers.4.", "layers.7.")], v)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapfu"]


def test_adapfu_loads_by_name_from_another_directory(tiny_llama_dir, tmp_path, monkeypatch):
    """Copied anywhere, AdapFu loads with AutoPeftModelForCausalLM alone (the base by the name it carries) and
    AutoTokenizer from its own directory."""
    peft, manifest = _compressed_peft(tiny_llama_dir, 0.5)
    teacher = _teacher(tiny_llama_dir, manifest, _randomise(peft, manifest.adapter_layers, seed=4))
    export_adapfu(teacher, manifest, str(tiny_llama_dir), tmp_path / "run" / "adapfu", tokenizer=byte_tokenizer())
    moved = shutil.copytree(tmp_path / "run" / "adapfu", tmp_path / "elsewhere" / "result")
    shutil.rmtree(tmp_path / "run")
    monkeypatch.chdir(tmp_path / "elsewhere")
    model = AutoPeftModelForCausalLM.from_pretrained("result").eval()
    tokenizer = AutoTokenizer.from_pretrained("result")
    assert torch.equal(_logits(model), _logits(teacher))
    assert tokenizer("hi")["input_ids"] == byte_tokenizer()("hi")["input_ids"]
    assert str(moved) not in (moved / "adapter_config.json").read_text()


def test_adapfu_equals_compressed_model_when_nothing_is_dropped(tiny_llama_dir, tmp_path):
    """beta = 0 keeps every layer, so E o A = E* o A: the exported AdapFu must give the same logits."""
    peft, manifest = _compressed_peft(tiny_llama_dir, 0.0)
    assert manifest.kept_layers == list(range(8))
    state = _randomise(peft, manifest.adapter_layers, seed=3)
    export_adapfu(_teacher(tiny_llama_dir, manifest, state), manifest, str(tiny_llama_dir), tmp_path / "adapfu")
    loaded = PeftModel.from_pretrained(_load(tiny_llama_dir), tmp_path / "adapfu")
    want = _logits(peft)
    assert not torch.allclose(want, _logits(_load(tiny_llama_dir)), atol=1e-3)  # the LoRA matters
    assert torch.allclose(_logits(loaded), want, atol=1e-5)


def test_adapemu_loads_on_compressed_checkpoint(tiny_llama_dir, tmp_path):
    compressed, manifest = compress(_load(tiny_llama_dir), 2, 0.5, str(tiny_llama_dir))
    save_compressed(compressed, byte_tokenizer(), manifest, tmp_path / "compressed")
    peft = attach_lora(_load(tmp_path / "compressed"), list(range(manifest.n_compressed)), SETTINGS, 0)
    _randomise(peft, manifest.emulator_layers, seed=1)
    _randomise(peft, manifest.adapter_layers, seed=2)
    export_adapemu(peft, manifest, tmp_path / "compressed", tmp_path / "adapemu")
    config = json.loads((tmp_path / "adapemu" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "compressed")
    loaded = PeftModel.from_pretrained(_load(tmp_path / "compressed"), tmp_path / "adapemu")
    assert torch.allclose(_logits(loaded), _logits(peft), atol=1e-6)
    other, other_manifest = compress(_load(tiny_llama_dir), 2, 0.0, str(tiny_llama_dir))
    with pytest.raises(ModelError, match="not the one this run used"):  # another compression's checkpoint
        export_adapemu(attach_lora(other, [0], SETTINGS, 0), other_manifest, tmp_path / "compressed", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_export_rejects_bad_states(tiny_llama_dir, tmp_path):
    peft, manifest = _compressed_peft(tiny_llama_dir, 0.5)
    out = tmp_path / "out"
    with pytest.raises(ModelError, match="not on the adapter layers"):  # LoRA on every layer: not a teacher
        export_adapfu(attach_lora(_load(tiny_llama_dir), list(range(8)), SETTINGS, 0), manifest, "base", out)
    teacher = _teacher(tiny_llama_dir, manifest, lora_state(peft, manifest.adapter_layers))
    name, param = next((n, p) for n, p in teacher.named_parameters() if "lora_A" in n)
    with torch.no_grad():
        param[0, 0] = float("nan")
    with pytest.raises(ModelError, match="NaN"):
        export_adapfu(teacher, manifest, "base", out)
    assert not out.exists()


def test_generate_cli(tiny_chat_dir, tmp_path, capsys):
    compressed, manifest = compress(_load(tiny_chat_dir), 2, 0.0, str(tiny_chat_dir))
    peft = attach_lora(compressed, manifest.adapter_layers, SETTINGS, seed=0)
    _randomise(peft, manifest.adapter_layers, seed=5)
    export_adapfu(peft, manifest, str(tiny_chat_dir), tmp_path / "adapfu")
    assert main(["--adapter", str(tmp_path / "adapfu"), "--prompt", "hi", "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out.strip()
    # The same greedy decode done by hand with the live compressed model (beta=0 -> same network).
    tok = AutoTokenizer.from_pretrained(str(tiny_chat_dir))
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = peft.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                            do_sample=False, pad_token_id=tok.pad_token_id)
    assert printed == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    assert generate(tmp_path / "adapfu", "hi", 6) == printed


def test_generate_cli_missing_dir(tmp_path, capsys):
    assert main(["--adapter", str(tmp_path / "none"), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "does not exist" in err and err.count("\n") == 1


def test_generate_loads_the_base_model_on_the_chosen_device_and_dtype(tiny_chat_dir, tmp_path, monkeypatch):
    """--device/--dtype reach from_pretrained (a 7B no longer always loads as 27 GB of float32 on the CPU)."""
    import transformers

    compressed, manifest = compress(_load(tiny_chat_dir), 2, 0.0, str(tiny_chat_dir))
    peft = attach_lora(compressed, manifest.adapter_layers, SETTINGS, seed=0)
    _randomise(peft, manifest.adapter_layers, seed=5)
    export_adapfu(peft, manifest, str(tiny_chat_dir), tmp_path / "adapfu")
    seen = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        model = real(*args, **kwargs)
        seen.append((kwargs.get("dtype"), kwargs.get("device_map"), next(model.parameters()).dtype))
        return model

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    argv = ["--adapter", str(tmp_path / "adapfu"), "--prompt", "hi", "--max-new-tokens", "4"]
    assert main([*argv, "--device", "cpu", "--dtype", "bfloat16"]) == 0
    assert seen[-1] == (torch.bfloat16, {"": "cpu"}, torch.bfloat16)
    assert main([*argv, "--device", "cpu"]) == 0  # auto on a CPU without bf16 instructions (conftest): float32
    assert seen[-1][0] == torch.float32
    import learning.hardware as hw

    (tmp_path / "cpuinfo").write_text("flags\t: fpu avx512f amx_bf16\n")
    monkeypatch.setattr(hw, "CPUINFO", str(tmp_path / "cpuinfo"))
    assert main([*argv, "--device", "cpu"]) == 0  # and on one with them: bfloat16
    assert seen[-1] == (torch.bfloat16, {"": "cpu"}, torch.bfloat16)
