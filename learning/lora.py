"""LoRA on chosen decoder layers, and LoRA states under canonical names.

A LoRA state is what travels between owner and parties and what aggregation averages, so its tensor
names must not depend on wrappers: the canonical name is the wrapped module's name in the plain causal
LM + `.lora_A.weight` / `.lora_B.weight` (no `base_model.model.` prefix, no adapter name, no Opacus
`_module.`). Every function here reads the live LoRA layers of the model rather than parsing PEFT's
state-dict keys, so the names stay the same whatever wraps the model.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

from errors import ModelError
from learning.compressed_model import Manifest, decoder_layers, decoder_layers_path, unwrap_model
from learning.seeds import derive_seed, lora_module_seed
from learning.settings import LoraSettings

_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


# ------------------------------------------------------------------------------------ module lookup

def _layer_index(name: str, layers_path: str) -> int | None:
    prefix = layers_path + "."
    if not name.startswith(prefix):
        return None
    head = name[len(prefix):].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def _check_layers(model: nn.Module, layers: Sequence[int]) -> list[int]:
    n = len(decoder_layers(model))
    out = []
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n:
            raise ModelError(f"decoder layer index {i!r} is out of range for a model with {n} layers")
        out.append(i)
    return out


def _lora_modules(model: nn.Module, layers: Sequence[int] | None) -> list[tuple[str, LoraLayer, str]]:
    """(canonical module name, LoRA layer, adapter name) in module order, restricted to `layers`.

    An empty `layers` selects nothing (an empty layer group, e.g. the emulator of FedAvg-LoRA on the full
    model): its LoRA state is {}; a non-empty group without LoRA modules is an error.
    """
    if layers is not None and len(layers) == 0:
        return []
    plain = unwrap_model(model)
    path = decoder_layers_path(plain)
    wanted = None if layers is None else set(_check_layers(plain, layers))
    found: list[tuple[str, LoraLayer, str]] = []
    seen_layers: set[int] = set()
    for name, mod in plain.named_modules():
        if not isinstance(mod, LoraLayer):
            continue
        active = list(mod.active_adapters)
        if len(active) != 1:
            raise ModelError(f"{name}: expected exactly one active LoRA adapter, found {active}")
        adapter = active[0]
        if adapter not in mod.lora_A:
            continue
        idx = _layer_index(name, path)
        if wanted is not None and idx not in wanted:
            continue
        if idx is not None:
            seen_layers.add(idx)
        found.append((name, mod, adapter))
    if wanted is not None and wanted - seen_layers:
        raise ModelError(f"decoder layers {sorted(wanted - seen_layers)} have no LoRA modules")
    if not found:
        raise ModelError("the model has no LoRA modules")
    return found


def _lora_params(model: nn.Module, layers: Sequence[int] | None) -> list[tuple[str, nn.Parameter]]:
    return _params_of(_lora_modules(model, layers))


def lora_parameters(model: nn.Module, layers: Sequence[int] | None = None) -> list[tuple[str, nn.Parameter]]:
    """(canonical name, live LoRA Parameter) of `layers`, A before B, in module order (for measuring grads)."""
    return _lora_params(model, layers)


def _params_of(modules: list[tuple[str, LoraLayer, str]]) -> list[tuple[str, nn.Parameter]]:
    out: list[tuple[str, nn.Parameter]] = []
    for name, mod, adapter in modules:
        out.append((name + _SUFFIXES[0], mod.lora_A[adapter].weight))
        out.append((name + _SUFFIXES[1], mod.lora_B[adapter].weight))
    return out


def linear_module_names(model: nn.Module) -> tuple[str, ...]:
    """Names (relative to a decoder layer) of every nn.Linear in the decoder layers, in module order."""
    names: dict[str, None] = {}
    for layer in decoder_layers(model):
        for rel, mod in layer.named_modules():
            if isinstance(mod, nn.Linear) and not isinstance(mod, LoraLayer) and rel:
                names.setdefault(rel, None)
    return tuple(names)


def _target_names(model: nn.Module, layers: Sequence[int], settings: LoraSettings) -> list[str]:
    path = decoder_layers_path(model)
    rels = linear_module_names(model)
    if settings.target_modules is None:
        chosen = list(rels)
    else:
        chosen = []
        for target in settings.target_modules:
            hits = [r for r in rels if r == target or r.endswith("." + target)]
            if not hits:
                raise ModelError(f"LoRA target module {target!r} matches no Linear layer in the decoder "
                                 f"layers (available: {', '.join(rels)})")
            chosen.extend(h for h in hits if h not in chosen)
    return [f"{path}.{i}.{rel}" for i in sorted(set(layers)) for rel in chosen]


# ------------------------------------------------------------------------------------------ attach

def attach_lora(model: nn.Module, layers: Sequence[int], settings: LoraSettings, seed: int) -> PeftModel:
    """Wrap `model` with PEFT LoRA on the Linear modules of the given decoder layers only.

    A is drawn like PEFT's default (kaiming-uniform, a=sqrt(5)) but from a generator seeded by
    (seed, module name), so the same module gets the same A however many layers are attached; B = 0.
    Everything, LoRA included, starts frozen: `set_trainable` chooses what trains.
    """
    if isinstance(model, PeftModel):
        raise ModelError("attach_lora: the model already has LoRA adapters")
    layers = _check_layers(model, layers)
    if not layers:
        raise ModelError("attach_lora: no decoder layers given")
    targets = _target_names(model, layers, settings)
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=targets, bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    if any(mod.lora_A[adapter].weight.device.type == "meta" for _, mod, adapter in _lora_modules(peft_model, None)):
        raise ModelError("attach_lora: some LoRA layers are offloaded (meta tensors); keep them on a device")
    with torch.no_grad():
        for name, mod, adapter in _lora_modules(peft_model, None):
            a = mod.lora_A[adapter].weight
            gen = torch.Generator(device="cpu").manual_seed(lora_module_seed(seed, name))
            fresh = torch.empty(a.shape, dtype=torch.float32)
            nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=gen)
            a.copy_(fresh)
            mod.lora_B[adapter].weight.zero_()
    for p in peft_model.parameters():
        p.requires_grad_(False)
    return peft_model


def initial_lora(model: nn.Module, manifest: Manifest, settings: LoraSettings, run_seed: int, *,
                 full_model: bool = False) -> PeftModel:
    """A run's LoRA as it starts, attached the one way the owner and every party attach it, so that all of
    them draw the same initial A (B = 0) from the run seed: on a compressed model, every emulator and adapter
    layer; on the full model (`full_model=True`, the owner's teacher), its adapter layers."""
    layers = manifest.full_adapter_layers if full_model else [*manifest.emulator_layers, *manifest.adapter_layers]
    return attach_lora(model, layers, settings, derive_seed(run_seed, "lora-init"))


def set_trainable(model: nn.Module, layers: Sequence[int]) -> list[nn.Parameter]:
    """Only the LoRA matrices of `layers` require grad; returns them in module order (A before B)."""
    params = [p for _, p in _lora_params(model, layers)]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    return params


# ------------------------------------------------------------------------------------------- states

def lora_state(model: nn.Module, layers: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
    """Canonical-name LoRA state: fp32, contiguous, CPU, detached clones."""
    return {name: p.detach().to(device="cpu", dtype=torch.float32).clone().contiguous()
            for name, p in _lora_params(model, layers)}


def lora_state_spec(model: nn.Module, layers: Sequence[int] | None = None
                    ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Expected names -> (shape, dtype) of a LoRA state for `layers` (what a wire message must carry)."""
    return {name: (tuple(p.shape), torch.float32) for name, p in _lora_params(model, layers)}


def _describe(names: set[str], limit: int = 3) -> str:
    items = sorted(names)
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def validate_lora_state(state: Mapping[str, torch.Tensor],
                        spec: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
    """Raise ModelError unless `state` has exactly the names of `spec`, right shapes, finite floats."""
    if not isinstance(state, Mapping):
        raise ModelError("LoRA state must be a mapping of names to tensors")
    missing, extra = set(spec) - set(state), set(state) - set(spec)
    if missing:
        raise ModelError(f"LoRA state lacks {len(missing)} tensors: {_describe(missing)}")
    if extra:
        raise ModelError(f"LoRA state has {len(extra)} unexpected tensors: {_describe(extra)}")
    for name, (shape, _) in spec.items():
        t = state[name]
        if not isinstance(t, torch.Tensor):
            raise ModelError(f"LoRA state: {name} is not a tensor")
        if tuple(t.shape) != tuple(shape):
            raise ModelError(f"LoRA state: {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        if not t.is_floating_point():
            raise ModelError(f"LoRA state: {name} has dtype {t.dtype}, expected a floating type")
        if not bool(torch.isfinite(t).all()):
            raise ModelError(f"LoRA state: {name} contains NaN or infinite values")


def load_lora_state(model: nn.Module, state: Mapping[str, torch.Tensor],
                    layers: Sequence[int] | None = None, *, fold: bool = False) -> None:
    """Copy a LoRA state into the model; strict, and all-or-nothing (validated before any copy).

    fold=True is for a LoRA that stays frozen (the emulator's, on a party): scale * B @ A is also folded
    into the float32 base weights and those LoRA modules are switched off, so a forward pass through them
    costs what the plain layers cost (the extra small matmuls of unfolded LoRA cost a SmolLM2 party step
    about 10% of its speed). Whatever an earlier call folded is taken out first, so the weights always hold
    base + this state, to float rounding (a party that folds once, after a restart, can differ from one that
    folded every round in the last bits); fold=False unfolds. Weights of other dtypes keep the LoRA unfolded:
    bf16/fp16 would round most of a LoRA delta away.
    """
    modules = _lora_modules(model, layers)
    params = _params_of(modules)
    validate_lora_state(state, {name: (tuple(p.shape), torch.float32) for name, p in params})
    with torch.no_grad():
        for name, p in params:
            p.copy_(state[name].to(device=p.device, dtype=p.dtype))
        for _, mod, adapter in modules:
            _set_folded(mod, adapter, fold and mod.get_base_layer().weight.dtype == torch.float32)


_FOLDED = "_fedbiot_folded"  # on a LoRA layer: the (A, B) whose delta its base weight holds


def _set_folded(mod: LoraLayer, adapter: str, fold: bool) -> None:
    """Make the base weight hold base + the module's current LoRA delta (fold) or plain base (unfold)."""
    weight = mod.get_base_layer().weight
    a, b = mod.lora_A[adapter].weight, mod.lora_B[adapter].weight
    old = getattr(mod, _FOLDED, None)
    if not fold and old is None:
        return  # never folded: nothing to undo
    if fold and old is not None and torch.equal(old[0], a) and torch.equal(old[1], b):
        return  # already folded (several simulated parties share one model; FedOT's emulator never moves)
    transposed = getattr(mod, "fan_in_fan_out", False)
    scale = mod.scaling[adapter]

    def add(b_: torch.Tensor, a_: torch.Tensor, sign: float) -> None:
        if transposed:
            weight.addmm_(a_.T, b_.T, alpha=sign * scale)
        else:
            weight.addmm_(b_, a_, alpha=sign * scale)

    if old is not None:
        add(old[1], old[0], -1.0)
    grads = [p.requires_grad for p in (a, b)]
    if fold:
        add(b, a, 1.0)
        setattr(mod, _FOLDED, (a.detach().clone(), b.detach().clone()))
        mod.enable_adapters(False)
    else:
        delattr(mod, _FOLDED)
        mod.enable_adapters(True)
    for p, g in zip((a, b), grads, strict=True):
        p.requires_grad_(g)  # toggling PEFT adapters changes requires_grad; what trains is set_trainable's call


# ------------------------------------------------------------------------------------------- deltas

def lora_deltas(model: nn.Module, layers: Sequence[int]) -> dict[str, torch.Tensor]:
    """Module name -> scale * B @ A (full-size dW), differentiable w.r.t. the live LoRA matrices."""
    out: dict[str, torch.Tensor] = {}
    for name, mod, adapter in _lora_modules(model, layers):
        delta = mod.lora_B[adapter].weight @ mod.lora_A[adapter].weight * mod.scaling[adapter]
        out[name] = delta.T if getattr(mod, "fan_in_fan_out", False) else delta
    return out


def split_lora_name(name: str) -> tuple[str, str]:
    """"m.layers.3.q_proj.lora_A.weight" -> ("m.layers.3.q_proj", "A"); ModelError if not canonical."""
    for suffix in _SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)], suffix[6]
    raise ModelError(f"{name!r} is not a canonical LoRA tensor name (module + .lora_A/.lora_B.weight)")


def deltas_from_state(state: Mapping[str, torch.Tensor], settings: LoraSettings) -> dict[str, torch.Tensor]:
    """Module name -> scale * B @ A from a LoRA state (fp32, no grad)."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in state.items():
        module, ab = split_lora_name(name)
        pairs.setdefault(module, {})[ab] = t
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for module, ab in pairs.items():
            if set(ab) != {"A", "B"}:
                raise ModelError(f"LoRA state: {module} lacks its lora_{'B' if 'A' in ab else 'A'} matrix")
            a, b = ab["A"].float(), ab["B"].float()
            if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
                raise ModelError(f"LoRA state: {module} has mismatched shapes A {tuple(a.shape)}, "
                                 f"B {tuple(b.shape)}")
            out[module] = (b @ a) * settings.scale
    return out


def remap_layer_indices(state: Mapping[str, torch.Tensor], mapping: Mapping[int, int],
                        layers_path: str = "model.layers") -> dict[str, torch.Tensor]:
    """Rename `<layers_path>.<i>.` to `<layers_path>.<mapping[i]>.`; other names pass unchanged.

    A layer index with no entry in `mapping`, or two names landing on one, is a ModelError: silently
    dropping or overwriting a tensor would corrupt the adapter.
    """
    pattern = re.compile(re.escape(layers_path) + r"\.(\d+)\.")
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        m = pattern.match(name)
        if m is None:
            new = name
        else:
            i = int(m.group(1))
            if i not in mapping:
                raise ModelError(f"no target layer for {name} (layer {i} is not in the mapping)")
            new = f"{layers_path}.{int(mapping[i])}.{name[m.end():]}"
        if new in out:
            raise ModelError(f"two LoRA tensors map onto {new}")
        out[new] = t
    return out


# ------------------------------------------------------------------------------------ flat vectors

def flatten_state(state: Mapping[str, torch.Tensor], names: Sequence[str]) -> np.ndarray:
    """Concatenate tensors in a fixed name order into one float64 vector (the secure-aggregation input)."""
    return np.concatenate([state[n].detach().double().reshape(-1).numpy() for n in names])


def unflatten_state(vector: np.ndarray, like: Mapping[str, torch.Tensor],
                    names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Inverse of flatten_state: split a vector back into tensors shaped like `like`."""
    out, offset = {}, 0
    for n in names:
        size = like[n].numel()
        out[n] = torch.from_numpy(np.ascontiguousarray(vector[offset:offset + size])).float().reshape(like[n].shape)
        offset += size
    if offset != vector.size:
        raise ModelError(f"aggregate has {vector.size} values, expected {offset}")
    return out


def state_delta(state: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: state[n].float() - base[n].float() for n in base}


def apply_delta(base: Mapping[str, torch.Tensor], update: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: (base[n].float() + update[n].float()).contiguous() for n in base}
