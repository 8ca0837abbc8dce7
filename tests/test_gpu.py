"""On a CUDA GPU (skipped without one; `benchmarks/gpu_check.sh` runs them): the owner's shared weights, the E*
cache, the chunked losses, float16 loss scaling, and the owner spread by a device map, each on tiny models."""

from __future__ import annotations

import pytest
import torch

from learning.forward import response_logits, response_token_losses
from learning.hardware import Hardware, native_bf16, resolve_dtype
from learning.lora import LoraSettings, attach_lora, lora_state, set_trainable
from learning.party_model import PartyModel
from learning.training import TrainSettings
from owner.alignment import AlignSettings, EmulatorAligner
from owner.compress import compress, kept_layer_indices, save_compressed
from owner.models import Placement, load_model, make_resident
from tasks.batching import collate
from tasks.datasets import Example
from tasks.prompts import tokenize_examples
from tests.tiny_models import byte_tokenizer, save_tiny, tiny_model

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda:0")
LORA = LoraSettings(r=4, alpha=8)


def data(count: int = 12):
    examples = [Example(f"Name colour {i}.", f"Colour {i} is {'red blue green'.split()[i % 3]} and bright.")
                for i in range(count)]
    return tokenize_examples(examples, byte_tokenizer(), 64, "plain")


def align(full, cache: bool = False, steps: int = 3):
    """(first loss, last loss, the emulator LoRA, the student) after `steps` alignment steps on `full`."""
    make_resident(full, ["model.layers.6", "model.layers.7"])  # the adapter layers, as OwnerSession does
    compressed, manifest = compress(full, 2, 0.5, "tiny", share_weights=True)
    student = attach_lora(compressed, manifest.emulator_layers + manifest.adapter_layers, LORA, seed=1)
    teacher = attach_lora(full, manifest.full_adapter_layers, LORA, seed=1)
    aligner = EmulatorAligner(student, teacher, manifest, data(), byte_tokenizer().pad_token_id,
                              AlignSettings(batch_size=4, lr=1e-2, cache_teacher=cache), seed=0)
    info = aligner.run(steps, -1)
    state = {k: v.cpu() for k, v in lora_state(student, manifest.emulator_layers).items()}
    return info["loss_first"], info["loss_last"], state, student


def test_the_compressed_model_shares_the_full_models_gpu_tensors():
    full = tiny_model("llama", 8, seed=3).to(CUDA)
    compressed, _ = compress(full, 2, 0.5, "tiny", share_weights=True)
    ptrs = {p.data_ptr() for p in full.parameters()}
    assert all(p.device == CUDA and p.data_ptr() in ptrs for p in compressed.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_teacher_cache_changes_no_alignment_loss_on_the_gpu(dtype):
    runs = [align(tiny_model("llama", 8, seed=3).to(CUDA, dtype), cache) for cache in (False, True)]
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert abs(runs[0][0] - runs[1][0]) <= tol and abs(runs[0][1] - runs[1][1]) <= tol


def test_chunked_cross_entropy_equals_the_whole_vocabulary_on_the_gpu():
    model, manifest = compress(tiny_model("llama", 8, seed=0).to(CUDA), 2, 0.5, "tiny")
    model = attach_lora(model, manifest.adapter_layers, LORA, seed=1)
    params = set_trainable(model, manifest.adapter_layers)
    batch = collate(data()[:6], byte_tokenizer().pad_token_id)
    out = response_logits(model, batch)
    whole = torch.nn.functional.cross_entropy(out.logits, out.targets)
    chunked = response_token_losses(model, batch).losses.mean()
    assert torch.allclose(chunked, whole, rtol=1e-5)
    for got, want in zip(torch.autograd.grad(chunked, params), torch.autograd.grad(whole, params), strict=True):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)


def test_a_float16_party_on_the_gpu_gets_finite_nonzero_updates(tmp_path):
    model, manifest = compress(tiny_model("llama", 8), 2, 0.5, "tiny")
    save_compressed(model, byte_tokenizer(), manifest, tmp_path / "c")
    party = PartyModel.load(tmp_path / "c", LORA, 0, Hardware(CUDA, torch.float16))
    examples = [Example(f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}.") for i in range(12)]
    trainer = party.trainer("p", party.tokenize(examples, 64, "plain"), LORA,
                            TrainSettings(local_steps=4, batch_size=3, lr=1e-2), 0)
    assert trainer.scaler.is_enabled()
    before = lora_state(party.model, party.manifest.adapter_layers)
    update = trainer.train_round(0, before, lora_state(party.model, party.manifest.emulator_layers))
    assert all(torch.isfinite(t).all() for t in update.adapter_state.values())
    assert max(float((update.adapter_state[n] - before[n].cpu()).abs().max()) for n in before) > 0


def test_auto_dtype_asks_the_chosen_gpu():
    for index in range(torch.cuda.device_count()):
        device = torch.device(f"cuda:{index}")
        native = torch.cuda.get_device_capability(index) >= (8, 0)
        assert native_bf16(device) is native
        assert resolve_dtype("auto", device) == (torch.bfloat16 if native else torch.float32)


def test_an_owner_spread_over_the_gpu_and_cpu_offload_aligns_on_the_gpu(tmp_path):
    """Layers the GPU cannot hold are CPU-offloaded; the student's layers are the GPU's tensors or copies on the
    GPU, never a CPU copy, and alignment gives the losses of the model wholly on the GPU."""
    path = save_tiny(tmp_path / "m", "llama", 8, seed=3)
    plain = load_model(str(path), placement=Placement({"": "cuda:0"}, None, None)).model
    spread = load_model(str(path), placement=Placement("auto", {0: 200_000, "cpu": 10**9},
                                                       str(tmp_path / "off"))).model
    assert "cpu" in set(map(str, spread.hf_device_map.values()))
    want, got = align(plain), align(spread)
    assert {p.device for n, p in got[3].named_parameters() if "lora_" not in n} == {CUDA}
    assert abs(want[0] - got[0]) < 1e-5 and abs(want[1] - got[1]) < 1e-5


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_an_owner_over_two_gpus_keeps_each_student_layer_on_its_teachers_gpu(tmp_path):
    path = save_tiny(tmp_path / "m", "llama", 8, seed=3)
    plain = load_model(str(path), placement=Placement({"": "cuda:0"}, None, None)).model
    halves = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": 1, "lm_head": 1}
    halves |= {f"model.layers.{i}": 0 if i < 4 else 1 for i in range(8)}
    spread = load_model(str(path), placement=Placement(halves, None, None)).model
    want, got = align(plain), align(spread)
    student = got[3].get_base_model()
    kept = kept_layer_indices(8, 2, 0.5)
    for i, layer in enumerate(student.model.layers):
        device = {p.device.index for n, p in layer.named_parameters() if "lora_" not in n}
        assert device == {spread.hf_device_map[f"model.layers.{kept[i]}"]}, i
    assert abs(want[1] - got[1]) < 1e-5
