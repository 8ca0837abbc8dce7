"""Every seed of the project, derived from the run seed and labels, so each random draw is reproducible
across processes (the in-process and the networked run draw the same numbers) and never global."""

from __future__ import annotations

import hashlib


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from a tuple of labels, e.g. (run seed, "batches", party name, round)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def lora_module_seed(seed: int, module: str) -> int:
    """The seed of one LoRA module's A matrix: the same module gets the same A however many layers are
    attached. Its own label format (older than `derive_seed`) is kept so existing runs resume unchanged."""
    digest = hashlib.sha256(f"fedbiot-lora-init:{seed}:{module}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
