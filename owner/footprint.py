"""What the owner and a party hold, per device: one function for `owner plan` and for the owner at start-up.

The inputs are what both have: the full model's modules with their sizes (a real model, or one built on the
meta device from its config), the placement of those modules (`hf_device_map`, or the map accelerate computes
for a `--device-map` / `--max-memory`), the run's settings and the manifest of the compressed model. From them
come the decisions the owner makes (does the compressed model share the full model's tensors, where does the
E* cache live, which weights are offloaded) and the memory each device needs for them:

- weights: the full model's frozen weights resident on the device (the compressed model's are the same
  tensors when they are shared); offloaded weights are counted under `offloaded` (CPU RAM or disk), read every
  forward; the adapter layers are never offloaded (`owner.models.make_resident`);
- student: the compressed model's own copies: all of its weights with `--no-share-weights`, and, when sharing,
  the kept decoder layers the full model offloads (a layer carrying LoRA cannot stay offloaded);
- lora: both models' LoRA (float32), with the emulator LoRA's gradient and AdamW moments;
- cache: E*(x) of the public set held in memory, up to `--teacher-cache-mb`, on the boundary layer's device;
- activations: one alignment step of the student: each layer's input (with recomputed activations, the default)
  or every activation, one layer's recomputation, and one chunk of the vocabulary-sized loss
  (`learning.vocab_loss`).

Framework overhead (the CUDA context, the allocator's cache, the Python runtime) is not counted.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from learning.compressed_model import Manifest, unwrap_model
from learning.vocab_loss import chunk_rows

F32 = 4
COMPUTE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}  # an activation's bytes by the weights' dtype
# Per token and layer, the tensors a decoder layer keeps for its backward pass, in multiples of hidden /
# q / kv / intermediate: the norms' inputs and outputs, q/k/v, the attention output, the MLP's gate/up outputs
# and activation (SDPA keeps no score matrix).
_LAYER_KEEPS = {"hidden": 4, "q": 2, "kv": 2, "intermediate": 4}
# Vocabulary-sized float32 tensors alive at once in one chunk of the fused loss: the owner's KL (the student's
# logits and log-softmax, the teacher's logits, log-probabilities and probabilities, their product, the logits'
# gradient); a party's cross-entropy (logits, log-softmax, its gradient, the logits' gradient).
_CHUNK_TENSORS = {"owner": 7, "party": 4}


@dataclass(frozen=True)
class Dims:
    """The sizes of a decoder the activation estimate needs."""

    hidden: int
    intermediate: int
    q: int  # heads x head_dim
    kv: int  # kv heads x head_dim
    vocab: int

    @classmethod
    def of(cls, config: Any) -> Dims:
        """From a transformers config (its text config for a multimodal one)."""
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        kv = getattr(text, "num_key_value_heads", None) or heads
        return cls(text.hidden_size, text.intermediate_size, heads * head_dim, kv * head_dim, text.vocab_size)

    def layer_keeps(self) -> int:
        """Elements one layer keeps per token for its backward pass."""
        k = _LAYER_KEEPS
        return (k["hidden"] * self.hidden + k["q"] * self.q + k["kv"] * self.kv
                + k["intermediate"] * self.intermediate)


@dataclass
class DeviceUse:
    """Bytes one device holds (see the module docstring for each part)."""

    weights: float = 0.0
    student: float = 0.0
    lora: float = 0.0
    cache: float = 0.0
    activations: float = 0.0

    @property
    def total(self) -> float:
        return self.weights + self.student + self.lora + self.cache + self.activations


@dataclass
class Footprint:
    """Per device (resident) and offloaded bytes of one node (the owner, or a party)."""

    shares: bool
    devices: dict[str, DeviceUse] = field(default_factory=dict)
    offloaded: dict[str, float] = field(default_factory=dict)  # "cpu" (RAM, read each forward) and "disk"

    def use(self, device: str) -> DeviceUse:
        return self.devices.setdefault(device, DeviceUse())

    @property
    def total(self) -> float:
        """Everything held in memory: every device's total and the weights offloaded to CPU RAM (not disk)."""
        return sum(d.total for d in self.devices.values()) + self.offloaded.get("cpu", 0.0)

    def to_dict(self) -> dict:
        return {"shares": self.shares, "total": self.total, "offloaded": dict(self.offloaded),
                "devices": {k: {**asdict(v), "total": v.total} for k, v in self.devices.items()}}

    def describe(self) -> str:
        """One line: each device's total, and what is offloaded."""
        parts = [f"{device} {gb(use.total)}" for device, use in self.devices.items()]
        parts += [f"{gb(size)} offloaded to {where}" for where, size in self.offloaded.items() if size]
        return ", ".join(parts)


