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
import re
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from errors import ModelError
from learning.compressed_model import FORMAT_VERSION, Manifest, atomic_directory, unwrap_model
from owner.models import decoder_layers_path, onloaded_state_dict, single_device

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

    Embeddings, final norm and lm_head are kept as they are. By default weights are copied; with
    `share_weights` every parameter and buffer of the compressed model is the full model's own tensor (one
    copy on the owner), which needs the full model on a single device (no offload); `can_share` says
    whether it is. The manifest records `base_identity`, not the config's `_name_or_path`.
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
    if share_weights:
        if not can_share(base):
            raise ModelError("compress: the full model is spread over several devices or offloaded; its "
                             "weights cannot be shared with the compressed model (build it with copies)")
        compressed = _shared_compressed(base, config, path, kept)
    else:
        compressed = _copied_compressed(base, config, path, kept)
    if base.generation_config is not None:
        compressed.generation_config = copy.deepcopy(base.generation_config)
    manifest = Manifest(format_version=FORMAT_VERSION, base_model=str(base_identity), n_layers=n,
                        adapter_size=adapter_size, drop_rate=float(drop_rate), kept_layers=kept,
                        layers_path=path, bottom_adapter_size=bottom_adapter_size)
    return compressed.eval(), manifest


def can_share(model: torch.nn.Module) -> bool:
    """Whether the compressed model can share `model`'s tensors: all of them real and on one device."""
    return single_device(unwrap_model(model)) is not None


def _full_name(name: str, path: str, kept: list[int]) -> str:
    """The full model's name of a compressed-model tensor: layer i of the compressed model is kept[i]."""
    prefix = path + "."
    if name.startswith(prefix):
        index, rest = name[len(prefix):].split(".", 1)
        return f"{prefix}{kept[int(index)]}.{rest}"
    return name


def _copied_compressed(base: PreTrainedModel, config, path: str, kept: list[int]) -> PreTrainedModel:
    new_index = {orig: i for i, orig in enumerate(kept)}
    layer_key = re.compile(re.escape(path) + r"\.(\d+)\.")
    state: dict[str, torch.Tensor] = {}
    for key, tensor in onloaded_state_dict(base).items():
        m = layer_key.match(key)
        if m is None:
            state[key] = tensor.detach().to("cpu", copy=True)
        elif int(m.group(1)) in new_index:
            state[f"{path}.{new_index[int(m.group(1))]}.{key[m.end():]}"] = tensor.detach().to("cpu", copy=True)
    try:
        compressed, info = type(base).from_pretrained(None, config=config, state_dict=state, dtype=base.dtype,
                                                      output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelError(f"cannot build the compressed {type(base).__name__}: {e}") from None
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys",
                                                             "mismatched_keys")}
    if problems:
        raise ModelError(f"compressed {type(base).__name__} does not match its weights: {problems}")
    device = single_device(base)  # a full model on one accelerator: the copy goes there too; else the CPU
    return compressed if device is None or device.type == "cpu" else compressed.to(device)


def _shared_compressed(base: PreTrainedModel, config, path: str, kept: list[int]) -> PreTrainedModel:
    """The compressed model built on the meta device, then given the full model's Parameters and buffers.

    Nothing is allocated for its weights; ties (lm_head = embeddings) carry over because both names map to
    the one tied Parameter of the full model.
    """
    try:
        with torch.device("meta"):
            compressed = type(base)._from_config(config, dtype=base.dtype)
    except (OSError, ValueError, RuntimeError, TypeError) as e:
        raise ModelError(f"cannot build the compressed {type(base).__name__}: {e}") from None
    full_params = dict(base.named_parameters(remove_duplicate=False))
    full_buffers = dict(base.named_buffers(remove_duplicate=False))
    for kind, names, source in (("_parameters", compressed.named_parameters(remove_duplicate=False), full_params),
                                ("_buffers", compressed.named_buffers(remove_duplicate=False), full_buffers)):
        for name, tensor in list(names):
            target = source.get(_full_name(name, path, kept))
            if target is None or target.shape != tensor.shape or target.dtype != tensor.dtype:
                raise ModelError(f"compress: {name} of the compressed {type(base).__name__} has no counterpart "
                                 "in the full model to share")
            owner_path, _, attr = name.rpartition(".")
            getattr(compressed.get_submodule(owner_path), kind)[attr] = target
    return compressed


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
