"""The owner on real hardware: one copy of the model (student shares the teacher's tensors), E*(x) computed
once per public example, and accelerate placement with CPU/disk offload for the full model."""

from __future__ import annotations

import json

import pytest
import torch
from peft.tuners.lora import LoraLayer

from errors import ModelError
from learning.compressed_model import load_compressed
from learning.lora import LoraSettings, attach_lora, lora_state
from owner.alignment import AlignSettings, EmulatorAligner, alignment_loss
from owner.cli import main
from owner.compress import compress, save_compressed
from owner.config import RunConfig
from owner.models import Placement, load_model, make_resident, parse_max_memory, single_device
from owner.teacher_cache import TeacherInputCache, fingerprint, lower_forward, upper_forward
from tasks.batching import collate
from tasks.datasets import Example
from tasks.prompts import tokenize_examples
from tests.test_simulate import adapfu_tensors, args_for
from tests.tiny_models import byte_tokenizer, save_tiny, tiny_model

LORA = LoraSettings(r=4, alpha=8)


def public_data(tokenizer, count: int = 16):
    colours = "red blue green".split()
    examples = [Example(f"Name a colour number {i}{'!' * (i % 5)}.", f"Colour {i} is {colours[i % 3]}.")
                for i in range(count)]
    return tokenize_examples(examples, tokenizer, 64, "plain")


def owner_models(arch="llama", share=True, bottom=0, full=None):
    """(student, teacher, manifest, full model) built as OwnerSession builds them."""
    full = tiny_model(arch, 8, seed=3) if full is None else full
    compressed, manifest = compress(full, 2, 0.5, "tiny", bottom, share_weights=share)
    student = attach_lora(compressed, manifest.emulator_layers + manifest.adapter_layers, LORA, seed=1)
    teacher = attach_lora(full, manifest.full_adapter_layers, LORA, seed=1)
    return student, teacher, manifest, full


def full_name(name: str, kept: list[int]) -> str:
    if name.startswith("model.layers."):
        index, rest = name[len("model.layers."):].split(".", 1)
        return f"model.layers.{kept[int(index)]}.{rest}"
    return name


def base_weights(model) -> dict[str, torch.Tensor]:
    """Frozen (non-LoRA) parameters under their plain causal-LM names."""
    plain = model.get_base_model()
    return {n.replace(".base_layer", ""): p for n, p in plain.named_parameters(remove_duplicate=False)
            if ".lora_" not in n}


# ------------------------------------------------------------------------------------------ sharing

@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3_text"])
def test_student_frozen_tensors_are_the_teachers(arch):
    student, teacher, manifest, _ = owner_models(arch)
    teacher_weights = base_weights(teacher)
    student_weights = base_weights(student)
    assert len(student_weights) > 10
    for name, p in student_weights.items():
        assert p.data_ptr() == teacher_weights[full_name(name, manifest.kept_layers)].data_ptr(), name
    # the student allocates nothing of its own but LoRA
    teacher_ptrs = {p.data_ptr() for p in teacher_weights.values()}
    own = [n for n, p in student.named_parameters() if p.data_ptr() not in teacher_ptrs]
    assert own and all(".lora_" in n for n in own)


def test_copied_student_owns_its_tensors():
    student, teacher, manifest, _ = owner_models(share=False)
    teacher_ptrs = {p.data_ptr() for p in base_weights(teacher).values()}
    assert not any(p.data_ptr() in teacher_ptrs for p in base_weights(student).values())


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_lora_sets_stay_separate(arch):
    student, teacher, manifest, _ = owner_models(arch)
    student_lora = [m for m in student.modules() if isinstance(m, LoraLayer)]
    teacher_lora = [m for m in teacher.modules() if isinstance(m, LoraLayer)]
    per_layer = len(student_lora) // len(manifest.kept_layers)
    assert len(student_lora) == per_layer * len(manifest.kept_layers)
    assert len(teacher_lora) == per_layer * len(manifest.full_adapter_layers)  # no LoRA leaked onto E*
    assert not {id(m) for m in student_lora} & {id(m) for m in teacher_lora}
    assert all(list(m.lora_A) == ["default"] for m in student_lora + teacher_lora)  # one LoRA per module
    student_ptrs = {p.data_ptr() for n, p in student.named_parameters() if ".lora_" in n}
    assert not student_ptrs & {p.data_ptr() for n, p in teacher.named_parameters() if ".lora_" in n}

    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        teacher_before, student_before = teacher(input_ids=ids).logits, student(input_ids=ids).logits
        for name, p in student.named_parameters():  # move every student LoRA
            if ".lora_B" in name:
                p.fill_(0.05)
        assert torch.equal(teacher(input_ids=ids).logits, teacher_before)
        student_mid = student(input_ids=ids).logits
        assert not torch.equal(student_mid, student_before)
        for name, p in teacher.named_parameters():  # and every teacher LoRA
            if ".lora_B" in name:
                p.fill_(-0.05)
        assert not torch.equal(teacher(input_ids=ids).logits, teacher_before)
        assert torch.equal(student(input_ids=ids).logits, student_mid)