def loss_chunk_bytes(dims: Dims, tokens: int, node: str) -> float:
    """One chunk of the vocabulary-sized loss (`learning.vocab_loss`) of the owner's alignment or a party's
    training, and the gradient with respect to the hidden states it keeps for every position."""
    return min(tokens, chunk_rows(dims.vocab)) * dims.vocab * F32 * _CHUNK_TENSORS[node] + tokens * dims.hidden * F32


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


# ------------------------------------------------------------------------------------------ placement

def device_name(value: Any) -> str:
    """A device-map value as a name: 0 -> "cuda:0", torch.device("cpu") -> "cpu", "disk" stays."""
    if isinstance(value, int) and not isinstance(value, bool):
        return f"cuda:{value}"
    return str(value)


@dataclass(frozen=True)
class Place:
    """Where a module computes and, when offloaded, where its weights wait between forwards."""

    device: str
    offload: str | None = None  # "cpu" | "disk" | None


def placements(device_map: Mapping[str, Any]) -> dict[str, Place]:
    """accelerate's dispatch rule: with an accelerator in the map, "cpu" entries are CPU-offloaded and run on
    the first accelerator (as "disk" entries do); without one, "cpu" is a plain device."""
    names = {k: device_name(v) for k, v in device_map.items()}
    accelerators = [d for d in names.values() if d not in ("cpu", "disk")]
    main = accelerators[0] if accelerators else "cpu"
    out = {}
    for key, device in names.items():
        if device == "disk" or (device == "cpu" and main != "cpu"):
            out[key] = Place(main, device)
        else:
            out[key] = Place(device)
    return out


def place_of(places: Mapping[str, Place], name: str) -> Place:
    """The placement of module `name`: its own entry or the closest enclosing one."""
    best = None
    for key in places:
        if key == name or key == "" or name.startswith(key + "."):
            if best is None or len(key) > len(best):
                best = key
    if best is None:
        raise KeyError(f"no device-map entry covers {name!r}")
    return places[best]


def module_sizes(model: nn.Module) -> dict[str, int]:
    """Bytes of every module's frozen tensors (parameters once, LoRA excluded; buffers), by module name;
    works on the meta device (dtype and shape only)."""
    sizes: dict[str, int] = {}
    plain = unwrap_model(model)
    seen: set[int] = set()
    tensors = [(n, t) for n, t in plain.named_parameters()] + [(n, t) for n, t in plain.named_buffers()]
    for name, tensor in tensors:
        if ".lora_" in name or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        name = name.replace(".base_layer.", ".")
        parts = name.split(".")[:-1]
        for i in range(len(parts) + 1):
            key = ".".join(parts[:i])
            sizes[key] = sizes.get(key, 0) + tensor.numel() * tensor.element_size()
    return sizes


def lora_bytes(layer: nn.Module, r: int, targets: Iterable[str] | None) -> int:
    """float32 bytes of the LoRA `attach_lora` puts on one decoder layer (every Linear, or those named)."""
    wanted = None if targets is None else {t.rsplit(".", 1)[-1] for t in targets}
    total = 0
    for name, module in layer.named_modules():
        if ".lora_" in f".{name}" or name.endswith("base_layer"):
            continue
        if isinstance(module, nn.Linear) and (wanted is None or name.rsplit(".", 1)[-1] in wanted):
            total += r * (module.in_features + module.out_features) * F32
    return total


