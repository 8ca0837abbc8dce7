"""What a party's precision costs and saves, measured side by side in one run.

    python -m benchmarks.precision --out DIR [--model SPEC] [--device cpu|cuda] [--steps 8] [--rounds 2]
        [--threads 2] [--quick]

Per layout (FedBiOT s=2, beta=0.2; FedAvg-LoRA on the full model) and per precision of the frozen weights
(float32; bfloat16 under autocast; for FedBiOT also int8 and nf4 through bitsandbytes, nf4 also with bfloat16
compute): the download (the compressed checkpoint in float32 against bfloat16), party tokens/s over `--rounds`
rounds of `--steps` local steps, the party's peak memory (each variant runs in a process of its own, so its peak
RSS is one party's; on a GPU, the peak CUDA memory allocated), and the held-out response NLL of the model the
party trained, evaluated in float32 so every variant is scored alike. LoRA parameters and optimizer state are
float32 in every variant. Writes DIR/precision.md and DIR/precision.json; figures are read as ratios against
float32 in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from benchmarks.reports import write_report

REPO = Path(__file__).resolve().parents[1]
LAYOUTS = {"fedbiot": ("fedbiot", 2, 0.2), "fedavg-full": ("fedavg-full", 2, 0.0)}
VARIANTS = (("fedbiot", "float32", None), ("fedbiot", "bfloat16", None), ("fedbiot", "float32", "int8"),
            ("fedbiot", "float32", "nf4"), ("fedbiot", "bfloat16", "nf4"),
            ("fedavg-full", "float32", None), ("fedavg-full", "bfloat16", None))


def say(text: str) -> None:
    print(f"[precision {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def archive_mb(directory: Path) -> float:
    """The compressed model as the owner ships it (an uncompressed tar of the checkpoint directory)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.tar"
        with tarfile.open(path, "w") as tar:
            tar.add(directory, arcname=".")
        return path.stat().st_size / 1e6


def prepare(args: argparse.Namespace, work: Path) -> dict:
    """Compress the model once per layout and save it in float32 and in bfloat16."""
    import torch

    from learning.compressed_model import load_compressed
    from owner.compress import compress, save_compressed
    from owner.config import RunConfig
    from owner.models import decoder_layers, load_model

    base = load_model(args.model)
    n_layers = len(decoder_layers(base.model))
    out: dict = {"identity": base.identity, "params": sum(p.numel() for p in base.model.parameters()),
                 "layouts": {}}
    for key, (method, s, beta) in LAYOUTS.items():
        config = RunConfig(method=method, adapter_size=s, drop_rate=beta)
        bottom, top = config.adapter_layout(n_layers)
        compressed, manifest = compress(base.model, top, beta, base.identity, bottom)
        save_compressed(compressed, base.tokenizer, manifest, work / f"{key}-float32")
        del compressed  # its frozen tensors may be the base model's: never cast them in place
        half, tokenizer, _ = load_compressed(work / f"{key}-float32", dtype=torch.bfloat16)
        save_compressed(half, tokenizer, manifest, work / f"{key}-bfloat16")
        del half
        dirs = {dtype: {"dir": str(work / f"{key}-{dtype}"), "download_mb": archive_mb(work / f"{key}-{dtype}")}
                for dtype in ("float32", "bfloat16")}
        out["layouts"][key] = {"layers": len(manifest.kept_layers), "adapter_layers": len(manifest.adapter_layers),
                               **dirs}
        say(f"{key}: {len(manifest.kept_layers)} layers, download {dirs['float32']['download_mb']:.0f} MB "
            f"float32 / {dirs['bfloat16']['download_mb']:.0f} MB bfloat16")
    return out