def test_shared_compressed_model_saves_a_standalone_checkpoint(tmp_path):
    full = tiny_model("gemma3_text", 8, seed=2)
    copied, _ = compress(full, 2, 0.5, "tiny")
    shared, manifest = compress(full, 2, 0.5, "tiny", share_weights=True)
    save_compressed(shared, byte_tokenizer(), manifest, tmp_path / "c")
    loaded, _, loaded_manifest = load_compressed(tmp_path / "c")
    assert loaded_manifest.kept_layers == manifest.kept_layers
    assert len(loaded.model.layers) == len(manifest.kept_layers)
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, copied(input_ids=ids).logits)
    full_ptrs = {p.data_ptr() for p in full.parameters()}
    assert not any(p.data_ptr() in full_ptrs for p in loaded.parameters())


def test_an_offloaded_model_shares_what_is_resident_and_copies_what_is_offloaded(tmp_path):
    path = save_tiny(tmp_path / "m", "llama", 8)
    off = load_model(str(path), placement=Placement("auto", {"cpu": 150_000}, str(tmp_path / "off"))).model
    assert single_device(off) is None and "disk" in set(off.hf_device_map.values())
    compressed, manifest = compress(off, 2, 0.5, "tiny", share_weights=True)
    full = dict(off.named_parameters())
    shared = copied = 0
    for name, p in compressed.named_parameters():
        source = full[full_name(name, manifest.kept_layers)]
        assert p.device.type == "cpu"  # nothing of the compressed model is offloaded: it carries LoRA
        if source.device.type == "meta":
            copied += 1
        else:
            assert p.data_ptr() == source.data_ptr(), name
            shared += 1
    assert shared and copied
    plain = load_model(str(path)).model
    reference, _ = compress(plain, 2, 0.5, "tiny")
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(compressed(input_ids=ids).logits, reference(input_ids=ids).logits)


# ------------------------------------------------------------------------------------------ E* cache

def test_cached_teacher_input_equals_recomputation():
    tokenizer = byte_tokenizer()
    student, teacher, manifest, _ = owner_models()
    data = public_data(tokenizer)
    with torch.no_grad():
        for name, p in teacher.named_parameters():  # a non-trivial adapter LoRA on the teacher
            if ".lora_B" in name:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(name)))
    cache = TeacherInputCache("k", 2**30)
    first = cache.batch(teacher, manifest, data, [0, 1, 2, 3], tokenizer.pad_token_id)
    assert cache.computed == 4
    indices = [5, 2, 0, 9]  # two cached, two new, in another batch with other padding
    batch = collate([data[i] for i in indices], tokenizer.pad_token_id)
    cached = cache.batch(teacher, manifest, data, indices, tokenizer.pad_token_id)
    assert cache.computed == 6
    with torch.no_grad():
        out = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      output_hidden_states=True)
    real = batch["attention_mask"].bool()
    expected = out.hidden_states[manifest.n_layers - manifest.adapter_size]
    assert torch.allclose(cached[real], expected[real], atol=1e-6, rtol=0)
    assert torch.equal(cached[real], lower_forward(teacher, manifest, batch)[real])
    assert torch.equal(first[2, :len(data[2].input_ids)], cached[1, :len(data[2].input_ids)])  # reused as stored
    with torch.no_grad():
        upper = upper_forward(teacher, manifest, cached, batch["attention_mask"])
        full_last = teacher.get_base_model().model(input_ids=batch["input_ids"],
                                                   attention_mask=batch["attention_mask"]).last_hidden_state
    assert torch.allclose(upper[real], full_last[real], atol=1e-6, rtol=0)
    terms_cached = alignment_loss(student, teacher, manifest, batch, 1.0, cached)
    terms_plain = alignment_loss(student, teacher, manifest, batch, 1.0)
    assert abs(float(terms_cached.total) - float(terms_plain.total)) <= 1e-6


