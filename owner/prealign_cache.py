"""A cache of the pre-aligned emulator, so a grid of runs (or a rerun) pays pre-alignment once.

Pre-alignment is a deterministic function of the model's weights, the compression layout, the LoRA settings and
initial LoRA, the public tokens, the alignment settings and the seed. An entry under the cache directory, named
by a hash of all of these, holds what pre-alignment leaves behind: the emulator LoRA (safetensors), the aligner's
AdamW state (safetensors + param groups, no pickle) and the pre-alignment record. A run whose key matches loads it
instead of aligning and continues bit-identically; any other run computes and stores its own entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from errors import ConfigError
from learning.compressed_model import Manifest
from learning.forward import unwrap_causal_lm
from owner.state import optimizer_from_tensors, optimizer_to_tensors, write_atomic_dir
from tasks.prompts import TokenizedExample

_SAMPLES_PER_TENSOR = 64
# Settings that do not change what pre-alignment computes (where E* lives, what is measured afterwards).
_NOT_IN_KEY = ("cache_memory_mb", "checkpoint_activations", "fidelity_batches", "round_steps")


@dataclass
class PreAlignment:
    """What pre-alignment leaves behind."""

    emulator_state: dict[str, torch.Tensor]
    optimizer_state: dict
    info: dict


def _state_hash(h, state: dict[str, torch.Tensor]) -> None:
    for name in sorted(state):
        t = state[name].detach().float().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())


def _model_hash(h, teacher: nn.Module) -> None:
    """The frozen weights by identity, shape, dtype and a sample of values (LoRA left out)."""
    lm = unwrap_causal_lm(teacher)
    h.update(type(lm).__name__.encode())
    for name, tensor in lm.named_parameters():
        if ".lora_" in name:
            continue
        h.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
        if tensor.device.type != "meta":  # offloaded weights: identity and shapes only
            flat = tensor.detach().reshape(-1)
            h.update(flat[:: max(1, flat.numel() // _SAMPLES_PER_TENSOR)].float().cpu().numpy().tobytes())


def _tokens_hash(h, items: Sequence[TokenizedExample]) -> None:
    for item in items:
        h.update(len(item.input_ids).to_bytes(4, "little"))
        h.update(torch.tensor(item.input_ids, dtype=torch.int64).numpy().tobytes())
        h.update(torch.tensor(item.labels, dtype=torch.int64).numpy().tobytes())


def prealign_key(teacher: nn.Module, manifest: Manifest, public: Sequence[TokenizedExample], *, align: dict,
                 lora: dict, seed: int, adapter_state: dict[str, torch.Tensor],
                 emulator_state: dict[str, torch.Tensor]) -> str:
    """Hash of everything pre-alignment depends on (weights by identity, shape, dtype and a sample of values)."""
    h = hashlib.sha256()
    meta = {"manifest": manifest.to_dict(),
            "align": {k: v for k, v in align.items() if k not in _NOT_IN_KEY}, "lora": lora, "seed": seed}
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    _model_hash(h, teacher)
    _state_hash(h, adapter_state)
    _state_hash(h, emulator_state)
    _tokens_hash(h, public)
    return h.hexdigest()[:32]


def cached_base_nll(cache_dir: Path, teacher: nn.Module, items: Sequence[TokenizedExample],
                    compute: Callable[[], dict[str, float | None]]) -> dict[str, float | None]:
    """The untouched model's held-out scores (`compute()`: {"nll": ..., "answer_nll": ...}), computed once per
    (weights, evaluation tokens) across the runs that share the cache (the same numbers every time: a grid need
    not pay them per run). An entry without every score is computed again."""
    h = hashlib.sha256(b"base-nll")
    _model_hash(h, teacher)
    _tokens_hash(h, items)
    path = Path(cache_dir) / f"base-nll-{h.hexdigest()[:32]}.json"
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
            float(saved["nll"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"cache entry {path} is unreadable ({exc}); remove it") from exc
        if "answer_nll" in saved:
            return saved
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # runs may share the cache
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(value) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return value


def load_prealigned(cache_dir: Path, key: str) -> PreAlignment | None:
    """The entry of `key`, or None when there is none (an unreadable entry is an error, not a silent redo)."""
    entry = Path(cache_dir) / key
    if not (entry / "info.json").is_file():
        return None
    try:
        meta = json.loads((entry / "info.json").read_text())
        emulator = load_file(str(entry / "emulator.safetensors"))
        optimizer = optimizer_from_tensors(load_file(str(entry / "optimizer.safetensors")),
                                           meta["optimizer_param_groups"])
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"pre-alignment cache entry {entry} is unreadable ({exc}); remove it") from exc
    if meta.get("key") != key:
        raise ConfigError(f"pre-alignment cache entry {entry} belongs to another key; remove it")
    return PreAlignment(emulator, optimizer, dict(meta["info"]))


def store_prealigned(cache_dir: Path, key: str, result: PreAlignment) -> Path:
    """Write the entry atomically (a concurrent or interrupted writer leaves no half entry)."""
    target = Path(cache_dir) / key
    tensors, groups = optimizer_to_tensors(result.optimizer_state)

    def fill(tmp: Path) -> None:
        save_file({k: v.contiguous() for k, v in result.emulator_state.items()}, str(tmp / "emulator.safetensors"))
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "info.json").write_text(json.dumps({"key": key, "info": result.info,
                                                   "optimizer_param_groups": groups}, indent=1, default=float))

    write_atomic_dir(target, fill)
    return target
