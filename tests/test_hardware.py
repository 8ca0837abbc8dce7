"""Device, dtype and quantisation of a party's frozen weights: clear errors for what cannot run here, and
half-precision or quantised parties that train float32 LoRA and return float32 updates."""

from __future__ import annotations

import argparse
import sys

import pytest
import torch

from console.options import add_options, bind, hardware_from_args, hardware_options
from errors import ConfigError
from learning.dp import DPSettings
from learning.hardware import Hardware, resolve_device, resolve_dtype, resolve_hardware
from learning.lora import LoraSettings, lora_state
from learning.party_model import PartyModel, quantization_config
from learning.training import TrainSettings
from owner.compress import compress, save_compressed
from owner.config import RunConfig
from tasks.datasets import Example
from tests.tiny_models import byte_tokenizer, tiny_model

CPU = torch.device("cpu")


def test_auto_is_float32_on_a_cpu_and_named_devices_resolve():
    if not torch.cuda.is_available():
        assert resolve_device("auto") == CPU
        assert resolve_dtype("auto", CPU) == torch.float32
    assert resolve_hardware("cpu", "bfloat16") == Hardware(CPU, torch.bfloat16)
    assert resolve_dtype("float16", CPU) == torch.float16


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "gpu0"])
def test_unknown_devices_are_refused(device):
    with pytest.raises(ConfigError, match="--device"):
        resolve_device(device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_without_a_gpu_is_one_clear_error():
    with pytest.raises(ConfigError, match="no CUDA GPU is available"):
        resolve_device("cuda")


def test_unknown_dtype_is_refused():
    with pytest.raises(ConfigError, match="unknown --dtype"):
        resolve_dtype("int3", CPU)


def test_dp_keeps_float32_unless_told_otherwise():
    p = argparse.ArgumentParser()
    add_options(p, bind(RunConfig, hardware_options()))
    assert hardware_from_args(p.parse_args(["--device", "cpu"]), dp=True).dtype == torch.float32
    with pytest.raises(ConfigError, match="DP-SGD"):
        hardware_from_args(p.parse_args(["--device", "cpu", "--dtype", "bfloat16"]), dp=True)
    dp = DPSettings(noise_multiplier=1.0)  # the owner's simulated parties: the same rule
    assert RunConfig(device="cpu", dp=dp).hardware().dtype == torch.float32
    with pytest.raises(ConfigError, match="DP-SGD"):
        RunConfig(dtype="float16", dp=dp)


def test_unknown_quantisation_is_refused():
    with pytest.raises(ConfigError, match="--quantize"):
        quantization_config("int2", Hardware(CPU, torch.float32))


@pytest.fixture(scope="module")
def compressed_dir(tmp_path_factory):
    model, manifest = compress(tiny_model("llama", 8), 2, 0.5, "tiny")
    out = tmp_path_factory.mktemp("hw") / "compressed"
    save_compressed(model, byte_tokenizer(), manifest, out)
    return out


def _train(party: PartyModel):
    examples = [Example(f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}.") for i in range(12)]
    data = party.tokenize(examples, 64, "plain")
    trainer = party.trainer("p", data, LoraSettings(r=4, alpha=8),
                            TrainSettings(local_steps=6, batch_size=3, lr=1e-2), 0)
    adapter = lora_state(party.model, party.manifest.adapter_layers)
    emulator = lora_state(party.model, party.manifest.emulator_layers)
    return adapter, trainer.train_round(0, adapter, emulator)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_party_trains_float32_lora(compressed_dir, dtype):
    party = PartyModel.load(compressed_dir, LoraSettings(r=4, alpha=8), 0, Hardware(CPU, dtype))
    frozen = [p for n, p in party.model.named_parameters() if "lora_" not in n]
    lora = [p for n, p in party.model.named_parameters() if "lora_" in n]
    assert {p.dtype for p in frozen} == {dtype} and {p.dtype for p in lora} == {torch.float32}
    before, update = _train(party)
    assert all(t.dtype == torch.float32 for t in update.adapter_state.values())
    assert any(not torch.equal(before[n], update.adapter_state[n]) for n in before)
    assert all(torch.isfinite(t).all() for t in update.adapter_state.values())
    assert update.stats["loss_last"] < update.stats["loss_first"]


def test_a_float32_party_is_unchanged_by_the_placement_argument(compressed_dir):
    plain = PartyModel.load(compressed_dir, LoraSettings(r=4, alpha=8), 0)
    placed = PartyModel.load(compressed_dir, LoraSettings(r=4, alpha=8), 0, Hardware(CPU, torch.float32))
    a, b = _train(plain)[1].adapter_state, _train(placed)[1].adapter_state
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("quantize", ["int8", "nf4"])
def test_a_quantised_party_trains(compressed_dir, quantize):
    pytest.importorskip("bitsandbytes")
    party = PartyModel.load(compressed_dir, LoraSettings(r=4, alpha=8), 0, Hardware(CPU, torch.float32), quantize)
    kinds = {type(m).__name__ for m in party.model.modules()}
    assert kinds & {"Linear8bitLt", "Linear4bit"}, kinds
    before, update = _train(party)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in update.adapter_state.values())
    assert any(not torch.equal(before[n], update.adapter_state[n]) for n in before)


def test_a_missing_quantisation_backend_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if the extra were not installed
    with pytest.raises(ConfigError, match=r"needs bitsandbytes: pip install 'fedbiot\[quantize\]'"):
        quantization_config("nf4", Hardware(CPU, torch.float32))
