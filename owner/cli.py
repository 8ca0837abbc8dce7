"""The `owner` command: in-process simulation, the networked owner node, and key generation."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_run_options(p: argparse.ArgumentParser) -> None:
    """Options shared by `--simulate` and `--listen` (the method's hyperparameters)."""
    from console.options import add_dp_options  # noqa: PLC0415
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
    g = p.add_argument_group("owner memory and placement")
    g.add_argument("--device-map", default=None,
                   help="accelerate placement of the full model: auto | balanced | sequential | cuda:0 | cpu "
                        "(default: load on the CPU)")
    g.add_argument("--max-memory", default=None, metavar="DEV=SIZE,...",
                   help="per-device budget for --device-map, e.g. 0=20GiB,1=20GiB,cpu=64GiB")
    g.add_argument("--offload-folder", default=None, help="disk offload of weights that fit on no device")
    g.add_argument("--no-share-weights", dest="share_weights", action="store_false",
                   help="give the compressed model its own copy of the weights (default: share the full model's)")
    g.add_argument("--no-teacher-cache", dest="cache_teacher", action="store_false",
                   help="recompute E*(x) every alignment step instead of once per public example")
    g.add_argument("--teacher-cache-mb", type=float, default=a.cache_memory_mb,
                   help="E*(x) cache kept in memory up to this many MB; the rest spills to OUT/teacher_cache")
    g = p.add_argument_group("data")
    g.add_argument("--party-data", default=d.party_data,
                   help="parties' training data in --simulate: a JSON/JSONL path or a packaged sample name")
    g.add_argument("--party-data-kind", default=d.party_data_kind, help="gsm8k | dolly | alpaca | auto")
    g.add_argument("--split", default=d.split, choices=["iid", "category"])
    g.add_argument("--party-limit", type=int, default=d.party_limit, help="cap on training examples")
    g.add_argument("--public-data", default=d.public_data, help="owner's public alignment data")
    g.add_argument("--public-data-kind", default=d.public_data_kind)
    g.add_argument("--public-limit", type=int, default=d.public_limit)
    g.add_argument("--eval-data", default=d.eval_data, help="held-out items for the NLL in summary.json")
    g.add_argument("--eval-data-kind", default=d.eval_data_kind)
    g.add_argument("--eval-items", type=int, default=d.eval_items)
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
    g = p.add_argument_group("secure aggregation (--secure-agg)")
    g.add_argument("--secagg-graph", choices=["complete", "sparse"], default=d.secagg_graph,
                   help="who masks with whom: every pair, or SecAgg+'s sparse random graph of O(log n) neighbours "
                        "per party (cheaper with many parties)")
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
        split=args.split, party_limit=args.party_limit, public_data=args.public_data,
        public_data_kind=args.public_data_kind, public_limit=args.public_limit, eval_data=args.eval_data,
        eval_data_kind=args.eval_data_kind, eval_items=args.eval_items, max_length=args.max_length,
        template=args.template, secure_agg=secure_agg, secagg_graph=args.secagg_graph,
        lora=LoraSettings(r=args.lora_r, alpha=args.lora_alpha),
        train=TrainSettings(local_steps=args.local_steps, batch_size=args.batch_size, lr=args.lr,
                            prox_eps=args.prox_eps),
        align=AlignSettings(pre_steps=args.align_pre_steps, round_steps=args.align_steps,
                            batch_size=args.align_batch_size, lr=args.align_lr, kl_weight=args.kl_weight,
                            cache_teacher=args.cache_teacher, cache_memory_mb=args.teacher_cache_mb),
        dp=dp_from_args(args), share_weights=args.share_weights, device_map=args.device_map,
        max_memory=None if memory is None else {str(k): v for k, v in memory.items()},
        offload_folder=args.offload_folder,
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="owner",
        description="FedBiOT model owner: compresses the model, aligns the emulator, aggregates parties' "
                    "adapter LoRA. `owner keygen --out KEYDIR` writes the owner's CurveZMQ key pair.",
    )
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--simulate", type=int, metavar="N", help="run owner + N parties in this process")
    mode.add_argument("--listen", metavar="ENDPOINT", help="serve parties over ZeroMQ, e.g. tcp://0.0.0.0:5555")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--secure-agg", dest="secure_agg", action="store_true", default=None,
                   help="masked secure aggregation (default: on with --listen, off with --simulate)")
    p.add_argument("--no-secure-agg", dest="secure_agg", action="store_false")
    p.add_argument("--quiet", action="store_true", help="no progress lines (metrics.jsonl is still written)")
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


def run(argv: list[str]) -> int:
    if argv[:1] == ["keygen"]:
        return keygen_main(argv[1:])
    args = build_parser().parse_args(argv)
    from console.terminal import quiet_libraries  # noqa: PLC0415
    from owner.metrics import MetricsLog  # noqa: PLC0415

    quiet_libraries()
    log = MetricsLog(None, quiet=args.quiet)
    if args.simulate is not None:
        from owner.simulate import run_simulation  # noqa: PLC0415

        config = config_from_args(args, args.simulate, bool(args.secure_agg))
        summary = run_simulation(config, args.out, resume=args.resume, log=log)
    else:
        from owner.server import serve  # noqa: PLC0415

        if args.parties is None or args.key is None or args.allow is None:
            raise SystemExit("owner --listen needs --parties, --key and --allow")
        secure = True if args.secure_agg is None else args.secure_agg
        config = config_from_args(args, args.parties, secure)
        if config.dp is not None:
            from errors import ConfigError  # noqa: PLC0415

            raise ConfigError("--dp-* apply to the parties of --simulate; networked parties choose DP "
                              "themselves")
        summary = serve(config, args, log=log)
    print(f"done: {args.out} (AdapFu nll {summary['nll_adapfu']:.4f} vs base {summary['nll_base']:.4f})")
    return 0


def main(argv: list[str] | None = None) -> int:
    from console.terminal import run_cli  # noqa: PLC0415

    return run_cli(run, argv, "interrupted: the last completed round is checkpointed; rerun with --resume")


if __name__ == "__main__":
    sys.exit(main())
