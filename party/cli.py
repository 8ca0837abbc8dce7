"""The `party` command: join an owner's run over ZeroMQ, or make a key pair."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from console.options import add_dp_options, add_placement_options, dp_from_args, placement_from_args


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
    p.add_argument("--data", required=True,
                   help="local training data: a JSON/JSONL, CSV/TSV, Parquet or Arrow file, a `datasets` "
                        "save_to_disk directory (DIR:SPLIT), a packaged sample name, or a hub id "
                        "(ID, ID:SPLIT, ID:CONFIG:SPLIT)")
    p.add_argument("--data-kind", default="auto", help="gsm8k | dolly | alpaca | auto")
    p.add_argument("--columns", metavar="MAP",
                   help="column mapping for any other layout: prompt=COL,response=COL[,context=COL][,category=COL]")
    p.add_argument("--key", type=Path, required=True, help="this party's secret key file (NAME.key_secret)")
    p.add_argument("--owner-key", type=Path, required=True, help="the owner's public key file (pinned)")
    p.add_argument("--name", help="party name (default: the key file's name)")
    p.add_argument("--work", type=Path, help="where the model and download state live "
                                             "(default: the fedbiot cache dir / party / NAME)")
    p.add_argument("--timeout", type=float, default=3600.0, help="give up after this long without the owner")
    p.add_argument("--max-download-gb", type=float, default=200.0,
                   help="refuse a compressed model archive larger than this (default 200 GB)")
    p.add_argument("--allow-plain", action="store_true",
                   help="take part in rounds without secure aggregation (the owner then sees this party's raw "
                        "adapter update); by default such a round is refused")
    p.add_argument("--quantize", choices=["int8", "nf4"], default=None,
                   help="hold the frozen compressed model in 8-bit or 4-bit (bitsandbytes; pip install "
                        "'fedbiot[quantize]'): less memory, the adapter LoRA still trains in float32")
    add_placement_options(p)
    add_dp_options(p, "differential privacy (DP-SGD)")
    return p


def options_from_args(args: argparse.Namespace):
    """The PartyOptions the parsed flags describe."""
    from party.client import PartyOptions  # noqa: PLC0415
    from tasks.columns import ColumnMap  # noqa: PLC0415

    dp = dp_from_args(args)
    columns = ColumnMap.coerce(args.columns)  # a mistyped mapping fails before anything connects
    return PartyOptions(endpoint=args.connect, key=args.key, owner_key=args.owner_key, data=args.data,
                        data_kind=args.data_kind, columns=columns, name=args.name, work_dir=args.work, dp=dp,
                        timeout=args.timeout, placement=placement_from_args(args, dp=dp is not None),
                        quantize=args.quantize, require_secure_agg=not args.allow_plain,
                        max_download=int(args.max_download_gb * 1e9))


def run(argv: list[str]) -> int:
    if argv[:1] == ["keygen"]:
        return keygen_main(argv[1:])
    args = build_parser().parse_args(argv)
    from console.terminal import quiet_libraries  # noqa: PLC0415

    quiet_libraries()  # before the learning stack is imported: some libraries talk on import
    from party.client import run_party  # noqa: PLC0415

    return run_party(options_from_args(args))


def main(argv: list[str] | None = None) -> int:
    from console.terminal import run_cli  # noqa: PLC0415

    return run_cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())
