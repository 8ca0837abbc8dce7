"""Where a model runs and in which precision: `--device` and `--dtype` as both nodes understand them.

auto picks CUDA when a GPU is present, and bfloat16 there when the GPU supports it; on a CPU, auto stays
float32, so a CPU run is bit-for-bit what it always was (bfloat16 on a CPU is there to be asked for: it is
faster on CPUs with native bf16 instructions, and the overhead benchmark measures it). Frozen weights take
the chosen dtype; LoRA parameters and optimizer state stay float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from errors import ConfigError

DEVICES = "auto | cpu | cuda | cuda:N"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Hardware:
    """A resolved device and dtype for the frozen weights."""

    device: torch.device
    dtype: torch.dtype

    @property
    def autocast(self) -> bool:
        """Whether forward passes run under autocast (half-precision frozen weights)."""
        return self.dtype != torch.float32

    def describe(self) -> str:
        return f"{self.device} {str(self.dtype).removeprefix('torch.')}"


def resolve_device(spec: str | None) -> torch.device:
    """`auto` (or None): cuda when available, else cpu. Asking for a GPU that is not there is an error."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        index = spec.partition(":")[2]
        if index and not index.isdigit():
            raise ConfigError(f"--device {spec}: expected {DEVICES}")
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {spec}: no CUDA GPU is available here (torch sees none); use --device cpu")
        if index and int(index) >= torch.cuda.device_count():
            raise ConfigError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) here")
        return torch.device(spec)
    raise ConfigError(f"unknown --device {spec!r}: expected {DEVICES}")


def resolve_dtype(spec: str | None, device: torch.device) -> torch.dtype:
    """`auto` (or None): bfloat16 on a GPU that supports it, float32 otherwise (and always on a CPU)."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if spec not in DTYPES:
        raise ConfigError(f"unknown --dtype {spec!r}: expected auto, {', '.join(DTYPES)}")
    return DTYPES[spec]


def dp_dtype(dtype: str | None, dp: bool) -> str | None:
    """The dtype a DP-SGD run may use: Opacus' per-sample gradients need float32 weights, so `auto` becomes
    float32 and an explicit half precision is refused. Without DP, `dtype` as given."""
    if not dp:
        return dtype
    if dtype in ("bfloat16", "float16"):
        raise ConfigError(f"--dtype {dtype} with DP-SGD: per-sample gradients need float32 weights (--dtype float32)")
    return "float32" if (dtype or "auto") == "auto" else dtype


def resolve_hardware(device: str | None, dtype: str | None, dp: bool = False) -> Hardware:
    resolved = resolve_device(device)
    return Hardware(resolved, resolve_dtype(dp_dtype(dtype, dp), resolved))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
