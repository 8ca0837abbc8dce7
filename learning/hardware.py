"""Where a model runs and in which precision: `--device` and `--dtype` as both nodes understand them.

auto picks CUDA when a GPU is present, and bfloat16 wherever the chosen device computes it natively: a GPU of
compute capability 8.0 or more, or a CPU with bf16 instructions, where the demo gives the same AdapFu NLL as in
float32 (docs/results/cpu_bf16.md) and a party trains about twice as fast (docs/results/precision.md); float32
elsewhere, and always under DP-SGD. Frozen weights take the chosen dtype; LoRA and optimizer state stay float32.
The names and the checks that need no torch (for the command line) are in `learning.devices`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from errors import ConfigError
from learning.devices import DEVICES, DTYPE_NAMES, dp_dtype
from learning.devices import format_max_memory as format_max_memory  # re-exported: callers import them from here
from learning.devices import parse_max_memory as parse_max_memory

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


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
    """`auto` (or None): bfloat16 on a GPU or CPU that computes it natively (not emulated: emulated bf16 is slower
    than float32), float32 otherwise."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    if spec not in DTYPES:
        raise ConfigError(f"unknown --dtype {spec!r}: expected auto, {', '.join(DTYPES)}")
    return DTYPES[spec]


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes in bfloat16 natively: a CUDA device of compute capability 8.0 or more (asked of
    that device, not the current one; torch's own check also counts the emulation older GPUs get), or a CPU with
    AVX512-BF16 or AMX-BF16 (x86) or the BF16 extension (Arm)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        with torch.cuda.device(index):
            try:
                return bool(torch.cuda.is_bf16_supported(including_emulation=False))
            except TypeError:  # a torch without the argument
                return torch.cuda.get_device_capability(index) >= (8, 0)
    if device.type == "cpu":
        return bool(cpu_flags() & CPU_BF16_FLAGS)
    return False


CPU_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})  # x86 flags; Arm's "Features: ... bf16"
CPUINFO = "/proc/cpuinfo"  # a module name, so the tests can point it elsewhere and not depend on this machine's CPU


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The CPU's feature flags as Linux lists them (x86 `flags`, Arm `Features`); empty where there is none."""
    try:
        text = Path(cpuinfo or CPUINFO).read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            return frozenset(value.split())
    return frozenset()


def resolve_hardware(device: str | None, dtype: str | None, dp: bool = False) -> Hardware:
    resolved = resolve_device(device)
    return Hardware(resolved, resolve_dtype(dp_dtype(dtype, dp), resolved))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
