"""E*(x) computed once per public example: the full model's hidden state entering the first top adapter layer.

E*(x) depends only on frozen weights (the layers below the adapter carry no LoRA in the FedBiOT layout) and on
the owner's public data, which is fixed for a run. So the teacher runs its lower layers once per example; every
later alignment step feeds the cached E*(x) straight into the adapter layers and lm_head (`upper_forward`).

The cache lives on the teacher's boundary device; past a memory bound, entries spill to one safetensors file
per example under the run directory. Those files are tied to a fingerprint of the model identity, layout,
lower-layer weights and public token ids, so a resume never reuses E* of another model or data set.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from errors import ModelError
from learning.compressed_model import Manifest
from learning.forward import execution_device, unwrap_causal_lm
from owner.models import decoder_layers
from tasks.batching import collate
from tasks.prompts import TokenizedExample

_INDEX_NAME = "cache.json"
_SAMPLES_PER_TENSOR = 64


def boundary_index(manifest: Manifest) -> int:
    """Index in the full model of the layer whose input is E*: the first top adapter layer, n - s."""
    return manifest.n_layers - manifest.adapter_size


def input_device(causal_lm: nn.Module) -> torch.device | None:
    """Where the model wants its token ids; None when accelerate's hooks move them (offloaded embeddings)."""
    weight = causal_lm.get_input_embeddings().weight
    return None if weight.device.type == "meta" else weight.device


class _Stop(Exception):
    """Raised at the boundary layer: nothing above it is needed to read E*."""


@contextmanager
def _skipping(layers: nn.ModuleList, count: int) -> Iterator[None]:
    """Replace layers[0:count] with pass-throughs, so hidden states given as input reach layer `count` as-is."""
    originals = [layers[i] for i in range(count)]
    try:
        for i, layer in enumerate(originals):
            layers[i] = _PassThrough(layer)
        yield
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer


class _PassThrough(nn.Module):
    """Stands in for a skipped decoder layer (keeps its `attention_type`, which some decoders read)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        if hasattr(layer, "attention_type"):
            self.attention_type = layer.attention_type

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


def lower_forward(teacher: nn.Module, manifest: Manifest, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """E* for a padded batch: the teacher's layers 0..n-s-1 only ([B, T, H], on the boundary layer's device)."""
    lm = unwrap_causal_lm(teacher)
    boundary = decoder_layers(lm)[boundary_index(manifest)]
    seen: list[torch.Tensor] = []

    def stop(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        seen.append(args[0] if args else kwargs["hidden_states"])
        raise _Stop

    device = input_device(lm)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if device is not None:
        ids, mask = ids.to(device), mask.to(device)
    handle = boundary.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        with torch.no_grad():
            lm.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not seen:
        raise ModelError("the teacher's forward pass never reached the first adapter layer")
    return seen[0]


def upper_forward(teacher: nn.Module, manifest: Manifest, hidden: torch.Tensor,
                  attention_mask: torch.Tensor) -> torch.Tensor:
    """The teacher's last hidden state (after the final norm) from E*: only the adapter layers run."""
    lm = unwrap_causal_lm(teacher)
    decoder = lm.get_decoder()
    with _skipping(decoder_layers(lm), boundary_index(manifest)):
        return decoder(inputs_embeds=hidden, attention_mask=attention_mask.to(hidden.device),
                       use_cache=False).last_hidden_state