def worker(spec: dict) -> dict:
    """One party variant: load, train `rounds` rounds, time them, score the trained model in float32."""
    import torch

    from benchmarks.overhead_worker import hwm_mb, party_tokens, reset_peak, rss_mb
    from console.terminal import quiet_libraries
    from learning.hardware import Hardware
    from learning.lora import LoraSettings, lora_state
    from learning.party_model import PartyModel
    from learning.training import TrainSettings
    from owner.config import RunConfig
    from owner.evaluate import mean_response_nll
    from tasks.datasets import load_examples
    from tasks.prompts import tokenize_examples

    quiet_libraries()
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec.get("device", "cpu"))
    hardware = Hardware(device, getattr(torch, spec["dtype"]))
    start = time.perf_counter()
    party = PartyModel.load(spec["dir"], LoraSettings(), spec["seed"], hardware, spec["quantize"])
    load_s = time.perf_counter() - start
    tokens, _ = party_tokens({"split_parties": 3, "seed": spec["seed"], "party_data": RunConfig().party_data,
                              "max_length": spec["max_length"]}, party.tokenizer)
    train = TrainSettings(local_steps=spec["steps"], batch_size=spec["batch_size"], lr=spec["lr"])
    trainer = party.trainer("party-1", tokens, LoraSettings(), train, spec["seed"])
    adapter = lora_state(party.model, party.manifest.adapter_layers)
    emulator = lora_state(party.model, party.manifest.emulator_layers)
    trainer.settings = TrainSettings(local_steps=1, batch_size=spec["batch_size"], lr=spec["lr"])
    trainer.train_round(0, adapter, emulator)  # one step: first-call allocations stay out of the timings
    trainer.settings = train
    rss_loaded = rss_mb()
    reset_peak()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rounds = []
    for r in range(spec["rounds"]):
        update = trainer.train_round(r, adapter, emulator)
        adapter = update.adapter_state
        rounds.append({"tokens_per_s": update.stats["tokens_per_s"], "loss_mean": update.stats["loss_mean"]})
    peak = torch.cuda.max_memory_allocated(device) / 1e6 if device.type == "cuda" else hwm_mb()
    # Score what was trained in float32: the same frozen weights for every variant of a layout.
    scorer = PartyModel.load(spec["score_dir"], LoraSettings(), spec["seed"], Hardware(device, torch.float32))
    from learning.lora import load_lora_state

    load_lora_state(scorer.model, emulator, scorer.manifest.emulator_layers)
    load_lora_state(scorer.model, adapter, scorer.manifest.adapter_layers)
    held_out = tokenize_examples(load_examples("gsm8k-test", "auto", limit=spec["eval_items"]), scorer.tokenizer,
                                 spec["max_length"], "auto")
    return {"load_s": load_s, "rss_loaded_mb": rss_loaded, "peak_train_mb": peak, "rounds": rounds,
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rounds),
            "nll": mean_response_nll(scorer.model, held_out, scorer.pad_id)}


def run_variant(spec: dict, work: Path) -> dict:
    path = work / f"spec-{spec['layout']}-{spec['dtype']}-{spec['quantize']}.json"
    result = path.with_suffix(".out.json")
    path.write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.precision", "--worker", str(path), str(result)],
                          cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:300]}
    return json.loads(result.read_text())