def aligner_run(share: bool, cache: bool, arch="llama", bottom=0, cache_dir=None, memory_mb=1024.0):
    tokenizer = byte_tokenizer()
    student, teacher, manifest, _ = owner_models(arch, share, bottom)
    aligner = EmulatorAligner(student, teacher, manifest, public_data(tokenizer), tokenizer.pad_token_id,
                              AlignSettings(batch_size=4, lr=1e-2, cache_teacher=cache, cache_memory_mb=memory_mb),
                              seed=0, cache_dir=cache_dir)
    losses: list[tuple] = []
    for stage in range(-1, 2):
        aligner.run(4, stage, lambda d: losses.append((d["loss"], d["l2"], d["kl"])))
    return losses, lora_state(student), aligner


@pytest.mark.parametrize("arch,bottom", [("llama", 0), ("gemma3_text", 0), ("llama", 2)])
def test_sharing_and_cache_leave_alignment_bit_identical(arch, bottom):
    reference_losses, reference_state, _ = aligner_run(False, False, arch, bottom)
    for share, cache in [(True, False), (False, True), (True, True)]:
        losses, state, aligner = aligner_run(share, cache, arch, bottom)
        assert losses == reference_losses, (share, cache)
        assert all(torch.equal(state[n], reference_state[n]) for n in reference_state)
        if cache:
            assert aligner.cache.computed > 0


def test_cache_spills_to_disk_and_is_tied_to_model_and_data(tmp_path):
    spill = tmp_path / "teacher_cache"
    reference, _, _ = aligner_run(True, False)
    losses, _, aligner = aligner_run(True, True, cache_dir=spill, memory_mb=0.0)
    assert losses == reference
    files = sorted(spill.glob("*.safetensors"))
    assert files and not aligner.cache.memory and len(files) == len(aligner.cache.spilled)
    key = json.loads((spill / "cache.json").read_text())["fingerprint"]
    assert key == aligner.cache.key

    # a resume with the same model and data reuses the spilled E* and computes nothing it has
    tokenizer = byte_tokenizer()
    _, teacher, manifest, _ = owner_models()
    data = public_data(tokenizer)
    again = TeacherInputCache(fingerprint(teacher, manifest, data), 0, spill)
    assert again.spilled == aligner.cache.spilled
    index = sorted(again.spilled)[0]
    again.batch(teacher, manifest, data, [index], tokenizer.pad_token_id)
    assert again.computed == 0

    # other data, other weights or another layout: another fingerprint, and the old files are dropped
    other_data = public_data(tokenizer, 15)
    assert fingerprint(teacher, manifest, other_data) != key
    _, other_teacher, _, _ = owner_models(full=tiny_model("llama", 8, seed=4))
    assert fingerprint(other_teacher, manifest, data) != key
    _, _, other_manifest, _ = owner_models(bottom=2)
    assert fingerprint(teacher, other_manifest, data) != key
    TeacherInputCache(fingerprint(teacher, manifest, other_data), 0, spill)
    assert not list(spill.glob("*.safetensors"))


# ------------------------------------------------------------------------------------------ placement

