"""The two results of a run as PEFT adapter directories that `PeftModel.from_pretrained` loads.

AdapFu = full model E* with the adapter LoRA on its last s layers (what matters for accuracy);
AdapEmu = compressed model with the aligned emulator LoRA and the adapter LoRA. Both are written
directly (config + safetensors), so exporting never needs the full model in memory. Each directory may get
a README.md model card (owner/model_card.py) written in the same atomic step.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import save_file

from errors import ModelError
from learning.compressed_model import Manifest, atomic_directory
from learning.lora import LoraSettings, remap_layer_indices, split_lora_name

ADAPTER_WEIGHTS = "adapter_model.safetensors"
MODEL_CARD = "README.md"
_PEFT_PREFIX = "base_model.model."


def _check_state(state: Mapping[str, torch.Tensor], manifest: Manifest, layers: list[int], what: str,
                 settings: LoraSettings) -> None:
    """Names on `layers` only, A and B for every module, rank = settings.r, finite floats."""
    pattern = re.compile(re.escape(manifest.layers_path) + r"\.(\d+)\.")
    allowed = set(layers)
    modules: dict[str, set[str]] = {}
    for name, t in state.items():
        module, ab = split_lora_name(name)
        m = pattern.match(name)
        if m is None or int(m.group(1)) not in allowed:
            raise ModelError(f"{what} LoRA: {name} is not on the {what} layers {layers}")
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() != 2:
            raise ModelError(f"{what} LoRA: {name} must be a 2-d floating tensor")
        if not bool(torch.isfinite(t).all()):
            raise ModelError(f"{what} LoRA: {name} contains NaN or infinite values")
        rank = t.shape[0] if ab == "A" else t.shape[1]
        if rank != settings.r:
            raise ModelError(f"{what} LoRA: {name} has rank {rank}, settings say r={settings.r}")
        modules.setdefault(module, set()).add(ab)
    for module, parts in modules.items():
        if parts != {"A", "B"}:
            raise ModelError(f"{what} LoRA: {module} lacks one of its lora_A/lora_B matrices")


def _write_adapter(state: Mapping[str, torch.Tensor], base: str, settings: LoraSettings,
                   out_dir: Path, card: str | None = None) -> None:
    if not state:
        raise ModelError("nothing to export: the LoRA state is empty")
    targets = sorted({split_lora_name(name)[0] for name in state})
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=targets, bias="none", task_type="CAUSAL_LM",
                        base_model_name_or_path=base)
    tensors = {_PEFT_PREFIX + name: t.detach().to(device="cpu", dtype=torch.float32).contiguous().clone()
               for name, t in state.items()}
    with atomic_directory(Path(out_dir)) as tmp:
        config.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        if card is not None:
            (tmp / MODEL_CARD).write_text(card, encoding="utf-8")


def export_adapfu(adapter_state: Mapping[str, torch.Tensor], manifest: Manifest, base_identity: str,
                  settings: LoraSettings, out_dir: Path, card: str | None = None) -> None:
    """AdapFu: the adapter LoRA (compressed adapter layers) moved onto the full model's last s layers;
    `card` is the README.md text, if any."""
    _check_state(adapter_state, manifest, manifest.adapter_layers, "adapter", settings)
    mapping = dict(zip(manifest.adapter_layers, manifest.full_adapter_layers, strict=True))
    full = remap_layer_indices(adapter_state, mapping, manifest.layers_path)
    _write_adapter(full, str(base_identity), settings, out_dir, card)


def export_adapemu(adapter_state: Mapping[str, torch.Tensor], emulator_state: Mapping[str, torch.Tensor],
                   manifest: Manifest, compressed_dir: Path, settings: LoraSettings, out_dir: Path,
                   card: str | None = None) -> None:
    """AdapEmu: the compressed model with the aligned emulator LoRA and the adapter LoRA (`card`: README.md)."""
    compressed_dir = Path(compressed_dir).absolute()
    on_disk = Manifest.load(compressed_dir)
    if on_disk.kept_layers != manifest.kept_layers or on_disk.n_layers != manifest.n_layers:
        raise ModelError(f"the compressed model in {compressed_dir} is not the one this run used "
                         f"(kept layers {on_disk.kept_layers} vs {manifest.kept_layers})")
    _check_state(adapter_state, manifest, manifest.adapter_layers, "adapter", settings)
    _check_state(emulator_state, manifest, manifest.emulator_layers, "emulator", settings)
    _write_adapter({**emulator_state, **adapter_state}, str(compressed_dir), settings, out_dir, card)