def fingerprint(teacher: nn.Module, manifest: Manifest, data: Sequence[TokenizedExample]) -> str:
    """What E* depends on: model identity and layout, a sample of every lower-layer weight, the public tokens."""
    lm = unwrap_causal_lm(teacher)
    h = hashlib.sha256()
    layout = {k: getattr(manifest, k) for k in ("base_model", "n_layers", "adapter_size", "bottom_adapter_size",
                                                "kept_layers", "layers_path")}
    h.update(json.dumps(layout, sort_keys=True).encode())
    h.update(type(lm).__name__.encode())
    prefix, boundary = manifest.layers_path + ".", boundary_index(manifest)
    for name, tensor in lm.named_parameters():
        if name.startswith(prefix) and int(name[len(prefix):].split(".", 1)[0]) >= boundary:
            continue  # adapter layers and above: E* does not depend on them
        if ".lora_" in name:
            continue
        h.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
        if tensor.device.type != "meta":  # offloaded weights: identity and shapes only
            flat = tensor.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // _SAMPLES_PER_TENSOR)].float().cpu()
            h.update(sample.numpy().tobytes())
    for item in data:
        h.update(len(item.input_ids).to_bytes(4, "little"))
        h.update(torch.tensor(item.input_ids, dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()


class TeacherInputCache:
    """E*(x) of each public example (unpadded [T_i, H]), by index into the run's fixed public set.

    Holds up to `memory_bytes` on the teacher's device; further entries go to `spill_dir` as safetensors
    (or, without a spill dir, are recomputed when needed). `fingerprint` ties the spill files to the model
    and data: files of another fingerprint are removed when the cache opens.
    """

    def __init__(self, key: str, memory_bytes: int, spill_dir: Path | None = None) -> None:
        self.key, self.memory_bytes = key, int(memory_bytes)
        self.spill_dir = None if spill_dir is None else Path(spill_dir)
        self.memory: dict[int, torch.Tensor] = {}
        self.memory_used = 0
        self.spilled: set[int] = set()
        self.computed = 0  # examples whose E* this cache had the teacher compute
        if self.spill_dir is not None:
            self._open_spill_dir()

    def _open_spill_dir(self) -> None:
        index = self.spill_dir / _INDEX_NAME
        try:
            stored = json.loads(index.read_text()).get("fingerprint") if index.is_file() else None
        except (OSError, ValueError, AttributeError):
            stored = None
        if stored == self.key:
            self.spilled = {int(p.stem) for p in self.spill_dir.glob("*.safetensors") if p.stem.isdigit()}
            return
        self.clear()
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write(index, json.dumps({"fingerprint": self.key}).encode())

    def clear(self) -> None:
        """Forget every entry (memory and spill files); the fingerprint file stays."""
        self.memory.clear()
        self.memory_used = 0
        self.spilled.clear()
        if self.spill_dir is not None and self.spill_dir.is_dir():
            for path in self.spill_dir.glob("*.safetensors"):
                path.unlink(missing_ok=True)

    def __contains__(self, index: int) -> bool:
        return index in self.memory or index in self.spilled

    def get(self, index: int, device: torch.device) -> torch.Tensor | None:
        if index in self.memory:
            return self.memory[index]
        if index in self.spilled:
            path = self.spill_dir / f"{index}.safetensors"
            try:
                return load_file(path, device=str(device))["hidden"]
            except (OSError, KeyError, RuntimeError):  # removed or damaged: recompute it
                self.spilled.discard(index)
        return None

    def put(self, index: int, hidden: torch.Tensor) -> None:
        size = hidden.numel() * hidden.element_size()
        if self.memory_used + size <= self.memory_bytes:
            self.memory[index] = hidden
            self.memory_used += size
        elif self.spill_dir is not None:
            path = self.spill_dir / f"{index}.safetensors"
            tmp = path.with_name(f".{path.name}.tmp")
            save_file({"hidden": hidden.detach().contiguous().cpu()}, str(tmp), metadata={"fingerprint": self.key})
            os.replace(tmp, path)
            self.spilled.add(index)

    def batch(self, teacher: nn.Module, manifest: Manifest, data: Sequence[TokenizedExample],
              indices: Sequence[int], pad_id: int) -> torch.Tensor:
        """Padded E* [B, T, H] of `data[indices]` (right padding, zeros), computing what is not cached yet."""
        lm = unwrap_causal_lm(teacher)
        boundary = decoder_layers(lm)[boundary_index(manifest)]
        device = execution_device(boundary)
        found = {i: self.get(i, device) for i in dict.fromkeys(indices)}
        missing = [i for i, t in found.items() if t is None]
        if missing:
            hidden = lower_forward(teacher, manifest, collate([data[i] for i in missing], pad_id))
            for row, i in enumerate(missing):
                found[i] = hidden[row, :len(data[i].input_ids)].clone()
                self.put(i, found[i])
            self.computed += len(missing)
        width = max(len(data[i].input_ids) for i in indices)
        first = found[indices[0]]
        out = torch.zeros((len(indices), width, first.shape[-1]), dtype=first.dtype, device=first.device)
        for row, i in enumerate(indices):
            out[row, :found[i].shape[0]] = found[i].to(first.device)
        return out


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
