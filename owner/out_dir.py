"""The check of `--out`, in a module of its own that imports nothing heavy: the CLI runs it before it loads
torch and transformers, so a directory it cannot use is refused at once."""

from __future__ import annotations

from pathlib import Path

from errors import ConfigError


def check_out_dir(out_dir: Path, resume: bool) -> None:
    """Refuse an --out this run cannot use: not a directory, a new run's directory that is not empty, or a
    `--resume` directory that holds no run."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} exists and is not a directory")
    if not resume and out_dir.is_dir() and any(out_dir.iterdir()):
        raise ConfigError(f"--out {out_dir} is not empty: pass --resume to continue that run, or choose "
                          "another directory")
    if resume and not (out_dir / "config.json").is_file():
        raise ConfigError(f"--resume: {out_dir} holds no run to resume (no config.json)")
