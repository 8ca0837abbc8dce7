"""Round checkpoints of the owner: everything needed to continue a run with no round lost or repeated.

A checkpoint is a directory `checkpoints/round-NNNN/` written atomically (temp dir + rename) holding
`lora.safetensors` (adapter.* and emulator.* tensors), `optimizer.safetensors` + the optimizer's param
groups (the emulator aligner's AdamW; no pickle), and `state.json` (round number, who took part, metrics).
Random draws are derived from (seed, round, party), so the round number is the whole RNG state.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from errors import ConfigError

CHECKPOINTS = "checkpoints"


@dataclass
class OwnerCheckpoint:
    round: int  # rounds completed
    adapter_state: dict[str, torch.Tensor]
    emulator_state: dict[str, torch.Tensor]
    optimizer_state: dict | None = None
    history: list[dict] = field(default_factory=list)  # one record per completed round


def optimizer_to_tensors(state: dict) -> tuple[dict[str, torch.Tensor], list[dict]]:
    tensors = {}
    for idx, slots in state["state"].items():
        for key, value in slots.items():
            tensors[f"{idx}.{key}"] = torch.as_tensor(value).clone().contiguous()
    return tensors, state["param_groups"]


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], groups: list[dict]) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": groups}


def write_atomic_dir(target: Path, fill) -> None:
    """Create `target` by filling a sibling temp dir and renaming it, replacing an old one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        fill(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_checkpoint(out_dir: Path, ckpt: OwnerCheckpoint) -> Path:
    target = Path(out_dir) / CHECKPOINTS / f"round-{ckpt.round:04d}"

    def fill(tmp: Path) -> None:
        lora = {f"adapter.{k}": v for k, v in ckpt.adapter_state.items()}
        lora.update({f"emulator.{k}": v for k, v in ckpt.emulator_state.items()})
        save_file(lora, str(tmp / "lora.safetensors"))
        groups = None
        if ckpt.optimizer_state is not None:
            tensors, groups = optimizer_to_tensors(ckpt.optimizer_state)
            save_file(tensors, str(tmp / "optimizer.safetensors"))
        meta = {"round": ckpt.round, "history": ckpt.history, "optimizer_param_groups": groups}
        (tmp / "state.json").write_text(json.dumps(meta, indent=1))

    write_atomic_dir(target, fill)
    return target


def latest_checkpoint_dir(out_dir: Path) -> Path | None:
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return None
    done = sorted(p for p in root.glob("round-*") if (p / "state.json").is_file())
    return done[-1] if done else None


def load_checkpoint(path: Path) -> OwnerCheckpoint:
    try:
        meta = json.loads((path / "state.json").read_text())
        lora = load_file(str(path / "lora.safetensors"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"checkpoint {path} is unreadable: {exc}") from exc
    adapter = {k[len("adapter."):]: v for k, v in lora.items() if k.startswith("adapter.")}
    emulator = {k[len("emulator."):]: v for k, v in lora.items() if k.startswith("emulator.")}
    optimizer = None
    if meta.get("optimizer_param_groups") is not None:
        tensors = load_file(str(path / "optimizer.safetensors"))
        optimizer = optimizer_from_tensors(tensors, meta["optimizer_param_groups"])
    return OwnerCheckpoint(int(meta["round"]), adapter, emulator, optimizer, list(meta.get("history", [])))