def test_offloaded_teacher_matches_the_plain_one(tmp_path):
    path = save_tiny(tmp_path / "m", "llama", 8)
    plain = load_model(str(path)).model
    size = sum(p.numel() * p.element_size() for p in plain.parameters())
    placement = Placement("auto", {"cpu": size // 2}, str(tmp_path / "offload"))
    off = load_model(str(path), placement=placement).model
    assert "disk" in set(off.hf_device_map.values())
    assert any(p.device.type == "meta" for p in off.parameters())
    ids = torch.randint(0, 256, (2, 14), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(off(input_ids=ids).logits, plain(input_ids=ids).logits)

    # compression reads offloaded weights; alignment through the offloaded teacher equals the plain run
    tokenizer = byte_tokenizer()
    runs = []
    for full, cache in [(plain, False), (off, False), (off, True)]:
        make_resident(full, [f"model.layers.{i}" for i in (6, 7)])  # the adapter layers, as OwnerSession does
        compressed, manifest = compress(full, 2, 0.5, "tiny", share_weights=True)
        student = attach_lora(compressed, manifest.emulator_layers + manifest.adapter_layers, LORA, seed=1)
        teacher = attach_lora(full, manifest.full_adapter_layers, LORA, seed=1)
        aligner = EmulatorAligner(student, teacher, manifest, public_data(tokenizer), tokenizer.pad_token_id,
                                  AlignSettings(batch_size=4, lr=1e-2, cache_teacher=cache), seed=0)
        losses: list[float] = []
        aligner.run(3, -1, lambda d, out=losses: out.append(d["loss"]))
        runs.append(losses)
        teacher.unload()  # the next iteration attaches LoRA to the same full model again
    assert runs[0] == runs[1] == runs[2]
    assert all(p.device.type != "meta" for n, p in off.named_parameters() if n.startswith("model.layers.7."))


def test_lora_on_an_offloaded_layer_is_refused(tmp_path):
    path = save_tiny(tmp_path / "m", "llama", 8)
    off = load_model(str(path), placement=Placement("auto", {"cpu": 150_000}, str(tmp_path / "off"))).model
    with pytest.raises(ModelError, match="offloaded"):
        attach_lora(off, [7], LORA, seed=1)


def test_placement_input_errors():
    with pytest.raises(ModelError, match="device_map"):
        Placement(None, {"cpu": "1GiB"})
    assert parse_max_memory("0=20GiB, cpu=64GiB,disk=1000") == {0: "20GiB", "cpu": "64GiB", "disk": 1000}
    assert parse_max_memory(None) is None
    with pytest.raises(ModelError, match="DEVICE=SIZE"):
        parse_max_memory("20GiB")


def test_run_is_bit_identical_with_sharing_cache_and_offload(tiny_llama_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    words = "red blue green".split()
    rows = {"train.jsonl": [{"instruction": f"Colour {i}?", "input": "", "output": f"It is {words[i % 3]}."}
                            for i in range(12)],
            "public.jsonl": [{"instruction": f"Say hi {i}.", "context": "", "response": "hi " * (i % 3 + 1),
                              "category": "open_qa"} for i in range(8)],
            "eval.jsonl": [{"question": f"{i} + 1?", "answer": f"#### {i + 1}"} for i in range(4)]}
    for name, items in rows.items():
        (data / name).write_text("".join(json.dumps(r) + "\n" for r in items))
    runs = {}
    for label, extra in [("plain", ["--no-share-weights", "--no-teacher-cache"]),
                         ("owner-memory", []),
                         ("offload", ["--device-map", "auto", "--max-memory", "cpu=150000",
                                      "--offload-folder", str(tmp_path / "offload")])]:
        out = tmp_path / label
        assert main(args_for(tiny_llama_dir, data, out, *extra)) == 0
        runs[label] = json.loads((out / "summary.json").read_text()), adapfu_tensors(out)
    for key in ("nll_base", "nll_adapemu", "nll_adapfu"):
        assert runs["owner-memory"][0][key] == runs["plain"][0][key] == runs["offload"][0][key], key
    reference = runs["plain"][1]
    for label in ("owner-memory", "offload"):
        assert all(torch.equal(runs[label][1][n], reference[n]) for n in reference), label
    assert (tmp_path / "owner-memory" / "teacher_cache" / "cache.json").is_file()
    # what each owner reported holding is what `owner plan` plans for the same options (the E* cache aside:
    # the plan bounds it by --public-limit x --max-length, the owner counts the tokens it has)
    footprints = {label: next(json.loads(line) for line in (tmp_path / label / "metrics.jsonl").open()
                              if '"footprint"' in line) for label in runs}
    assert footprints["plain"]["devices"]["cpu"]["student"] > 0 and not footprints["plain"]["shares"]
    assert footprints["owner-memory"]["devices"]["cpu"]["student"] == 0 and footprints["owner-memory"]["shares"]
    offload = footprints["offload"]
    assert offload["offloaded"]["disk"] > 0 and offload["devices"]["cpu"]["student"] > 0
    from owner.plan import make_plan, read_model_config, shape_from_config

    config = RunConfig(device_map="auto", max_memory={"cpu": 150000}, dtype="float32", max_length=96,
                       align=AlignSettings(round_steps=1, pre_steps=2))
    planned = make_plan(shape_from_config(read_model_config(str(tiny_llama_dir))[1]), config).owner_split
    for use in (*offload["devices"].values(), *planned["devices"].values()):
        use["total"] -= use.pop("cache")
    assert {k: planned[k] for k in ("devices", "offloaded")} == {k: offload[k] for k in ("devices", "offloaded")}


def test_owner_memory_benchmark_worker(tiny_llama_dir):
    from benchmarks.owner_memory import MEMORY_MODES, TIME_MODES, markdown, summarise, worker

    common = {"model": str(tiny_llama_dir), "threads": 1, "public": 24, "max_length": 256, "batch_size": 2,
              "adapter_size": 2, "drop_rate": 0.5, "steps": 2, "prefill": True, "label": "tiny"}
    old = worker({**common, **MEMORY_MODES["old"]})
    shared = worker({**common, **MEMORY_MODES["shared"]})
    new = worker({**common, **MEMORY_MODES["new"]})
    assert old["student_own_bytes"] > 0 and new["student_own_bytes"] == 0
    assert new["filled_examples"] > 0 and new["cache_bytes"] > 0 and old["cache_bytes"] == 0
    assert shared["losses"] == old["losses"] and len(new["step_seconds"]) == 2
    assert new["losses"] == pytest.approx(shared["losses"], rel=1e-5)  # chunked KL, recomputed activations
    assert new["model_bytes"] == old["model_bytes"] > 0
    result = {"label": "tiny", "memory": {**{m: shared for m in MEMORY_MODES}, "old": old, "new": new},
              "live": {m: new for m in MEMORY_MODES}, "time": {m: new for m in TIME_MODES}}
    result["summary"] = summarise(result)
    text = markdown({"settings": {}, "environment": {}, "models": [result]})
    assert text.count("| tiny |") == 3 and f"{result['summary']['new_live_peak_x']:.2f}x" in text


def test_the_student_is_placed_where_the_teacher_computes_each_kept_module():
    """A teacher spread over two GPUs (lm_head CPU-offloaded, so run on the first GPU): each module of the
    compressed model computes on the device of its counterpart, dropped layers have no place, nothing is
    offloaded (the student carries LoRA)."""
    from owner.compress import kept_layer_indices, student_placement
    from owner.footprint import Place

    full = tiny_model("llama", 8)
    full.hf_device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": 1, "lm_head": "cpu",
                          **{f"model.layers.{i}": 0 if i < 4 else 1 for i in range(8)}}
    kept = kept_layer_indices(8, 2, 0.5)
    places = student_placement(full, "model.layers", kept)
    gpu = {0: Place("cuda:0"), 1: Place("cuda:1")}
    assert places == {"model.embed_tokens": gpu[0], "model.rotary_emb": gpu[0], "model.norm": gpu[1],
                      "lm_head": gpu[0], **{f"model.layers.{i}": gpu[0 if k < 4 else 1] for i, k in enumerate(kept)}}
    del full.hf_device_map
    assert student_placement(full, "model.layers", kept) == {"": Place("cpu")}


def test_a_model_cast_with_to_shares_its_buffers_whatever_their_dtype():
    """`.to(bfloat16)` casts the rotary inv_freq buffer too (loading in bfloat16 keeps it float32): the
    compressed model takes the full model's buffer as it is."""
    full = tiny_model("llama", 8).to(torch.bfloat16)
    compressed, _ = compress(full, 2, 0.5, "tiny", share_weights=True)
    buffers = dict(full.named_buffers())
    for name, buffer in compressed.named_buffers():
        assert buffer.data_ptr() == buffers[name].data_ptr(), name
