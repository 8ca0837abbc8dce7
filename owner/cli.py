"""The `owner` command: in-process simulation, the networked owner node, and key generation."""

from __future__ import annotations

import argparse
import dataclasses
import secrets
import sys
from pathlib import Path

from errors import ConfigError, RunUntrained


def config_from_args(args: argparse.Namespace, parties: int, secure_agg: bool):
    """The RunConfig the parsed run options describe (every option of `owner.options.run_options` sets a
    field), for `parties` parties and with secure aggregation on or off."""
    from console.options import build, dp_from_args, values_from_args  # noqa: PLC0415
    from owner.config import RunConfig  # noqa: PLC0415
    from owner.options import run_options  # noqa: PLC0415

    values = values_from_args(args, run_options())
    values.update(dp=dp_from_args(args), parties=parties, secure_agg=secure_agg)
    return build(RunConfig, values)


def build_parser() -> argparse.ArgumentParser:
    from owner.options import OWNER  # noqa: PLC0415

    return OWNER.parser()


def keygen_main(argv: list[str]) -> int:
    from owner.options import KEYGEN  # noqa: PLC0415

    args = KEYGEN.parser().parse_args(argv)
    from protocol.keys import generate_keypair  # noqa: PLC0415

    public, secret = generate_keypair(args.out, args.name)
    print(f"public key: {public}\nsecret key: {secret} (keep it private)")
    return 0


def plan_main(argv: list[str]) -> int:
    """`owner plan`: the run's layers, traffic, FLOPs and memory from the model's config, before any download."""
    from owner.options import PLAN  # noqa: PLC0415

    args = PLAN.parser().parse_args(argv)
    import json  # noqa: PLC0415

    if "--verbose" not in argv:
        from console.terminal import quiet_libraries  # noqa: PLC0415

        quiet_libraries()

    from learning.hardware import parse_max_memory  # noqa: PLC0415
    from owner.plan import format_plan, make_plan, read_model_config, shape_from_config  # noqa: PLC0415

    config = config_from_args(args, 1, False)
    name, model_config = read_model_config(args.model)
    party = (args.party_device_map, parse_max_memory(args.party_max_memory))
    plan = make_plan(shape_from_config(model_config, name), config, party)
    print(json.dumps(plan.to_dict(), indent=1) if args.json else format_plan(plan))
    return 0


def run(argv: list[str]) -> int:
    from console.terminal import quiet_import_noise  # noqa: PLC0415

    quiet_import_noise(argv)  # before any library is imported: some talk on import
    if argv[:1] == ["keygen"]:
        return keygen_main(argv[1:])
    if argv[:1] == ["plan"]:
        return plan_main(argv[1:])
    from console.config_file import parse_with_config  # noqa: PLC0415
    from owner.options import flags_from_config  # noqa: PLC0415

    args = parse_with_config(build_parser(), argv, translate=flags_from_config)
    from owner.out_dir import check_out_dir  # noqa: PLC0415

    check_out_dir(Path(args.out), args.resume)  # before torch and transformers load: a refusal comes at once
    from console.terminal import quiet_libraries  # noqa: PLC0415
    from owner.metrics import MetricsLog  # noqa: PLC0415
    from owner.tracking import make_sinks  # noqa: PLC0415

    if not args.verbose:
        quiet_libraries()
    log = MetricsLog(None, quiet=args.quiet, progress=args.progress, sinks=make_sinks(args.report_to))
    try:
        summary = run_mode(args, log)
    finally:
        log.close()
    if summary.get("untrained"):
        raise RunUntrained(f"the run ended untrained: {summary['untrained']}; the adapters in {args.out} are "
                           "the ones it started from")
    print(f"done: {args.out} (AdapFu nll {summary['nll_adapfu']:.4f} vs base {summary['nll_base']:.4f})")
    return 0


def run_mode(args: argparse.Namespace, log) -> dict:
    """`--simulate` or `--listen`, with the run config from the parsed options; returns the summary."""
    if args.simulate is not None:
        from owner.simulate import run_simulation  # noqa: PLC0415

        parties = args.simulate or args.parties
        if not parties:
            raise ConfigError("--simulate needs a number of parties (--simulate N, or --parties N)")
        config = config_from_args(args, parties, bool(args.secure_agg))
        summary = run_simulation(config, args.out, resume=args.resume, log=log)
    else:
        from console.options import build, values_from_args  # noqa: PLC0415
        from owner.options import serve_options  # noqa: PLC0415
        from owner.server import ServeOptions, serve  # noqa: PLC0415

        if args.parties is None or args.key is None or args.allow is None:
            raise ConfigError("owner --listen needs --parties, --key and --allow")
        from protocol.keys import load_secret  # noqa: PLC0415
        from protocol.sockets import check_endpoint  # noqa: PLC0415

        check_endpoint(args.listen, "--listen", listen=True)  # before the model loads: one line, at once
        load_secret(args.key)
        secure = True if args.secure_agg is None else args.secure_agg
        config = config_from_args(args, args.parties, secure)
        if args.seed is None and not args.resume:  # a new run starts from a state of its own
            config = dataclasses.replace(config, seed=secrets.randbelow(2**31))
        if config.dp is not None:
            raise ConfigError("--dp-* apply to the parties of --simulate; networked parties choose DP "
                              "themselves")
        summary = serve(config, build(ServeOptions, values_from_args(args, serve_options())), log=log)
    return summary


def main(argv: list[str] | None = None) -> int:
    from console.terminal import run_cli  # noqa: PLC0415

    return run_cli(run, argv, "interrupted: the last completed round is checkpointed; rerun with --resume")


if __name__ == "__main__":
    sys.exit(main())
