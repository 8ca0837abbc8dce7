"""The compressed model a party receives: plain HF checkpoint + `fedbiot.json` manifest.

The checkpoint loads with `AutoModelForCausalLM.from_pretrained` alone; the manifest says which original
layer each compressed layer came from, so the owner can map the adapter back onto the full model.
Also holds the decoder-layer lookup and the atomic-directory writer, which both nodes need.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from errors import DataError, ModelError, first_line

MANIFEST_NAME = "fedbiot.json"
FORMAT_VERSION = 1

# Where the decoder layers live in the causal-LM classes we know; anything else is found by search.
_KNOWN_LAYER_PATHS = ("model.layers", "model.language_model.layers", "transformer.h", "gpt_neox.layers",
                      "model.decoder.layers")


# --------------------------------------------------------------------------------------------- layers

def cache_root() -> Path:
    """`$FEDBIOT_CACHE`, else `$XDG_CACHE_HOME/fedbiot`, else `~/.cache/fedbiot`."""
    if os.environ.get("FEDBIOT_CACHE"):
        return Path(os.environ["FEDBIOT_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "fedbiot"
    return Path.home() / ".cache" / "fedbiot"


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain causal LM inside Opacus (`_module`) and PEFT wrappers, so module names are canonical."""
    seen = 0
    while seen < 8:
        seen += 1
        inner = getattr(model, "_module", None)
        if isinstance(inner, nn.Module):  # opacus GradSampleModule and friends
            model = inner
            continue
        get_base = getattr(model, "get_base_model", None)
        if callable(get_base) and hasattr(model, "peft_config"):  # PeftModel
            model = get_base()
            continue
        if type(model).__name__ == "LoraModel" and isinstance(getattr(model, "model", None), nn.Module):
            model = model.model
            continue
        break
    return model


