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


def cpu_with_flags(monkeypatch, tmp_path, flags: str) -> None:
    """Make learning.hardware read a CPU with these flags (the conftest's default is a CPU without bf16)."""
    import learning.hardware as hw

    (tmp_path / "cpuinfo").write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    monkeypatch.setattr(hw, "CPUINFO", str(tmp_path / "cpuinfo"))


@pytest.mark.parametrize(("flags", "auto"), [("fpu avx2 avx512f", torch.float32),
                                             ("fpu avx512f avx512_bf16 amx_bf16", torch.bfloat16)])
def test_auto_on_a_cpu_is_bfloat16_where_the_cpu_computes_it_natively(monkeypatch, tmp_path, flags, auto):
    cpu_with_flags(monkeypatch, tmp_path, flags)
    if not torch.cuda.is_available():
        assert resolve_device("auto") == CPU
    assert resolve_dtype("auto", CPU) == auto
    assert resolve_hardware("cpu", None) == Hardware(CPU, auto)
    assert resolve_hardware("cpu", "auto", dp=True) == Hardware(CPU, torch.float32)  # DP-SGD keeps float32
    assert resolve_hardware("cpu", "bfloat16") == Hardware(CPU, torch.bfloat16)
    assert resolve_hardware("cpu", "float32") == Hardware(CPU, torch.float32)
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


def test_dp_keeps_float32_unless_told_otherwise(monkeypatch, tmp_path):
    cpu_with_flags(monkeypatch, tmp_path, "fpu amx_bf16")  # also where auto would be bfloat16 without DP
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


def test_a_party_placed_by_a_device_map_trains_as_the_unplaced_one(compressed_dir):
    """party --device-map / --max-memory: accelerate's placement of the compressed model (here over the CPU,
    the one device there is) trains to the same update."""
    plain = _train(PartyModel.load(compressed_dir, LoraSettings(r=4, alpha=8), 0))[1].adapter_state
    party = PartyModel.load(compressed_dir, LoraSettings(r=4, alpha=8), 0, device_map="auto",
                            max_memory={"cpu": 10**9})
    assert {p.device.type for p in party.model.parameters()} == {"cpu"}
    placed = _train(party)[1].adapter_state
    assert placed.keys() == plain.keys() and all(torch.equal(placed[n], plain[n]) for n in plain)


def test_a_party_placement_that_offloads_is_refused(compressed_dir, tmp_path):
    from errors import ModelError

    with pytest.raises(ModelError, match="every layer carries LoRA and cannot be offloaded"):
        PartyModel.load(compressed_dir, LoraSettings(r=4, alpha=8), 0, device_map="auto",
                        max_memory={"cpu": 60_000, "disk": 10**9})


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


# ------------------------------------------------------------------------------------------ numerics

@pytest.mark.parametrize(("text", "native"), [
    ("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 amx_tile\n", True),
    ("processor\t: 0\nflags\t\t: fpu sse2 avx512f amx_bf16\n", True),
    ("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n", False),
    ("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n", True),
    ("processor\t: 0\nFeatures\t: fp asimd\n", False),
])
def test_native_bf16_on_a_cpu_is_read_from_its_flags(tmp_path, monkeypatch, text, native):
    import learning.hardware as hw

    path, real = tmp_path / "cpuinfo", hw.cpu_flags
    path.write_text(text)
    assert "fpu" in real(str(path)) or "fp" in real(str(path))
    assert real(str(tmp_path / "missing")) == frozenset()
    monkeypatch.setattr(hw, "cpu_flags", lambda: real(str(path)))
    assert hw.native_bf16(CPU) is native


def test_bf16_on_cuda_means_native_support_on_the_chosen_device(monkeypatch):
    """auto asks the device it resolved, with emulation not counted (torch's default counts it)."""
    from contextlib import contextmanager

    current = [0]
    native = {0: False, 1: True}  # a pre-Ampere GPU 0 (bf16 emulated) and an Ampere GPU 1

    @contextmanager
    def select(index):
        before, current[0] = current[0], index
        yield
        current[0] = before

    def supported(including_emulation=True):
        return True if including_emulation else native[current[0]]

    monkeypatch.setattr(torch.cuda, "device", select)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    assert resolve_dtype("auto", torch.device("cuda:1")) == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cuda:0")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float32  # cuda = the current device, 0
    assert current == [0]


