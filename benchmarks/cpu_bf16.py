"""Whether `--dtype auto` may pick bfloat16 on a CPU with native bf16: the demo in float32 against bfloat16.

    python -m benchmarks.cpu_bf16 [--work DIR] [--seeds 0 1 2] [--margin 0.01] [--out docs/results]

Runs the demo's settings (`owner --simulate 3 --rounds 3`) once per seed and dtype, one run at a time, the two
dtypes of a seed back to back so that a cut-off measurement still leaves whole pairs. A run whose summary.json is
there is not run again (its wall time is kept in DIR/<run>/wall.json); an unfinished one is started over. Pairs the
runs by seed: the AdapFu held-out NLL difference bf16 - fp32 with its 95% t interval and paired p, and the wall-time
ratio. bfloat16 counts as equivalent when that whole interval lies within +-margin. Writes OUT/cpu_bf16.json and
OUT/cpu_bf16.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.reports import write_report
from benchmarks.stats import paired_test

REPO = Path(__file__).resolve().parents[1]
DTYPES = ("float32", "bfloat16")
DEMO = ["--simulate", "3", "--rounds", "3"]


def say(text: str) -> None:
    print(f"[cpu_bf16 {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def run_one(work: Path, seed: int, dtype: str) -> dict:
    """One demo run (or the one already finished in `work`): its NLLs and wall time."""
    out = work / f"seed{seed}-{dtype}"
    summary, wall = out / "summary.json", out / "wall.json"
    if not (summary.exists() and wall.exists()):
        shutil.rmtree(out, ignore_errors=True)  # an interrupted run starts over: its time would not be one run's
        say(f"seed {seed} {dtype}: running")
        started = time.perf_counter()
        cmd = [sys.executable, "-m", "owner.cli", *DEMO, "--seed", str(seed), "--dtype", dtype, "--device", "cpu",
               "--out", str(out)]
        with open(work / f"seed{seed}-{dtype}.log", "w") as log:
            subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=True)
        wall.write_text(json.dumps({"wall_s": round(time.perf_counter() - started, 1)}) + "\n")
    s = json.loads(summary.read_text())
    row = {"seed": seed, "dtype": dtype, "nll_base": s["nll_base"], "nll_adapemu": s["nll_adapemu"],
           "nll_adapfu": s["nll_adapfu"], "wall_s": json.loads(wall.read_text())["wall_s"],
           **step_seconds(out / "metrics.jsonl")}
    say(f"seed {seed} {dtype}: base {row['nll_base']:.4f} AdapEmu {row['nll_adapemu']:.4f} "
        f"AdapFu {row['nll_adapfu']:.4f}, {row['wall_s']:.0f} s")
    return row


def step_seconds(metrics: Path) -> dict:
    """Median seconds of a party step and of an alignment step (the gaps between consecutive steps of one party's
    round or one alignment stage; a sequence's first step, which waits on set-up, is left out). Medians, because
    on a shared machine another job's burst stretches some steps of a run and the wall time with them."""
    last, party, align = {}, [], []
    for line in metrics.read_text().splitlines():
        e = json.loads(line)
        if e["event"] == "party_step":
            key, into = ("party", e["round"], e["party"]), party
        elif e["event"] == "align_step":
            key, into = ("align", e["stage"]), align
        else:
            continue
        if key in last and e["step"] > 1:
            into.append(e["time"] - last[key])
        last[key] = e["time"]
    return {"party_step_s": statistics.median(party), "align_step_s": statistics.median(align)}


def compare(rows: list[dict], margin: float) -> dict:
    """Paired by seed over the seeds with both dtypes finished."""
    by = {(r["seed"], r["dtype"]): r for r in rows}
    seeds = sorted(s for s in {r["seed"] for r in rows} if all((s, d) in by for d in DTYPES))
    fp32, bf16 = ([by[s, d] for s in seeds] for d in DTYPES)
    out = {"seeds": seeds, "margin": margin}
    for key in ("nll_adapfu", "nll_adapemu", "nll_base"):
        out[key] = paired_test([r[key] for r in bf16], [r[key] for r in fp32])
    for key in ("wall_s", "party_step_s", "align_step_s"):  # float32 / bfloat16: above 1, bfloat16 is faster
        ratios = [a[key] / b[key] for a, b in zip(fp32, bf16, strict=True)]
        out[f"speedup_{key.removesuffix('_s')}"] = {"per_seed": ratios,
                                                     "mean": statistics.mean(ratios) if ratios else None}
    ci = out["nll_adapfu"]["ci95"]
    out["equivalent"] = bool(ci and -margin <= ci[0] and ci[1] <= margin)
    return out


def markdown(rows: list[dict], result: dict, cpu: str) -> str:
    f = result["nll_adapfu"]
    ci = f["ci95"]
    lines = [
        "# The demo on a CPU: float32 against bfloat16",
        "",
        f"`python -m benchmarks.cpu_bf16`: `owner {' '.join(DEMO)} --seed N --dtype D --device cpu` (the demo's "
        f"settings), seeds {', '.join(map(str, result['seeds'])) or 'none'} paired, one run at a time, on {cpu}. "
        "NLLs are the held-out response NLL from summary.json; wall time is the whole run (set-up, pre-alignment, "
        "rounds, evaluation, export) on 2 cores shared with other jobs, whose bursts stretched some runs several-fold: "
        "the times do not measure bfloat16's speed, the NLLs are unaffected.",
        "",
        "| seed | dtype | base NLL | AdapEmu NLL | AdapFu NLL | wall (s) | party step (s) | alignment step (s) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    ordered = sorted(rows, key=lambda r: (r["seed"], DTYPES.index(r["dtype"])))
    lines += [f"| {r['seed']} | {r['dtype']} | {r['nll_base']:.4f} | {r['nll_adapemu']:.4f} | {r['nll_adapfu']:.4f} "
              f"| {r['wall_s']:.0f} | {r['party_step_s']:.2f} | {r['align_step_s']:.2f} |" for r in ordered]
    lines += ["", "Paired over seeds, bfloat16 - float32:", "",
              "| NLL | mean difference | 95% CI | paired t p |", "|---|---:|---:|---:|"]
    for key, name in (("nll_adapfu", "AdapFu"), ("nll_adapemu", "AdapEmu"), ("nll_base", "base")):
        t = result[key]
        lines.append(f"| {name} | {fmt(t['mean_difference'], '+.4f')} | "
                     f"{'[' + ', '.join(f'{x:+.4f}' for x in t['ci95']) + ']' if t['ci95'] else '-'} | "
                     f"{fmt(t['p_t'], '.3f')} |")
    lines += ["", "Speed, float32 / bfloat16 per seed (above 1: bfloat16 is faster; step times are medians, see "
              "`step_seconds`):", ""]
    for key, name in (("wall", "wall time"), ("party_step", "party step"), ("align_step", "alignment step")):
        sp = result[f"speedup_{key}"]
        lines.append(f"- {name}: {', '.join(f'{x:.2f}' for x in sp['per_seed']) or '-'} "
                     f"(mean {fmt(sp['mean'], '.2f')})")
    lines.append("")
    if result["equivalent"]:
        verdict = (f"The 95% interval of the AdapFu NLL difference, [{ci[0]:+.4f}, {ci[1]:+.4f}], lies within the "
                   f"equivalence margin +-{result['margin']}: on this evidence bfloat16 gives the same AdapFu NLL "
                   "as float32, so `--dtype auto` picks bfloat16 on a CPU that computes it natively.")
    else:
        interval = f"[{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else "none: too few pairs"
        verdict = (f"The 95% interval of the AdapFu NLL difference ({interval}) does not lie "
                   f"within the equivalence margin +-{result['margin']}: the same NLL is not established, so "
                   "`--dtype auto` stays float32 on a CPU.")
    lines += [verdict, ""]
    return "\n".join(lines)


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "cpu_bf16", help="run directories (resumed)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--margin", type=float, default=0.01, help="equivalence margin on the AdapFu NLL")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results")
    parser.add_argument("--report-only", action="store_true", help="report the finished runs, start none")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in args.seeds:
        for dtype in DTYPES:
            done = (args.work / f"seed{seed}-{dtype}" / "wall.json").exists()
            if args.report_only and not done:
                continue
            rows.append(run_one(args.work, seed, dtype))
    import torch  # noqa: PLC0415

    from learning.hardware import native_bf16  # noqa: PLC0415

    result = compare(rows, args.margin)
    cpu = cpu_name()
    report = {"cpu": cpu, "native_bf16": native_bf16(torch.device("cpu")),
              "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
              "command": ["owner", *DEMO, "--seed", "N", "--dtype", "D", "--device", "cpu"], "runs": rows, **result}
    args.out.mkdir(parents=True, exist_ok=True)
    write_report(args.out / "cpu_bf16.json", json.dumps(report, indent=1) + "\n")
    write_report(args.out / "cpu_bf16.md", markdown(rows, result, cpu))
    say(f"AdapFu bf16 - fp32 {fmt(result['nll_adapfu']['mean_difference'], '+.4f')}, CI "
        f"{result['nll_adapfu']['ci95']}, p {result['nll_adapfu']['p_t']}; equivalent: {result['equivalent']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
