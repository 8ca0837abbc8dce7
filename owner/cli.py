"""The `owner` command: in-process simulation, the networked owner node, and key generation."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from errors import ConfigError


def add_run_options(p: argparse.ArgumentParser) -> None:
    """Options shared by `--simulate` and `--listen` (the method's hyperparameters)."""
    from console.options import add_dp_options, add_hardware_options  # noqa: PLC0415
    from learning.training import TrainSettings  # noqa: PLC0415
    from owner.alignment import AlignSettings  # noqa: PLC0415 - keep `owner --help` fast
    from owner.config import METHODS, RunConfig  # noqa: PLC0415

    d, t, a = RunConfig(), TrainSettings(), AlignSettings()
    g = p.add_argument_group("model and compression")
    g.add_argument("--model", default=None,
                   help="hub id, local checkpoint dir or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    g.add_argument("--method", default=d.method, choices=list(METHODS),
                   help="fedbiot; or a baseline on the same engine: offsite (Offsite-tuning: 1 party, adapter "
                        "= first 2 + last s layers, emulator aligned once), fedot (the same with N parties), "
                        "fedavg-full (LoRA on every layer of the full model)")
    g.add_argument("--adapter-size", type=int, default=d.adapter_size, help="s: layers in the adapter")
    g.add_argument("--drop-rate", type=float, default=d.drop_rate,
                   help="beta: fraction of the lower layers dropped to form the emulator")
    g.add_argument("--lora-r", type=int, default=d.lora.r)
    g.add_argument("--lora-alpha", type=int, default=d.lora.alpha)
    g.add_argument("--target-modules", nargs="+", default=None, metavar="NAME",
                   help="the projections that get LoRA, by PEFT name (e.g. q_proj v_proj; default: every Linear "
                        "of a decoder layer)")
    g = p.add_argument_group("owner memory and placement")
    g.add_argument("--device-map", default=None,
                   help="accelerate placement of the full model: auto | balanced | sequential | cuda:0 | cpu "
                        "(default: load on the CPU)")
    g.add_argument("--max-memory", default=None, metavar="DEV=SIZE,...",
                   help="per-device budget for --device-map, e.g. 0=20GiB,1=20GiB,cpu=64GiB")
    g.add_argument("--offload-folder", default=None, help="disk offload of weights that fit on no device")
    g.add_argument("--no-share-weights", dest="share_weights", action="store_false",
                   help="give the compressed model its own copy of the weights (default: share the full model's)")
    g.add_argument("--prealign-cache", default=None, metavar="DIR",
                   help="reuse (or store) the pre-aligned emulator in DIR, keyed by model, layout, public data, "
                        "LoRA and alignment settings and seed: a grid or a rerun pre-aligns once (and scores the "
                        "untouched model once)")
    g.add_argument("--no-teacher-cache", dest="cache_teacher", action="store_false",
                   help="recompute E*(x) every alignment step instead of once per public example")
    g.add_argument("--teacher-cache-mb", type=float, default=a.cache_memory_mb,
                   help="E*(x) cache kept in memory up to this many MB; the rest spills to OUT/teacher_cache")
    g = p.add_argument_group("data")
    g.add_argument("--party-data", default=d.party_data,
                   help="parties' training data in --simulate: a JSON/JSONL, CSV/TSV, Parquet or Arrow file, a "
                        "`datasets` save_to_disk directory (DIR:SPLIT), a packaged sample name, or a hub id "
                        "(ID, ID:SPLIT, ID:CONFIG:SPLIT)")
    g.add_argument("--party-data-kind", default=d.party_data_kind, help="gsm8k | dolly | alpaca | auto")
    g.add_argument("--party-columns", default=None, metavar="MAP",
                   help="column mapping for any other layout: prompt=COL,response=COL[,context=COL][,category=COL]")
    g.add_argument("--split", default=d.split, choices=["iid", "category"])
    g.add_argument("--party-limit", type=int, default=d.party_limit, help="cap on training examples")
    g.add_argument("--public-data", default=d.public_data, help="owner's public alignment data")
    g.add_argument("--public-data-kind", default=d.public_data_kind)
    g.add_argument("--public-columns", default=None, metavar="MAP", help="column mapping of --public-data")
    g.add_argument("--public-limit", type=int, default=d.public_limit)
    g.add_argument("--eval-data", default=d.eval_data, help="held-out items for the NLL in summary.json")
    g.add_argument("--eval-data-kind", default=d.eval_data_kind)
    g.add_argument("--eval-columns", default=None, metavar="MAP", help="column mapping of --eval-data")
    g.add_argument("--eval-items", type=int, default=d.eval_items)
    g.add_argument("--task-fidelity-data", default=None,
                   help="held-out task items (read like --party-data; a validation split, never test items) on "
                        "which the owner also measures the gradient fidelity after pre-alignment and the last round")
    g.add_argument("--task-fidelity-batches", type=int, default=d.task_fidelity_batches,
                   help="batches (of the alignment batch size) of --task-fidelity-data")
    g.add_argument("--max-length", type=int, default=d.max_length, help="tokens per example")
    g.add_argument("--template", default=d.template, choices=["auto", "chat", "plain"])
    g = p.add_argument_group("training")
    g.add_argument("--rounds", type=int, default=d.rounds)
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--local-steps", type=int, default=t.local_steps, help="K: party steps per round")
    g.add_argument("--batch-size", type=int, default=t.batch_size, help="B: party batch size")
    g.add_argument("--lr", type=float, default=t.lr, help="party AdamW learning rate")
    g.add_argument("--prox-eps", type=float, default=t.prox_eps, help="eps of the proximal term")
    g.add_argument("--align-pre-steps", type=int, default=a.pre_steps, help="owner pre-alignment steps")
    g.add_argument("--align-steps", type=int, default=a.round_steps, help="owner alignment steps per round")
    g.add_argument("--align-batch-size", type=int, default=a.batch_size)
    g.add_argument("--align-lr", type=float, default=a.lr)
    g.add_argument("--kl-weight", type=float, default=a.kl_weight, help="lambda of the alignment loss")
    g.add_argument("--fidelity-batches", type=int, default=a.fidelity_batches,
                   help="public batches on which the owner measures, after each alignment, the cosine and norm "
                        "ratio of the adapter-LoRA gradient through the emulator vs the full model (0: off)")
    g = p.add_argument_group("secure aggregation (--secure-agg)")
    g.add_argument("--secagg-graph", choices=["complete", "sparse"], default=d.secagg_graph,
                   help="who masks with whom: every pair, or SecAgg+'s sparse random graph of O(log n) neighbours "
                        "per party (cheaper with many parties)")
    add_hardware_options(p)
    p.add_argument("--quantize", choices=["int8", "nf4"], default=None,
                   help="--simulate's parties hold the frozen compressed model in 8 or 4 bits (bitsandbytes)")
    add_dp_options(p, "differential privacy (DP-SGD on the simulated parties' adapter LoRA)")


def config_from_args(args: argparse.Namespace, parties: int, secure_agg: bool):
    from console.options import dp_from_args  # noqa: PLC0415
    from learning.lora import LoraSettings  # noqa: PLC0415
    from learning.training import TrainSettings  # noqa: PLC0415
    from owner.alignment import AlignSettings  # noqa: PLC0415
    from owner.config import RunConfig  # noqa: PLC0415
    from owner.models import parse_max_memory  # noqa: PLC0415

    memory = parse_max_memory(args.max_memory)
    return RunConfig(
        model=args.model, method=args.method, adapter_size=args.adapter_size, drop_rate=args.drop_rate,
        rounds=args.rounds,
        parties=parties, seed=args.seed, party_data=args.party_data, party_data_kind=args.party_data_kind,
        party_columns=args.party_columns, split=args.split, party_limit=args.party_limit,
        public_data=args.public_data, public_data_kind=args.public_data_kind, public_columns=args.public_columns,
        public_limit=args.public_limit, eval_data=args.eval_data, eval_data_kind=args.eval_data_kind,
        eval_columns=args.eval_columns, eval_items=args.eval_items, task_fidelity_data=args.task_fidelity_data,
        task_fidelity_batches=args.task_fidelity_batches, max_length=args.max_length,
        template=args.template, secure_agg=secure_agg, secagg_graph=args.secagg_graph,
        lora=LoraSettings(r=args.lora_r, alpha=args.lora_alpha, target_modules=args.target_modules),
        train=TrainSettings(local_steps=args.local_steps, batch_size=args.batch_size, lr=args.lr,
                            prox_eps=args.prox_eps),
        align=AlignSettings(pre_steps=args.align_pre_steps, round_steps=args.align_steps,
                            batch_size=args.align_batch_size, lr=args.align_lr, kl_weight=args.kl_weight,
                            cache_teacher=args.cache_teacher, cache_memory_mb=args.teacher_cache_mb,
                            fidelity_batches=args.fidelity_batches),
        dp=dp_from_args(args), share_weights=args.share_weights, device_map=args.device_map,
        max_memory=None if memory is None else {str(k): v for k, v in memory.items()},
        offload_folder=args.offload_folder, device=args.device, dtype=args.dtype, quantize=args.quantize,
        prealign_cache=args.prealign_cache,
    )


def build_parser() -> argparse.ArgumentParser:
    from console.options import add_terminal_options  # noqa: PLC0415

    p = argparse.ArgumentParser(
        prog="owner",
        description="FedBiOT model owner: compresses the model, aligns the emulator, aggregates parties' "
                    "adapter LoRA. `owner keygen --out KEYDIR` writes the owner's CurveZMQ key pair; "
                    "`owner plan --model M ...` prints what a run would cost, from the model's config alone.",
    )
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--simulate", type=int, nargs="?", const=0, metavar="N",
                      help="run owner + N parties in this process (N defaults to --parties)")
    mode.add_argument("--listen", metavar="ENDPOINT", help="serve parties over ZeroMQ, e.g. tcp://0.0.0.0:5555")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--secure-agg", dest="secure_agg", action="store_true", default=None,
                   help="masked secure aggregation (default: on with --listen, off with --simulate)")
    p.add_argument("--no-secure-agg", dest="secure_agg", action="store_false")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors (metrics.jsonl is still written)")
    add_terminal_options(p)
    p.add_argument("--report-to", default="none", metavar="SINKS",
                   help="also send metrics.jsonl's events to tensorboard (RUN/tensorboard) and/or mlflow, "
                        "comma-separated, or none (optional extras: fedbiot[tensorboard], fedbiot[mlflow])")
    add_run_options(p)
    net = p.add_argument_group("network (--listen)")
    net.add_argument("--parties", type=int, help="number of parties expected")
    net.add_argument("--key", type=Path, help="owner secret key file (from `owner keygen`)")
    net.add_argument("--allow", type=Path, help="directory of allowed party public keys (*.key)")
    net.add_argument("--min-parties", type=int, help="rounds proceed with at least this many (default: all)")
    net.add_argument("--join-timeout", type=float, default=600.0, help="seconds to wait for parties to join")
    net.add_argument("--round-timeout", type=float, default=1800.0, help="deadline of one round, seconds")
    net.add_argument("--party-timeout", type=float, default=60.0,
                     help="a party silent this long (no heartbeat) is left out of the round")
    return p


