"""The `party` command: join an owner's run over ZeroMQ, or make a key pair."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from console.options import add_dp_options, add_terminal_options, dp_from_args


def keygen_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="party keygen", description="write a party's CurveZMQ key pair")
    p.add_argument("--name", required=True, help="party name (the owner allowlists NAME.key)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    from protocol.keys import generate_keypair  # noqa: PLC0415

    public, secret = generate_keypair(args.out, args.name)
    print(f"public key: {public} (give it to the owner)\nsecret key: {secret} (keep it private)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="party",
        description="FedBiOT party: trains the adapter LoRA on local data; the data never leave this machine. "
                    "`party keygen --name NAME --out KEYDIR` writes a key pair.")
    p.add_argument("--connect", required=True, metavar="ENDPOINT", help="owner address, e.g. tcp://host:5555")
    p.add_argument("--data", required=True, help="local training data (JSON/JSONL) or a packaged sample name")
    p.add_argument("--data-kind", default="auto", help="gsm8k | dolly | alpaca | auto")
    p.add_argument("--key", type=Path, required=True, help="this party's secret key file (NAME.key_secret)")
    p.add_argument("--owner-key", type=Path, required=True, help="the owner's public key file (pinned)")
    p.add_argument("--name", help="party name (default: the key file's name)")
    p.add_argument("--work", type=Path, help="where the model and download state live "
                                             "(default: the fedbiot cache dir / party / NAME)")
    p.add_argument("--timeout", type=float, default=3600.0, help="give up after this long without the owner")
    add_terminal_options(p)
    add_dp_options(p, "differential privacy (DP-SGD)")
    return p


def run(argv: list[str]) -> int:
    if argv[:1] == ["keygen"]:
        return keygen_main(argv[1:])
    from console.terminal import quiet_import_noise  # noqa: PLC0415

    quiet_import_noise(argv)
    from console.config_file import parse_with_config  # noqa: PLC0415

    args = parse_with_config(build_parser(), argv)
    from console.progress import Progress  # noqa: PLC0415
    from console.terminal import quiet_libraries  # noqa: PLC0415
    from party.client import PartyOptions, run_party, stamp  # noqa: PLC0415

    if not args.verbose:
        quiet_libraries()
    return run_party(PartyOptions(endpoint=args.connect, key=args.key, owner_key=args.owner_key, data=args.data,
                                  data_kind=args.data_kind, name=args.name, work_dir=args.work,
                                  dp=dp_from_args(args), timeout=args.timeout,
                                  progress=Progress(args.progress, prefix=stamp)))


def main(argv: list[str] | None = None) -> int:
    from console.terminal import run_cli  # noqa: PLC0415

    return run_cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())