def federated(args: argparse.Namespace, work: Path) -> list[dict]:
    """Whole in-process runs (3 parties): everything in float32 (named: `auto` is bfloat16 on a GPU or a bf16
    CPU); everything in bfloat16 (`--dtype bfloat16`: owner and parties); the parties' frozen weights in int8 or nf4
    with float32 compute, and nf4 with bfloat16 compute (how a GPU party would run it). The AdapFu each gives is
    scored on the full model, as the run's summary does."""
    rows = []
    for label, flags in (("float32", ["--dtype", "float32"]), ("bfloat16 (owner and parties)", ["--dtype", "bfloat16"]),
                         ("int8", ["--quantize", "int8", "--dtype", "float32"]),
                         ("nf4", ["--quantize", "nf4", "--dtype", "float32"]),
                         ("nf4, bfloat16 compute", ["--quantize", "nf4", "--dtype", "bfloat16"])):
        out = work / ("federated-" + "-".join(label.replace(",", "").split()[:2]))
        cmd = [sys.executable, "-m", "owner.cli", "--simulate", "3", "--rounds", str(args.fed_rounds),
               "--local-steps", str(args.steps), "--align-pre-steps", str(args.fed_align_pre_steps),
               "--eval-items", str(args.eval_items), "--device", args.device, "--seed", str(args.seed),
               "--quiet", "--out", str(out), *flags,
               *(["--model", args.model] if args.model else [])]
        say(f"federated run, {label}: {args.fed_rounds} rounds x {args.steps} steps")
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        if proc.returncode != 0:
            rows.append({"parties": label, "error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:300]})
            continue
        summary = json.loads((out / "summary.json").read_text())
        rows.append({"parties": label, "seconds": time.perf_counter() - start,
                     **{k: summary[k] for k in ("nll_base", "nll_adapemu", "nll_adapfu")}})
        say(f"  AdapFu NLL {summary['nll_adapfu']:.4f} (base {summary['nll_base']:.4f})")
    return rows


def federated_table(rows: list[dict]) -> str:
    lines = ["| frozen weights | held-out NLL, untouched | AdapEmu | AdapFu | run seconds |",
             "|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['parties']} | failed: {r['error']} | | | |")
        else:
            lines.append(f"| {r['parties']} | {r['nll_base']:.4f} | {r['nll_adapemu']:.4f} | {r['nll_adapfu']:.4f} "
                         f"| {r['seconds']:.0f} |")
    return "\n".join(lines)


def table(prep: dict, results: list[dict]) -> str:
    lines = ["| layout | frozen weights | download MB | party tokens/s | x float32 | party holds MB | peak party MB "
             "| x float32 | held-out NLL |", "|---|---|---|---|---|---|---|---|---|"]
    base = {r["layout"]: r for r in results if r["dtype"] == "float32" and r["quantize"] is None and "error" not in r}
    for r in results:
        label = r["dtype"] if not r["quantize"] else r["quantize"] + (
            f", {r['dtype']} compute" if r["dtype"] != "float32" else "")
        if "error" in r:
            lines.append(f"| {r['layout']} | {label} | - | failed: {r['error']} | | | | | |")
            continue
        ref = base.get(r["layout"], r)
        download = prep["layouts"][r["layout"]]["bfloat16" if r["dtype"] == "bfloat16" else "float32"]["download_mb"]
        lines.append(f"| {r['layout']} | {label} | {download:.0f} | {r['tokens_per_s']:.0f} | "
                     f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f} | {r['rss_loaded_mb']:.0f} | "
                     f"{r['peak_train_mb']:.0f} | "
                     f"{r['peak_train_mb'] / ref['peak_train_mb']:.2f} | {r['nll']:.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        spec = json.loads(Path(argv[1]).read_text())
        Path(argv[2]).write_text(json.dumps(worker(spec)))
        return 0
    p = argparse.ArgumentParser(prog="python -m benchmarks.precision", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", default=None, help="hub id, directory or .gguf (default: embedded SmolLM2)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (every variant runs there)")
    p.add_argument("--steps", type=int, default=8, help="local steps per round")
    p.add_argument("--rounds", type=int, default=2, help="timed rounds per variant (the median is reported)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--eval-items", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fed-rounds", type=int, default=2, help="rounds of each federated run (0: no federated runs)")
    p.add_argument("--fed-align-pre-steps", type=int, default=8, help="owner pre-alignment steps of those runs")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 steps, 1 round, 4 held-out items")
    args = p.parse_args(argv)
    from console.terminal import quiet_libraries
    from learning.hardware import resolve_device

    quiet_libraries()
    args.device = str(resolve_device(args.device))
    if args.quick:
        args.steps, args.rounds, args.eval_items, args.fed_rounds, args.fed_align_pre_steps = 2, 1, 4, 1, 1
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="precision-") as tmp:
        work = Path(tmp)
        prep = prepare(args, work)
        results = []
        for layout, dtype, quantize in VARIANTS:
            spec = {"layout": layout, "dtype": dtype, "quantize": quantize,
                    "dir": prep["layouts"][layout]["bfloat16" if dtype == "bfloat16" else "float32"]["dir"],
                    "score_dir": prep["layouts"][layout]["float32"]["dir"], "steps": args.steps,
                    "rounds": args.rounds, "batch_size": args.batch_size, "lr": args.lr,
                    "max_length": args.max_length, "eval_items": args.eval_items, "threads": args.threads,
                    "seed": args.seed, "device": args.device}
            say(f"{layout} {quantize or dtype}: training {args.rounds} x {args.steps} steps")
            result = {"layout": layout, "dtype": dtype, "quantize": quantize, **run_variant(spec, work)}
            results.append(result)
            if "error" in result:
                say(f"  failed: {result['error']}")
            else:
                say(f"  {result['tokens_per_s']:.0f} tokens/s, peak {result['peak_train_mb']:.0f} MB, "
                    f"NLL {result['nll']:.4f}")
        fed = federated(args, work) if args.fed_rounds > 0 else []
    text = (f"# Party precision\n\n{prep['identity']} ({prep['params'] / 1e6:.0f} M parameters), "
            f"{args.rounds} rounds x {args.steps} steps x batch {args.batch_size}, {args.device}, {args.threads} "
            f"threads, {platform.processor() or platform.machine()}; held-out NLL on {args.eval_items} GSM8K test "
            f"items, scored in float32.\n\n{table(prep, results)}\n")
    if fed:
        text += (f"\nWhole runs, 3 parties x {args.fed_rounds} rounds x {args.steps} steps, "
                 f"{args.fed_align_pre_steps} pre-alignment steps; NLL on {args.eval_items} held-out items:\n\n"
                 f"{federated_table(fed)}\n")
    write_report(args.out / "precision.md", text)
    write_report(args.out / "precision.json", json.dumps({"prepare": prep, "results": results, "federated": fed,
                                                          "args": {
        k: str(v) for k, v in vars(args).items()}}, indent=1) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