def keygen_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="owner keygen", description="write the owner's CurveZMQ key pair")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--name", default="owner")
    args = p.parse_args(argv)
    from protocol.keys import generate_keypair  # noqa: PLC0415

    public, secret = generate_keypair(args.out, args.name)
    print(f"public key: {public}\nsecret key: {secret} (keep it private)")
    return 0


class _OneLineErrors(argparse.ArgumentParser):
    """A parser whose usage errors are ConfigErrors, so the CLI prints them as one `error:` line."""

    def error(self, message: str):
        from errors import ConfigError  # noqa: PLC0415

        raise ConfigError(message)


def plan_main(argv: list[str]) -> int:
    """`owner plan`: the run's layers, traffic, FLOPs and memory from the model's config, before any download."""
    p = _OneLineErrors(prog="owner plan",
                       description="Plan a run from the model's config alone (no weights are read or downloaded). "
                                   "Takes the options of a run, so a run's command line can be planned as it is; "
                                   "those that change no figure are accepted and ignored.")
    p.add_argument("--json", action="store_true", help="print the figures as JSON instead of a table")
    add_run_options(p)
    p.set_defaults(model=None)
    args = p.parse_args(argv)
    import json  # noqa: PLC0415

    from owner.plan import format_plan, make_plan, read_model_config, shape_from_config  # noqa: PLC0415

    config = config_from_args(args, 1, False)
    name, model_config = read_model_config(args.model)
    plan = make_plan(shape_from_config(model_config, name), config)
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
    from owner.config import flags_from_config  # noqa: PLC0415

    args = parse_with_config(build_parser(), argv, translate=flags_from_config)
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
        from owner.server import ServeOptions, serve  # noqa: PLC0415

        if args.parties is None or args.key is None or args.allow is None:
            raise SystemExit("owner --listen needs --parties, --key and --allow")
        secure = True if args.secure_agg is None else args.secure_agg
        config = config_from_args(args, args.parties, secure)
        if config.dp is not None:
            raise ConfigError("--dp-* apply to the parties of --simulate; networked parties choose DP "
                              "themselves")
        opts = ServeOptions(listen=args.listen, out=args.out, key=args.key, allow=args.allow, resume=args.resume,
                            min_parties=args.min_parties, join_timeout=args.join_timeout,
                            round_timeout=args.round_timeout, party_timeout=args.party_timeout)
        summary = serve(config, opts, log=log)
    return summary


def main(argv: list[str] | None = None) -> int:
    from console.terminal import run_cli  # noqa: PLC0415

    return run_cli(run, argv, "interrupted: the last completed round is checkpointed; rerun with --resume")


if __name__ == "__main__":
    sys.exit(main())
