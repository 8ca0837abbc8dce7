"""The two results of a run as PEFT adapter directories, written by PEFT itself (`PeftModel.save_pretrained`).

AdapFu = the full model's PEFT model (the owner's teacher: adapter LoRA on the full model's adapter layers),
what matters for accuracy; AdapEmu = the compressed model's PEFT model (the owner's student: aligned emulator
LoRA and adapter LoRA). Each directory also gets the tokenizer (so `AutoTokenizer.from_pretrained(DIR)` works
with no base at hand) and a README.md model card (owner/model_card.py), written in one atomic step.

`adapter_config.json` names the base by the name given (`base_model_name_or_path`): a hub id, or the path the
user gave, never a cache path of the machine that trained it, so `AutoPeftModelForCausalLM.from_pretrained(DIR)`
works on any machine that has that base.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from peft import PeftModel

from errors import ModelError
from learning.compressed_model import Manifest, atomic_directory
from learning.lora import lora_state

MODEL_CARD = "README.md"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _check_state(model: PeftModel, manifest: Manifest, layers: list[int], what: str) -> None:
    """The model's LoRA lies on `layers` only and holds finite values."""
    state = lora_state(model)
    if not state:
        raise ModelError(f"nothing to export: the {what} model carries no LoRA")
    pattern = re.compile(re.escape(manifest.layers_path) + r"\.(\d+)\.")
    allowed = set(layers)
    for name, t in state.items():
        m = pattern.match(name)
        if m is None or int(m.group(1)) not in allowed:
            raise ModelError(f"{what} LoRA: {name} is not on the {what} layers {layers}")
        if not bool(torch.isfinite(t).all()):
            raise ModelError(f"{what} LoRA: {name} contains NaN or infinite values")


def save_adapter(model: PeftModel, base_name: str, out_dir: Path, tokenizer=None, card=None) -> None:
    """`model.save_pretrained(out_dir)` naming `base_name` as the base, with the tokenizer and `card` (a
    huggingface_hub ModelCard, which replaces the one PEFT writes), all or nothing."""
    config = model.peft_config[model.active_adapter]
    named = config.base_model_name_or_path
    config.base_model_name_or_path = str(base_name)
    try:
        with atomic_directory(Path(out_dir)) as tmp:
            # LoRA lies on decoder Linear layers only; False also keeps PEFT from asking the hub about the base
            model.save_pretrained(str(tmp), save_embedding_layers=False)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
            if card is not None:
                card.save(tmp / MODEL_CARD)
    finally:
        config.base_model_name_or_path = named


def export_adapfu(teacher: PeftModel, manifest: Manifest, base_name: str, out_dir: Path, tokenizer=None,
                  card=None) -> None:
    """AdapFu: `teacher` is the full model with the adapter LoRA on its adapter layers (the manifest's
    `full_adapter_layers`); `base_name` is how adapter_config.json names that full model."""
    _check_state(teacher, manifest, manifest.full_adapter_layers, "adapter")
    save_adapter(teacher, base_name, out_dir, tokenizer, card)


def export_adapemu(student: PeftModel, manifest: Manifest, compressed_dir: Path, out_dir: Path, tokenizer=None,
                   card=None, base_name: str | None = None) -> None:
    """AdapEmu: `student` is the compressed model with the emulator and the adapter LoRA; its base is the
    compressed checkpoint in `compressed_dir`, named `base_name` (default: `compressed_dir` as given)."""
    on_disk = Manifest.load(Path(compressed_dir))
    if on_disk.kept_layers != manifest.kept_layers or on_disk.n_layers != manifest.n_layers:
        raise ModelError(f"the compressed model in {compressed_dir} is not the one this run used "
                         f"(kept layers {on_disk.kept_layers} vs {manifest.kept_layers})")
    _check_state(student, manifest, [*manifest.emulator_layers, *manifest.adapter_layers], "compressed")
    save_adapter(student, base_name or str(compressed_dir), out_dir, tokenizer, card)
