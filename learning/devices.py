"""`--device`, `--dtype` and `--max-memory` as text: the names both nodes accept and the checks and parsing that
need no torch, so that a command line is parsed and refused (and --help printed) before torch loads.
`learning.hardware` resolves these names to a torch device and dtype.
"""

from __future__ import annotations

from errors import ConfigError, ModelError

DEVICES = "auto | cpu | cuda | cuda:N"
DTYPE_NAMES = ("float32", "bfloat16", "float16")  # the --dtype choices besides auto (`learning.hardware.DTYPES`)


def dp_dtype(dtype: str | None, dp: bool) -> str | None:
    """The dtype a DP-SGD run may use: Opacus' per-sample gradients need float32 weights, so `auto` becomes
    float32 and an explicit half precision is refused. Without DP, `dtype` as given."""
    if not dp:
        return dtype
    if dtype in ("bfloat16", "float16"):
        raise ConfigError(f"--dtype {dtype} with DP-SGD: per-sample gradients need float32 weights (--dtype float32)")
    return "float32" if (dtype or "auto") == "auto" else dtype


def parse_max_memory(text: str | None) -> dict[str | int, str | int] | None:
    """"0=20GiB,1=20GiB,cpu=64GiB" -> {0: "20GiB", 1: "20GiB", "cpu": "64GiB"} (the --max-memory flag).

    GPU ids become ints and plain numbers bytes, as accelerate expects."""
    if text is None or not text.strip():
        return None
    out: dict[str | int, str | int] = {}
    for item in text.split(","):
        device, sep, size = (part.strip() for part in item.partition("="))
        if not sep or not device or not size:
            raise ModelError(f"--max-memory: expected DEVICE=SIZE items like 0=20GiB,cpu=64GiB, got {item!r}")
        out[int(device) if device.isdigit() else device] = int(size) if size.isdigit() else size
    return out


def format_max_memory(value):
    """A max_memory mapping back in the flag's DEV=SIZE,... form (None or a string passes unchanged)."""
    return ",".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else value