def _num_layers(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = getattr(text, "num_hidden_layers", None)
    return n if isinstance(n, int) else None


def decoder_layers_path(model: nn.Module) -> str:
    """Dotted path of the decoder-layer `ModuleList` (e.g. "model.layers") in the plain causal LM."""
    plain = unwrap_model(model)
    n = _num_layers(plain)
    modules = dict(plain.named_modules())
    name = type(plain).__name__
    if n is None:
        raise ModelError(f"model {name} has no decoder layer list (its config has no num_hidden_layers)")
    for path in _KNOWN_LAYER_PATHS:
        mod = modules.get(path)
        if isinstance(mod, nn.ModuleList) and len(mod) == n:
            return path
    found = [p for p, m in modules.items() if isinstance(m, nn.ModuleList) and len(m) == n and p]
    if len(found) > 1:
        found = [p for p in found if p.rsplit(".", 1)[-1] in ("layers", "h", "blocks")]
    if len(found) != 1:
        raise ModelError(f"model {name} has no decoder layer list (a ModuleList of its {n} layers)")
    return found[0]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder-layer `ModuleList` (length == config.num_hidden_layers)."""
    plain = unwrap_model(model)
    return plain.get_submodule(decoder_layers_path(plain))


# ------------------------------------------------------------------------------------------- atomic

@contextmanager
def atomic_directory(out_dir: Path) -> Iterator[Path]:
    """Yield a temp dir beside `out_dir`; on success it replaces `out_dir`, on error it is removed.

    Readers therefore see either the old complete directory or the new complete one, never half of it.
    """
    out_dir = Path(out_dir).absolute()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / "d")
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------- manifest

def _need(d: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    if key not in d:
        raise DataError(f"manifest: missing field {key!r}")
    value = d[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise DataError(f"manifest: field {key!r} has the wrong type ({type(value).__name__})")
    return value


@dataclass
class Manifest:
    """Which original layers the compressed model holds, and how it was made (`fedbiot.json`).

    The adapter is the last `adapter_size` layers plus, for the Offsite-tuning/FedOT baselines, the first
    `bottom_adapter_size` layers; the emulator is what lies between. An adapter of every layer (no
    emulator) describes FedAvg-LoRA on the full model with the same bookkeeping.
    """

    format_version: int
    base_model: str
    n_layers: int
    adapter_size: int
    drop_rate: float
    kept_layers: list[int]
    layers_path: str = field(default="model.layers")
    bottom_adapter_size: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise DataError unless the fields describe a consistent emulator + adapter split."""
        if self.format_version != FORMAT_VERSION:
            raise DataError(f"manifest: unsupported format_version {self.format_version} "
                            f"(this version reads {FORMAT_VERSION})")
        if not self.base_model:
            raise DataError("manifest: base_model is empty")
        n, s, a, kept = self.n_layers, self.adapter_size, self.bottom_adapter_size, self.kept_layers
        if n < 2:
            raise DataError(f"manifest: n_layers must be >= 2, got {n}")
        if isinstance(a, bool) or not isinstance(a, int) or a < 0:
            raise DataError(f"manifest: bottom_adapter_size must be an integer >= 0, got {a!r}")
        if not 1 <= s <= n - a:
            raise DataError(f"manifest: adapter_size must be in [1, n_layers - bottom_adapter_size]; got {s} "
                            f"with n_layers {n}, bottom_adapter_size {a}")
        if not 0.0 <= self.drop_rate < 1.0:
            raise DataError(f"manifest: drop_rate must be in [0, 1), got {self.drop_rate}")
        if any(isinstance(i, bool) or not isinstance(i, int) for i in kept):
            raise DataError("manifest: kept_layers must be a list of integers")
        if len(kept) <= a + s < n or len(kept) < a + s:
            raise DataError(f"manifest: kept_layers has {len(kept)} entries; it needs more than the "
                            f"{a + s} adapter layers (all {n} when every layer is adapter)")
        if any(y <= x for x, y in zip(kept, kept[1:], strict=False)) or kept[0] < 0 or kept[-1] >= n:
            raise DataError(f"manifest: kept_layers must increase strictly within [0, {n}), got {kept}")
        if kept[-s:] != list(range(n - s, n)):
            raise DataError(f"manifest: the last {s} kept layers must be the adapter {n - s}..{n - 1}")
        if kept[:a] != list(range(a)):
            raise DataError(f"manifest: the first {a} kept layers must be the bottom adapter 0..{a - 1}")
        if kept[0] != 0:
            raise DataError("manifest: the first layer (0) must be kept")
        if not self.layers_path:
            raise DataError("manifest: layers_path is empty")

    @property
    def n_compressed(self) -> int:
        return len(self.kept_layers)

    @property
    def emulator_layers(self) -> list[int]:
        """Compressed indices of the emulator layers (a..n_c-s-1; 0..n'-1 without a bottom adapter)."""
        return list(range(self.bottom_adapter_size, self.top_adapter_start))

    @property
    def top_adapter_start(self) -> int:
        """Compressed index of the first top adapter layer: where the emulator's output enters."""
        return self.n_compressed - self.adapter_size

    @property
    def adapter_layers(self) -> list[int]:
        """Compressed indices of the adapter layers: the first a, then the last s (n_c-s..n_c-1)."""
        return list(range(self.bottom_adapter_size)) + list(range(self.top_adapter_start, self.n_compressed))

    @property
    def full_adapter_layers(self) -> list[int]:
        """Original (full-model) indices of the adapter layers (0..a-1, then n-s..n-1), in adapter order."""
        return list(range(self.bottom_adapter_size)) + list(range(self.n_layers - self.adapter_size,
                                                                  self.n_layers))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "base_model": self.base_model,
            "n_layers": self.n_layers,
            "adapter_size": self.adapter_size,
            "drop_rate": self.drop_rate,
            "kept_layers": list(self.kept_layers),
            "emulator_layers": self.emulator_layers,
            "adapter_layers": self.adapter_layers,
            "layers_path": self.layers_path,
            **({"bottom_adapter_size": self.bottom_adapter_size} if self.bottom_adapter_size else {}),
        }

    @classmethod
    def from_dict(cls, d: Any) -> Manifest:
        if not isinstance(d, dict):
            raise DataError("manifest: expected a JSON object")
        kept = _need(d, "kept_layers", list)
        manifest = cls(
            format_version=_need(d, "format_version", int),
            base_model=_need(d, "base_model", str),
            n_layers=_need(d, "n_layers", int),
            adapter_size=_need(d, "adapter_size", int),
            drop_rate=float(_need(d, "drop_rate", (int, float))),
            kept_layers=list(kept),
            layers_path=_need(d, "layers_path", str) if "layers_path" in d else "model.layers",
            bottom_adapter_size=_need(d, "bottom_adapter_size", int) if "bottom_adapter_size" in d else 0,
        )
        for key in ("emulator_layers", "adapter_layers"):  # derived; if present they must agree
            if key in d and d[key] != getattr(manifest, key):
                raise DataError(f"manifest: {key} {d[key]} does not match kept_layers/adapter_size")
        return manifest

    def save(self, directory: Path) -> None:
        path = Path(directory) / MANIFEST_NAME
        tmp = path.with_name(f".{MANIFEST_NAME}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)

    @classmethod
    def load(cls, directory: Path) -> Manifest:
        path = Path(directory) / MANIFEST_NAME
        if not path.is_file():
            raise DataError(f"{Path(directory)} is not a compressed model directory: no {MANIFEST_NAME}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"cannot read {path}: {e}") from None
        return cls.from_dict(data)


# ------------------------------------------------------------------------------------------ loading

def load_compressed(directory: Path | str, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                    quantization_config=None, device_map: str | Mapping | None = None,
                    max_memory: Mapping | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, Manifest]:
    """Load a compressed checkpoint with plain transformers, plus its manifest (checked against it): frozen
    weights in `dtype` on `device`, or quantised by `quantization_config` (transformers' BitsAndBytesConfig).

    `device_map` / `max_memory` place it over several devices with accelerate's big-model placement instead
    (a 56B compressed model over a party's GPUs): every layer of a compressed model carries LoRA, which cannot
    live in an offloaded module, so a placement that offloads any weight to the CPU or disk is refused."""
    directory = Path(directory).absolute()
    if not directory.is_dir():
        raise ModelError(f"compressed model directory {directory} does not exist")
    manifest = Manifest.load(directory)
    try:
        if quantization_config is None and device_map is None:
            model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype)
            if torch.device(device).type != "cpu":
                model = model.to(device)
        else:
            placed = {"device_map": device_map, "max_memory": dict(max_memory) if max_memory else None}
            model = AutoModelForCausalLM.from_pretrained(
                str(directory), dtype=dtype, quantization_config=quantization_config,
                **(placed if device_map is not None else {"device_map": {"": str(device)}}))
            _refuse_offload(model, directory)
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load compressed model from {directory}: {first_line(e)}") from None
    n = len(decoder_layers(model))
    if n != manifest.n_compressed:
        raise ModelError(f"compressed model in {directory} has {n} layers but its manifest lists "
                         f"{manifest.n_compressed}")
    return model.eval(), tokenizer, manifest


def _refuse_offload(model: PreTrainedModel, directory: Path) -> None:
    """A placed compressed model must be resident: accelerate offloads to the CPU (when an accelerator is in
    the map) and to disk, and LoRA cannot be attached to an offloaded module."""
    devices = {str(v) for v in (getattr(model, "hf_device_map", None) or {}).values()}
    offloaded = "disk" in devices or ("cpu" in devices and len(devices - {"cpu", "disk"}) > 0)
    if offloaded:
        raise ModelError(f"the compressed model in {directory} does not fit on the devices --max-memory allows "
                         "(placed: " + ", ".join(sorted(devices)) + "): its every layer carries LoRA and cannot be "
                         "offloaded; give the devices more room or add one")
