"""What secure aggregation costs per round: CPU on each side and bytes on the wire (measured, not asserted).

    python -m benchmarks.secure_agg_cost --out DIR [--params 160000] [--parties 3 10 50 100] [--dropout 0.1]

Every party count runs with the complete graph and the SecAgg+ sparse graph, once with no dropout and
once with a fraction of the parties lost after sharing keys (the costly recovery path: the owner rebuilds
their mask keys and regenerates their pairwise masks). All parties are simulated in one process through
the full message flow, wire encoding included. Writes DIR/secure_agg_cost.md and DIR/secure_agg_cost.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.reports import write_report
from learning.secure_update import secagg_config
from secure_agg import SecAggConfig, Stage, aggregate_in_process, round_params
from secure_agg.config import sparse_degree

COLUMNS = [
    ("parties", "parties"), ("graph", "graph"), ("degree", "degree"), ("dropped", "dropped"),
    ("ring_bits", "ring bits"), ("frac_bits", "fraction bits"), ("party_cpu_mean_s", "party CPU mean (s)"),
    ("party_cpu_max_s", "party CPU max (s)"), ("owner_cpu_s", "owner CPU (s)"),
    ("party_sent_mb", "party sent (MB)"), ("party_received_mb", "party received (MB)"),
    ("extra_bytes_per_party", "extra bytes / party"), ("key_bytes_per_party", "of which keys+shares"),
    ("expansion", "expansion vs float32"), ("owner_received_mb", "owner received (MB)"),
    ("owner_sent_mb", "owner sent (MB)"), ("wall_s", "wall (s)"),
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.secure_agg_cost",
                                description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, type=Path, help="directory for secure_agg_cost.md / .json")
    p.add_argument("--params", type=int, default=160_000, help="floats per party update (default 160000)")
    p.add_argument("--parties", type=int, nargs="+", default=[3, 10, 50, 100])
    p.add_argument("--dropout", type=float, default=0.1,
                   help="fraction of parties lost after sharing keys in the dropout rows (default 0.1)")
    p.add_argument("--degree", type=int, default=None, help="sparse-graph degree (default 2*ceil(log2 n))")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.params < 1 or any(n < 2 for n in args.parties) or not 0 <= args.dropout < 0.5:
        p.error("--params must be >= 1, --parties >= 2 each, --dropout in [0, 0.5)")
    return args


def measure(n: int, graph: str, n_dropped: int, params: int, degree: int | None, seed: int) -> dict:
    rng = np.random.default_rng([seed, n, params])
    vectors = [rng.normal(0.0, 0.01, params).astype(np.float32) for _ in range(n)]
    weights = [int(w) for w in rng.integers(50, 1000, n)]
    # The settings a FedBiOT round uses (learning.secure_update): a 32-bit ring whenever the round allows it.
    config = dataclasses.replace(secagg_config(weights, seed, graph), degree=degree)
    dropped = set(int(u) for u in rng.choice(n, size=n_dropped, replace=False))
    start = time.perf_counter()
    result = aggregate_in_process(vectors, weights, config, round_id=0, seed=seed,
                                  drops={Stage.MASKED_INPUT: dropped})
    wall = time.perf_counter() - start
    included = result.included
    expected = sum(weights[m] * vectors[m].astype(np.float64) for m in included)
    error = float(np.abs(result.weighted_sum - expected).max() / result.total_weight)
    raw = 4 * params
    masked_bytes = (params + 2) * result.ring_bits // 8
    degree = sparse_degree(config, n)
    sent = [result.party_sent[m] for m in included]
    received = [result.party_received[m] for m in included]
    cpu = [result.party_cpu_s[m] for m in included]
    return {
        "parties": n, "graph": graph if degree < n - 1 or graph == "complete" else "sparse (= complete)",
        "degree": degree, "dropped": n_dropped,
        "ring_bits": result.ring_bits, "frac_bits": config.frac_bits, "params": params,
        "party_cpu_mean_s": float(np.mean(cpu)), "party_cpu_max_s": float(np.max(cpu)),
        "owner_cpu_s": result.server_cpu_s,
        "party_sent_mb": float(np.mean(sent)) / 1e6, "party_received_mb": float(np.mean(received)) / 1e6,
        "extra_bytes_per_party": float(np.mean(sent)) - raw,
        "key_bytes_per_party": float(np.mean(sent)) - masked_bytes, "expansion": float(np.mean(sent)) / raw,
        "owner_received_mb": result.server_received / 1e6, "owner_sent_mb": result.server_sent / 1e6,
        "wall_s": wall, "max_abs_error_of_mean": error,
    }


def fmt(value: object, key: str = "") -> str:
    if isinstance(value, float) and "bytes" in key:
        return f"{value:,.0f}"
    if isinstance(value, float):
        if value == 0 or abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"
    return str(value)


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        "# Secure aggregation cost per round",
        "",
        f"{args.params:,} float parameters per party (raw float32 payload {4 * args.params / 1e6:.2f} MB); "
        f"all parties simulated in one process through the full message flow (wire encoding included); "
        f"dropout rows lose {args.dropout:.0%} of the parties after key sharing (at least one). "
        f"Party columns average over the parties whose input is in the sum. Extra bytes = sent minus the "
        f"float32 payload: mostly the ring's k/8 bytes per element against float32's 4; the keys+shares "
        f"column is what is sent besides the masked vector. CPU = process time; wall = the whole round "
        f"with every party run one after the other "
        f"({platform.machine()}, {os.cpu_count()} cores). Measured, not asserted.",
        "",
        "| " + " | ".join(title for _, title in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(fmt(row[key], key) for key, _ in COLUMNS) + " |" for row in rows]
    worst = max(row["max_abs_error_of_mean"] for row in rows)
    lines += ["", f"Largest absolute error of the unmasked mean against the float64 mean: {worst:.2e} "
              "(fixed-point rounding at the fraction bits shown). Settings as in a FedBiOT round "
              "(`learning.secure_update.secagg_config`): party weights (data sizes) drawn from 50..999, clip 1, the "
              "most fraction bits (at most 22, at least 16) that keep the ring at 32 bits.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    start = time.perf_counter()
    for n in args.parties:
        tolerance = n - round_params(SecAggConfig(), n).min_survivors  # fails early on an impossible count
        n_drop = min(max(1, math.floor(args.dropout * n)), tolerance) if args.dropout > 0 else 0
        for graph in ("complete", "sparse"):
            for dropped in sorted({0, n_drop}):
                row = measure(n, graph, dropped, args.params, args.degree, args.seed)
                rows.append(row)
                print(f"[{time.perf_counter() - start:6.1f}s] {n} parties, {graph} (degree {row['degree']}), "
                      f"{dropped} dropped: party CPU {row['party_cpu_mean_s']:.3f} s, owner CPU "
                      f"{row['owner_cpu_s']:.3f} s, party sends {row['party_sent_mb']:.2f} MB "
                      f"({row['expansion']:.3f}x raw)", file=sys.stderr, flush=True)
    table = markdown(rows, args)
    write_report(args.out / "secure_agg_cost.md", table)
    summary = {"params": args.params, "dropout": args.dropout, "seed": args.seed, "rows": rows}
    write_report(args.out / "secure_agg_cost.json", json.dumps(summary, indent=1))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
