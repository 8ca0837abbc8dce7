"""Command-line options both nodes take, parsed one way: device and dtype, and the DP-SGD flags."""

from __future__ import annotations

import argparse


def add_dp_options(p: argparse.ArgumentParser, title: str) -> None:
    """The --dp-* flags; `dp_from_args` turns them into DPSettings."""
    g = p.add_argument_group(title)
    g.add_argument("--dp-noise", type=float, default=None, metavar="SIGMA",
                   help="noise multiplier: turns DP on (give this or --dp-epsilon)")
    g.add_argument("--dp-epsilon", type=float, default=None,
                   help="target epsilon over the whole run: the noise multiplier is derived from it")
    g.add_argument("--dp-delta", type=float, default=None,
                   help="delta (default: min(1e-5, N^-1.1) for a party with N examples)")
    g.add_argument("--dp-clip", type=float, default=None, metavar="C", help="per-sample clipping norm (1.0)")
    g.add_argument("--dp-accountant", default=None, choices=["rdp", "prv"], help="privacy accountant (rdp)")


def dp_from_args(args: argparse.Namespace):
    """DPSettings from the --dp-* flags, or None when DP is off (a lone --dp-delta/--dp-clip is an error)."""
    from errors import ConfigError  # noqa: PLC0415
    from learning.dp import DPSettings  # noqa: PLC0415

    noise, epsilon = getattr(args, "dp_noise", None), getattr(args, "dp_epsilon", None)
    extras = {"--dp-delta": getattr(args, "dp_delta", None), "--dp-clip": getattr(args, "dp_clip", None),
              "--dp-accountant": getattr(args, "dp_accountant", None)}
    if noise is None and epsilon is None:
        given = [flag for flag, value in extras.items() if value is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} given without --dp-noise or --dp-epsilon")
        return None
    return DPSettings(noise_multiplier=noise, target_epsilon=epsilon, delta=args.dp_delta,
                      max_grad_norm=1.0 if args.dp_clip is None else args.dp_clip,
                      accountant=args.dp_accountant or "rdp")


def add_hardware_options(p: argparse.ArgumentParser) -> None:
    """--device / --dtype; `hardware_from_args` resolves them (learning.hardware)."""
    g = p.add_argument_group("hardware")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (auto: a CUDA GPU when present)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="frozen weights' precision; LoRA and optimizer state stay float32 (auto: bfloat16 on a GPU "
                        "that supports it, else float32)")


def hardware_from_args(args: argparse.Namespace, dp: bool = False):
    """The resolved Hardware (DP-SGD keeps float32: `learning.hardware.dp_dtype`)."""
    from learning.hardware import resolve_hardware  # noqa: PLC0415

    return resolve_hardware(getattr(args, "device", "auto"), getattr(args, "dtype", "auto"), dp=dp)


def add_terminal_options(p: argparse.ArgumentParser) -> None:
    """--config, --progress and --verbose: how a node is configured and what it prints."""
    from console.config_file import add_config_option  # noqa: PLC0415
    from console.progress import MODES  # noqa: PLC0415

    add_config_option(p)
    p.add_argument("--progress", choices=MODES, default="auto",
                   help="progress display: bar (with rate and ETA), plain lines (for logs) or none; "
                        "auto = bar on a terminal, plain otherwise")
    p.add_argument("--verbose", action="store_true",
                   help="let libraries print their own progress bars and warnings too")
