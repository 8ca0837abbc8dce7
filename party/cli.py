"""The `party` command: join an owner's run over ZeroMQ, or make a key pair."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from console.options import (
    add_dp_options,
    add_hardware_options,
    add_terminal_options,
    dp_from_args,
    hardware_from_args,
)


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
    g = p.add_argument_group("what this party accepts (checked by the party itself, whatever the owner says)")
    g.add_argument("--min-parties", type=int, default=2,
                   help="refuse a secure round that invites fewer parties (default 2)")
    g.add_argument("--min-collusion", type=int, default=None, metavar="C",
                   help="the least collusion bound c a secure round must tolerate: the owner plus up to c parties "
                        "learn no sum of fewer than the honest minimum (default 1, or (n-1)//3 when smaller)")
    g.add_argument("--min-degree", type=int, default=4, help="the least sparse-graph degree (default 4)")
    g.add_argument("--min-honest", type=int, default=2,
                   help="the fewest honest inputs in any sum the owner may learn (default 2)")
    g.add_argument("--clip", type=float, default=None,
                   help="this party's own bound on each element of its update (default: the round's)")
    g.add_argument("--share-stats", action="store_true",
                   help="in secure rounds, also send this party's loss (and DP accounting): the owner sees them "
                        "for this party alone")
    g.add_argument("--share-data-size", action="store_true",
                   help="announce the exact number of examples (default: its power-of-two ceiling)")
    g.add_argument("--allow-plain", action="store_true",
                   help="take part in rounds without secure aggregation (the owner then sees this party's raw "
                        "adapter update); by default such a round is refused")
    p.add_argument("--quantize", choices=["int8", "nf4"], default=None,
                   help="hold the frozen compressed model in 8-bit or 4-bit (bitsandbytes; pip install "
                        "'fedbiot[quantize]'): less memory, the adapter LoRA still trains in float32")
    add_hardware_options(p)
    add_terminal_options(p)
    add_dp_options(p, "differential privacy (DP-SGD)")
    return p


def options_from_args(args: argparse.Namespace):
    """The PartyOptions the parsed flags describe."""
    from console.progress import Progress  # noqa: PLC0415
    from party.session import PartyOptions, stamp  # noqa: PLC0415
    from tasks.columns import ColumnMap  # noqa: PLC0415

    dp = dp_from_args(args)
    columns = ColumnMap.coerce(args.columns)  # a mistyped mapping fails before anything connects
    return PartyOptions(endpoint=args.connect, key=args.key, owner_key=args.owner_key, data=args.data,
                        data_kind=args.data_kind, columns=columns, name=args.name, work_dir=args.work, dp=dp,
                        timeout=args.timeout, hardware=hardware_from_args(args, dp=dp is not None),
                        quantize=args.quantize, require_secure_agg=not args.allow_plain,
                        max_download=int(args.max_download_gb * 1e9), policy=policy_from_args(args),
                        min_parties=args.min_parties, clip=args.clip, share_stats=args.share_stats,
                        share_data_size=args.share_data_size,
                        progress=Progress(getattr(args, "progress", "auto"), prefix=stamp))


def policy_from_args(args: argparse.Namespace):
    from errors import ConfigError  # noqa: PLC0415
    from secure_agg import PartyPolicy  # noqa: PLC0415

    if args.min_parties < 2:
        raise ConfigError("--min-parties must be at least 2: a secure sum of one party is that party's update")
    if args.clip is not None and not args.clip > 0:
        raise ConfigError(f"--clip must be positive, got {args.clip}")
    return PartyPolicy(min_collusion=args.min_collusion, min_degree=args.min_degree, min_honest=args.min_honest)


def run(argv: list[str]) -> int:
    if argv[:1] == ["keygen"]:
        return keygen_main(argv[1:])
    from console.terminal import quiet_import_noise  # noqa: PLC0415

    quiet_import_noise(argv)
    from console.config_file import parse_with_config  # noqa: PLC0415

    args = parse_with_config(build_parser(), argv)
    from console.terminal import quiet_libraries  # noqa: PLC0415

    if not args.verbose:
        quiet_libraries()  # before the learning stack is imported: some libraries talk on import
    from party.session import run_party  # noqa: PLC0415

    return run_party(options_from_args(args))


def main(argv: list[str] | None = None) -> int:
    from console.terminal import run_cli  # noqa: PLC0415

    return run_cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())