def _units(sizes: Mapping[str, int], device_map: Mapping[str, Any], layers_path: str, n_layers: int
           ) -> list[tuple[str, int]]:
    """The model cut into placement units: each decoder layer, and the rest by device-map entry."""
    units = [(f"{layers_path}.{i}", sizes.get(f"{layers_path}.{i}", 0)) for i in range(n_layers)]
    layers_total = sizes.get(layers_path, 0)
    for key in device_map:
        if key == layers_path or key.startswith(layers_path + "."):
            continue
        encloses = key == "" or layers_path.startswith(key + ".")
        units.append((key, sizes.get(key, 0) - (layers_total if encloses else 0)))
    return units


# ------------------------------------------------------------------------------------------ the owner

def owner_footprint(model: nn.Module, device_map: Mapping[str, Any], manifest: Manifest, config,
                    public_tokens: int, compute_bytes: int) -> Footprint:
    """What the owner holds for `config` with the full model `model` (real or on meta) placed by `device_map`.

    `public_tokens`: tokens of the public set (the E* cache holds one hidden state per token);
    `compute_bytes`: bytes of an activation (4 in float32, 2 in half precision).
    """
    plain = unwrap_model(model)
    sizes = module_sizes(plain)
    places = placements(device_map)
    path, n = manifest.layers_path, manifest.n_layers
    layers = plain.get_submodule(path)
    adapter = set(manifest.full_adapter_layers)
    layer_place = {}
    for i in range(n):
        place = place_of(places, f"{path}.{i}")
        layer_place[i] = Place(place.device) if i in adapter else place  # make_resident
    shares = config.share_weights
    out = Footprint(shares=shares)
    outer_offloaded = 0.0
    for name, size in _units(sizes, device_map, path, n):
        if name.startswith(path + "."):
            place = layer_place[int(name[len(path) + 1:])]
        else:
            place = places[name]
            outer_offloaded += size if place.offload else 0.0
        if place.offload:
            out.offloaded[place.offload] = out.offloaded.get(place.offload, 0.0) + size
        else:
            out.use(place.device).weights += size
    kept = manifest.kept_layers
    outer = sizes.get("", 0) - sizes.get(path, 0)
    head = _module_name(plain, plain.get_output_embeddings())
    head_device = place_of(places, head).device if head is not None else layer_place[n - 1].device
    student_device = {i: layer_place[k].device for i, k in enumerate(kept)}
    # the compressed model's own copies (owner.compress): everything without sharing; with it, what the full
    # model offloads (a kept layer carries LoRA, embeddings and head run every step)
    for i, k in enumerate(kept):
        if not shares or layer_place[k].offload:
            out.use(student_device[i]).student += sizes.get(f"{path}.{k}", 0)
    out.use(head_device).student += outer if not shares else outer_offloaded
    # LoRA: the teacher's on its adapter layers; the student's on every layer, the emulator's with gradient and
    # AdamW moments
    r, targets = config.lora.r, config.lora.target_modules
    emulator = set(manifest.emulator_layers)
    for k in manifest.full_adapter_layers:
        out.use(layer_place[k].device).lora += lora_bytes(layers[k], r, targets)
    for i, k in enumerate(kept):
        out.use(student_device[i]).lora += lora_bytes(layers[k], r, targets) * (4 if i in emulator else 1)
    if not manifest.emulator_layers:  # FedAvg on the full model: nothing to align
        return out
    dims = Dims.of(plain.config)
    align = config.align
    tokens = align.batch_size * config.max_length
    boundary = layer_place[n - manifest.adapter_size].device
    if align.cache_teacher:
        out.use(boundary).cache += min(align.cache_memory_mb * 2**20, public_tokens * dims.hidden * compute_bytes)
    keeps = dims.layer_keeps() * tokens * compute_bytes
    for i in range(len(kept)):
        out.use(student_device[i]).activations += (tokens * dims.hidden * compute_bytes
                                                   if align.checkpoint_activations else keeps)
    if align.checkpoint_activations:  # one layer's activations, recomputed in the backward pass
        busiest = max(dict.fromkeys(student_device.values()), key=lambda d: out.use(d).activations)  # first of ties
        out.use(busiest).activations += keeps
    out.use(head_device).activations += loss_chunk_bytes(dims, tokens, "owner")
    return out


