"""The `party` command: join an owner's run over ZeroMQ, or make a key pair."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def keygen_main(argv: list[str]) -> int:
    from party.options import KEYGEN  # noqa: PLC0415

    args = KEYGEN.parser().parse_args(argv)
    from protocol.keys import generate_keypair  # noqa: PLC0415
    from secure_agg.identity import generate_identity  # noqa: PLC0415

    public, secret = generate_keypair(args.out, args.name)
    identity, identity_secret = generate_identity(args.out, args.name)
    print(f"public key: {public} (give it to the owner and the consortium)\n"
          f"identity: {identity} (give it to the consortium: it goes into the roster)\n"
          f"secret keys: {secret}, {identity_secret} (keep them private)")
    return 0


def roster_main(argv: list[str]) -> int:
    from party.options import ROSTER  # noqa: PLC0415

    args = ROSTER.parser().parse_args(argv)
    from secure_agg.identity import ConsortiumRoster  # noqa: PLC0415

    roster = ConsortiumRoster.from_public_files(args.members)
    roster.save(args.out)
    print(f"roster of {len(roster.members)} members ({', '.join(m.name for m in roster.members)}): {args.out}\n"
          f"fingerprint {roster.fingerprint()} (every member checks it is the same)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from party.options import PARTY  # noqa: PLC0415

    return PARTY.parser()


def options_from_args(args: argparse.Namespace):
    """The PartyOptions the parsed flags describe (every option of `party.options.party_options` sets one of
    its fields; the DP and hardware flags build its `dp` and `hardware`)."""
    from console.options import build, dp_from_args, hardware_from_args, values_from_args  # noqa: PLC0415
    from console.progress import Progress  # noqa: PLC0415
    from errors import ConfigError  # noqa: PLC0415
    from party.options import party_options  # noqa: PLC0415
    from party.session import PartyOptions, stamp  # noqa: PLC0415
    from protocol.sockets import check_endpoint  # noqa: PLC0415
    from secure_agg.identity import Identity  # noqa: PLC0415

    check_endpoint(args.connect, "--connect")  # a mistyped address is one line at once, not a silent wait
    for flag, value in (("--connect-timeout", args.connect_timeout), ("--timeout", args.timeout)):
        if not value > 0:
            raise ConfigError(f"{flag} must be a positive number of seconds, got {value}")
    dp = dp_from_args(args)
    values = values_from_args(args, party_options())  # a mistyped column mapping fails here, before connecting
    if args.min_parties < 3:
        raise ConfigError("--min-parties must be at least 3: with one colluder a smaller secure sum can hold one "
                          "honest update")
    if values["roster"] is not None and values["identity"] is None:  # the identity beside the key file
        name = Path(args.key).name.removesuffix(".key_secret")
        values["identity"] = Identity.load(Path(args.key).with_name(f"{name}.id_secret"))
    if values["identity"] is not None and values["roster"] is not None and \
            values["roster"].identity_of(values["identity"].name) != values["identity"].public:
        raise ConfigError(f"the roster does not list this party's identity ({values['identity'].name}): it would "
                          "take its own keys for a stranger's")
    if args.clip is not None and not args.clip > 0:
        raise ConfigError(f"--clip must be positive, got {args.clip}")
    del values["device"], values["dtype"]
    values.update(dp=dp, hardware=hardware_from_args(args, dp=dp is not None),
                  progress=Progress(args.progress, prefix=stamp))
    return build(PartyOptions, values)


def run(argv: list[str]) -> int:
    if argv[:1] == ["keygen"]:
        return keygen_main(argv[1:])
    if argv[:1] == ["roster"]:
        return roster_main(argv[1:])
    from console.terminal import quiet_import_noise  # noqa: PLC0415

    quiet_import_noise(argv)
    from console.config_file import parse_with_config  # noqa: PLC0415

    args = parse_with_config(build_parser(), argv)
    from console.terminal import quiet_libraries  # noqa: PLC0415

    if not args.verbose:
        quiet_libraries()  # before the learning stack is imported: some libraries talk on import
    from party.session import run_party  # noqa: PLC0415
    from protocol.keys import load_pinned, load_secret  # noqa: PLC0415

    opts = options_from_args(args)
    load_secret(opts.key)  # the key files before the data and the connection: each mistake one line, at once
    load_pinned(opts.owner_key, "--owner-key")
    return run_party(opts)


def main(argv: list[str] | None = None) -> int:
    from console.terminal import run_cli  # noqa: PLC0415

    return run_cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())
