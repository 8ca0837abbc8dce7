"""Compress the full model into emulator + adapter (paper Alg. 1: uniform layer drop of the lower layers).

The compressed model is an ordinary checkpoint of the same class: its config is the full config with
`num_hidden_layers` and every per-layer list cut to the kept layers, and it is built through
`from_pretrained(config=..., state_dict=...)`, i.e. exactly as a party's `from_pretrained(dir)` builds it.

On the owner the compressed model (the student) can instead share the full model's tensors: every frozen
weight of the student *is* the teacher's Parameter (same storage), so the owner holds one copy of the model
and only LoRA is per model. Parameters are shared, never modules, so PEFT wraps each model's own Linear
modules and the two LoRA sets stay apart.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from errors import ModelError
from learning.compressed_model import FORMAT_VERSION, Manifest, atomic_directory, unwrap_model
from owner.footprint import Place, place_of, placements
from owner.models import decoder_layers_path, onloaded_tensor, single_device

# Config lists that never describe one entry per layer, even when their length happens to equal n.
_NOT_PER_LAYER = frozenset({"architectures", "bad_words_ids", "suppress_tokens", "begin_suppress_tokens",
                            "eos_token_id", "forced_decoder_ids", "label2id", "id2label"})


def emulator_layer_indices(n_layers: int, adapter_size: int, drop_rate: float) -> list[int]:
    """Original indices of the emulator layers kept from E* = layers 0..n-s-1.

    n' = round((1 - beta)(n - s)) layers (beta = fraction dropped, as in the paper's Table 5 and
    reference code), spaced by stride (n-s-1)/(n'-1) so the first and last layer of E* are kept.
    """
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 2:
        raise ModelError(f"the model needs at least 2 decoder layers to split, got {n_layers}")
    if isinstance(adapter_size, bool) or not isinstance(adapter_size, int) or adapter_size < 1:
        raise ModelError(f"adapter size s must be an integer >= 1, got {adapter_size!r}")
    if adapter_size >= n_layers:
        raise ModelError(f"adapter size s={adapter_size} must be smaller than the number of layers "
                         f"({n_layers}), so that an emulator remains")
    if not isinstance(drop_rate, int | float) or not 0.0 <= float(drop_rate) < 1.0:
        raise ModelError(f"drop rate beta must be in [0, 1), got {drop_rate!r}")
    m = n_layers - adapter_size
    kept = max(1, round(round((1.0 - float(drop_rate)) * m, 9)))
    if kept == 1:
        return [0]
    # floor(j * (m-1)/(kept-1)) in exact integer arithmetic: the last index is m-1 without float drift.
    return [j * (m - 1) // (kept - 1) for j in range(kept)]


def kept_layer_indices(n_layers: int, adapter_size: int, drop_rate: float,
                       bottom_adapter_size: int = 0) -> list[int]:
    """Original indices of every layer the compressed model keeps: bottom adapter, emulator, top adapter.

    The first a and the last s layers are the adapter; the layers between (E*) are uniformly dropped. With
    a + s = n the adapter is the whole model and there is no emulator (FedAvg-LoRA on the full model).
    """
    a = bottom_adapter_size
    if isinstance(a, bool) or not isinstance(a, int) or a < 0:
        raise ModelError(f"bottom adapter size must be an integer >= 0, got {a!r}")
    if a + adapter_size == n_layers and adapter_size >= 1:
        return list(range(n_layers))
    if a and a + adapter_size > n_layers:
        raise ModelError(f"adapter of {a} + {adapter_size} layers leaves no emulator in {n_layers} layers")
    emulator = emulator_layer_indices(n_layers - a, adapter_size, drop_rate)
    return list(range(a)) + [a + i for i in emulator] + list(range(n_layers - adapter_size, n_layers))


def _cut_config(config, kept: list[int], n: int):
    """Copy of `config` with num_hidden_layers = len(kept) and every per-layer list cut to `kept`."""
    config = copy.deepcopy(config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key, value in list(vars(text).items()):
        if key in _NOT_PER_LAYER or key.startswith("_"):
            continue
        if isinstance(value, list | tuple) and len(value) == n:
            setattr(text, key, type(value)(value[i] for i in kept))
    text.num_hidden_layers = len(kept)
    return config


def _check_no_lora(model: torch.nn.Module, what: str) -> None:
    if any(".lora_" in name for name, _ in model.named_parameters()):
        raise ModelError(f"{what}: the model carries LoRA adapters; use the plain model (before attach_lora)")


def compress(model: PreTrainedModel, adapter_size: int, drop_rate: float, base_identity: str,
             bottom_adapter_size: int = 0, share_weights: bool = False) -> tuple[PreTrainedModel, Manifest]:
    """Build the compressed model (first a layers + kept emulator layers + last s layers) and its manifest.

    Embeddings, final norm and lm_head are kept as they are. The compressed model is built on the meta device
    and each of its tensors placed where the full model computes that module: with `share_weights` it *is* the
    full model's tensor (one copy on the owner), otherwise a copy on the same device. A tensor the full model
    offloads (accelerate's CPU/disk offload: a meta placeholder between forwards) is copied onto the device
    that runs it, since the compressed model carries LoRA there. A full model spread over several devices gives
    a compressed model dispatched the same way (accelerate's hooks move the activations between devices). The
    manifest records `base_identity`, not the config's `_name_or_path`.
    """
    base = unwrap_model(model)
    if not isinstance(base, PreTrainedModel):
        raise ModelError(f"compress: expected a transformers model, got {type(base).__name__}")
    _check_no_lora(base, "compress")
    path = decoder_layers_path(base)
    n = len(base.get_submodule(path))
    kept = kept_layer_indices(n, adapter_size, drop_rate, bottom_adapter_size)
    config = _cut_config(base.config, kept, n)
    config._name_or_path = ""
    places = student_placement(base, path, kept)
    compressed = _placed_compressed(base, config, path, kept, places, share_weights)
    if base.generation_config is not None:
        compressed.generation_config = copy.deepcopy(base.generation_config)
    manifest = Manifest(format_version=FORMAT_VERSION, base_model=str(base_identity), n_layers=n,
                        adapter_size=adapter_size, drop_rate=float(drop_rate), kept_layers=kept,
                        layers_path=path, bottom_adapter_size=bottom_adapter_size)
    return compressed.eval(), manifest


def student_placement(base: torch.nn.Module, path: str, kept: list[int]) -> dict[str, Place]:
    """Where each module of the compressed model computes: the device-map entries of the full model (its
    `hf_device_map`, or the one device it is on), layer k of the full model becoming layer i of the compressed
    one; dropped layers have no entry. Nothing is offloaded: an offloaded entry runs on its execution device."""
    device_map = getattr(base, "hf_device_map", None)
    if not device_map:
        device = single_device(base)
        device_map = {"": str(device) if device is not None else "cpu"}
    index = {k: i for i, k in enumerate(kept)}
    out: dict[str, Place] = {}
    for key, place in placements(device_map).items():
        if key.startswith(path + "."):
            k, _, rest = key[len(path) + 1:].partition(".")
            if int(k) not in index:
                continue
            key = f"{path}.{index[int(k)]}" + (f".{rest}" if rest else "")
        out[key] = Place(place.device)
    return out


def _full_name(name: str, path: str, kept: list[int]) -> str:
    """The full model's name of a compressed-model tensor: layer i of the compressed model is kept[i]."""
    prefix = path + "."
    if name.startswith(prefix):
        index, rest = name[len(prefix):].split(".", 1)
        return f"{prefix}{kept[int(index)]}.{rest}"
    return name


def _placed_compressed(base: PreTrainedModel, config, path: str, kept: list[int], places: dict[str, Place],
                       share: bool) -> PreTrainedModel:
    """The compressed model built on the meta device, then given the full model's Parameters and buffers
    (`share`) or copies of them on the same devices; offloaded ones copied onto their execution device.

    Nothing is allocated twice when sharing, and no tensor passes through the CPU on its way: a copy is made on
    the device of its source. Ties (lm_head = embeddings) carry over: both names map to the one tied Parameter.
    """
    try:
        with torch.device("meta"):
            compressed = type(base)._from_config(config, dtype=base.dtype)
    except (OSError, ValueError, RuntimeError, TypeError) as e:
        raise ModelError(f"cannot build the compressed {type(base).__name__}: {e}") from None
    full_params = dict(base.named_parameters(remove_duplicate=False))
    full_buffers = dict(base.named_buffers(remove_duplicate=False))
    made: dict[int, torch.Tensor] = {}  # source tensor id -> its copy, so ties stay ties
    for kind, names, source in (("_parameters", compressed.named_parameters(remove_duplicate=False), full_params),
                                ("_buffers", compressed.named_buffers(remove_duplicate=False), full_buffers)):
        for name, tensor in list(names):
            full_name = _full_name(name, path, kept)
            target = source.get(full_name)
            # a buffer (rotary inv_freq) keeps whatever dtype the full model's has, say after `.to(bfloat16)`
            dtype_differs = kind == "_parameters" and target is not None and target.dtype != tensor.dtype
            if target is None or target.shape != tensor.shape or dtype_differs:
                raise ModelError(f"compress: {name} of the compressed {type(base).__name__} has no counterpart "
                                 "in the full model")
            if target.device.type == "meta" or not share:
                if id(target) not in made:
                    value = (onloaded_tensor(base, full_name, torch.device(place_of(places, name).device))
                             if target.device.type == "meta" else target.detach().clone())
                    made[id(target)] = torch.nn.Parameter(value, requires_grad=False) \
                        if isinstance(target, torch.nn.Parameter) else value
                target = made[id(target)]
            owner_path, _, attr = name.rpartition(".")
            getattr(compressed.get_submodule(owner_path), kind)[attr] = target
    _dispatch(compressed, places)
    return compressed


def _dispatch(model: PreTrainedModel, places: dict[str, Place]) -> None:
    """Hooks that move each module's inputs to the device it computes on, when the model spans several
    devices (accelerate's `AlignDevicesHook`, weights left where they are); `hf_device_map` records the map."""
    devices = {place.device for place in places.values()}
    if len(devices) <= 1:
        return
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module  # noqa: PLC0415

    skip = getattr(model, "_skip_keys_device_placement", None)
    for key, place in places.items():
        module = model.get_submodule(key) if key else model
        add_hook_to_module(module, AlignDevicesHook(execution_device=torch.device(place.device),
                                                    io_same_device=not key, skip_keys=skip))
    model.hf_device_map = {key: place.device for key, place in places.items()}


def save_compressed(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, manifest: Manifest,
                    out_dir: Path) -> None:
    """Write checkpoint + tokenizer + `fedbiot.json`; atomic (temp dir beside out_dir, then rename)."""
    _check_no_lora(model, "save_compressed")
    n = len(unwrap_model(model).get_submodule(manifest.layers_path))
    if n != manifest.n_compressed:
        raise ModelError(f"model has {n} layers but the manifest lists {manifest.n_compressed}")
    with atomic_directory(Path(out_dir)) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        manifest.save(tmp)