def _module_name(root: nn.Module, module: nn.Module | None) -> str | None:
    if module is None:
        return None
    return next((name for name, m in root.named_modules() if m is module), None)


# ------------------------------------------------------------------------------------------ a party

def party_footprint(model: nn.Module, device_map: Mapping[str, Any], manifest: Manifest, config,
                    compute_bytes: int, quantized_bytes: Mapping[str, float] | None = None) -> Footprint:
    """What a party holds: the compressed model `model` (real or on meta) placed by `device_map`, LoRA on every
    layer (the adapter's with gradient, AdamW moments and the proximal reference), one training step's
    activations above the lowest trainable layer and one chunk of the loss. `quantized_bytes`: module sizes to
    use instead of the model's own (int8 / nf4 projections)."""
    plain = unwrap_model(model)
    sizes = dict(quantized_bytes) if quantized_bytes is not None else module_sizes(plain)
    places = placements(device_map)
    path, n = manifest.layers_path, manifest.n_compressed
    layers = plain.get_submodule(path)
    out = Footprint(shares=False)
    for name, size in _units(sizes, device_map, path, n):
        place = place_of(places, name)
        if place.offload:
            out.offloaded[place.offload] = out.offloaded.get(place.offload, 0.0) + size
        else:
            out.use(place.device).weights += size
    adapter = set(manifest.adapter_layers)
    dims = Dims.of(plain.config)
    tokens = config.train.batch_size * config.max_length
    lowest = min(adapter)
    for i in range(n):
        device = place_of(places, f"{path}.{i}").device
        out.use(device).lora += lora_bytes(layers[i], config.lora.r, config.lora.target_modules) * (
            5 if i in adapter else 1)
        if i >= lowest:
            out.use(device).activations += dims.layer_keeps() * tokens * compute_bytes
    head = _module_name(plain, plain.get_output_embeddings())
    head_device = place_of(places, head).device if head else place_of(places, f"{path}.{n - 1}").device
    out.use(head_device).activations += loss_chunk_bytes(dims, tokens, "party")
    return out


def meta_model(config: Any, dtype: torch.dtype) -> nn.Module:
    """The causal LM of `config` on the meta device (no memory, no weights)."""
    from accelerate import init_empty_weights  # noqa: PLC0415
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # as loading does: a tied lm_head is the embeddings' tensor, counted once
    return model


def planned_device_map(model: nn.Module, device_map: str | Mapping[str, Any] | None,
                       max_memory: Mapping[Any, Any] | None, device: str) -> dict[str, Any]:
    """The placement `from_pretrained(device_map=..., max_memory=...)` would make of `model` (built on meta):
    transformers' own computation for "auto" / "balanced" / "balanced_low_0" / "sequential", the map itself
    when one is given, and the whole model on `device` without a map."""
    if device_map is None:
        return {"": device}
    if isinstance(device_map, Mapping):
        return dict(device_map)
    if device_map not in ("auto", "balanced", "balanced_low_0", "sequential"):
        return {"": device_map}
    import logging  # noqa: PLC0415

    try:
        from transformers.integrations.accelerate import _get_device_map  # noqa: PLC0415
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import _get_device_map  # noqa: PLC0415
    from accelerate.utils import convert_file_size_to_int  # noqa: PLC0415

    memory = None if not max_memory else {
        (int(k) if str(k).isdigit() else k): convert_file_size_to_int(v) if isinstance(v, str) else int(v)
        for k, v in max_memory.items()}
    quiet = [logging.getLogger(name) for name in ("accelerate.utils.modeling", "transformers")]
    levels = [log.level for log in quiet]
    for log in quiet:  # "Device 3 is not available": planning for GPUs this machine need not have
        log.setLevel(logging.ERROR)
    try:
        return dict(_get_device_map(model, device_map, memory, None))
    finally:
        for log, level in zip(quiet, levels, strict=True):
            log.setLevel(level)