def _tiny_loss_party(compressed_dir, scaled: bool):
    """A float16 party whose loss is multiplied by 1e-6, so its float16 activation gradients underflow unless
    the loss is scaled; returns how far the adapter LoRA moved in one round."""
    from learning.forward import loss_scaler

    party = PartyModel.load(compressed_dir, LoraSettings(r=4, alpha=8), 0, Hardware(CPU, torch.float16))
    examples = [Example(f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}.") for i in range(12)]
    trainer = party.trainer("p", party.tokenize(examples, 64, "plain"), LoraSettings(r=4, alpha=8),
                            TrainSettings(local_steps=3, batch_size=3, lr=1e-2, prox_eps=0.0), 0)
    assert trainer.scaler.is_enabled()
    if not scaled:
        trainer.scaler = torch.amp.GradScaler("cpu", enabled=False)
    loss = trainer.loss
    trainer.loss = lambda *args: tuple(1e-6 * t for t in loss(*args))
    before = lora_state(party.model, party.manifest.adapter_layers)
    update = trainer.train_round(0, before, lora_state(party.model, party.manifest.emulator_layers))
    assert loss_scaler(party.model).is_enabled()
    return max(float((update.adapter_state[n] - before[n]).abs().max()) for n in before)


def test_float16_party_training_scales_its_loss(compressed_dir):
    assert _tiny_loss_party(compressed_dir, scaled=False) == 0.0  # every gradient underflowed: nothing moved
    assert _tiny_loss_party(compressed_dir, scaled=True) > 1e-4


def test_the_loss_scaler_is_off_outside_float16(compressed_dir):
    from learning.forward import loss_scaler

    for dtype in (torch.float32, torch.bfloat16):
        party = PartyModel.load(compressed_dir, LoraSettings(r=4, alpha=8), 0, Hardware(CPU, dtype))
        assert not loss_scaler(party.model).is_enabled()


def test_float16_alignment_scales_its_loss(monkeypatch, tmp_path):
    import owner.alignment as alignment
    from learning.lora import attach_lora
    from owner.models import load_model
    from tasks.prompts import tokenize_examples
    from tests.tiny_models import save_tiny

    tokenizer = byte_tokenizer()
    examples = [Example(f"Name colour {i}.", f"Colour {i} is {'red blue green'.split()[i % 3]}.") for i in range(8)]
    data = tokenize_examples(examples, tokenizer, 64, "plain")
    plain = alignment.alignment_loss

    def tiny(*args, **kwargs):  # the loss times 1e-7: its float16 gradients underflow unless scaled
        return alignment.AlignmentTerms(*(1e-7 * t for t in vars(plain(*args, **kwargs)).values()))

    moved = {}
    path = save_tiny(tmp_path / "m", "llama", 8, seed=3)
    for scaled in (False, True):
        full = load_model(str(path), torch.float16).model
        compressed, manifest = compress(full, 2, 0.5, "tiny", share_weights=True)
        lora = LoraSettings(r=4, alpha=8)
        student = attach_lora(compressed, manifest.emulator_layers + manifest.adapter_layers, lora, seed=1)
        teacher = attach_lora(full, manifest.full_adapter_layers, lora, seed=1)
        aligner = alignment.EmulatorAligner(student, teacher, manifest, data, tokenizer.pad_token_id,
                                            alignment.AlignSettings(batch_size=4, lr=1e-2), seed=0)
        assert aligner.scaler.is_enabled()
        if not scaled:
            aligner.scaler = torch.amp.GradScaler("cpu", enabled=False)
        before = lora_state(student, manifest.emulator_layers)
        with monkeypatch.context() as m:
            m.setattr(alignment, "alignment_loss", tiny)
            aligner.run(2, -1)
        after = lora_state(student, manifest.emulator_layers)
        moved[scaled] = max(float((after[n] - before[n]).abs().max()) for n in before)
    assert moved[False] == 0.0 and moved[True] > 1e-4


def test_half_precision_with_offloaded_embeddings_autocasts_on_the_execution_device(tmp_path):
    """Embeddings offloaded to disk are a meta placeholder between forwards; autocast must still be for the
    device that runs them."""
    from learning.forward import model_device, precision_context, response_token_losses
    from owner.models import Placement, load_model
    from tasks.batching import collate
    from tasks.prompts import tokenize_examples
    from tests.tiny_models import save_tiny

    path = save_tiny(tmp_path / "m", "qwen2", 4)
    device_map = {"model.embed_tokens": "disk", "model.layers": "cpu", "model.norm": "cpu",
                  "model.rotary_emb": "cpu", "lm_head": "cpu"}
    placed = load_model(str(path), torch.bfloat16, Placement(device_map, None, str(tmp_path / "off"))).model
    plain = load_model(str(path), torch.bfloat16).model
    assert placed.get_input_embeddings().weight.device.type == "meta"
    assert model_device(placed) == CPU
    with precision_context(placed):
        assert torch.is_autocast_enabled("cpu")
    tokenizer = byte_tokenizer()
    batch = collate(tokenize_examples([Example("Say hi.", "Hi there.")] * 2, tokenizer, 96, "plain"),
                    tokenizer.pad_token_id)
    with torch.no_grad():
        got, want = response_token_losses(placed, batch).losses, response_token_losses(plain, batch).losses
    assert torch.isfinite(got).all() and torch.equal(got, want)
