"""What a run records: one round's record (checkpointed, in metrics.jsonl), the run's totals for
summary.json, and the cleaning of what parties report. The in-process and the networked run both write
their records here, so the two cannot drift."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from console.progress import counted

# A DP party's accounting numbers the owner keeps for summary.json (learning.dp.DPPartyTrainer.privacy_report).
PRIVACY_REPORT = ("epsilon", "delta", "noise_multiplier", "sample_rate", "max_grad_norm", "accountant",
                  "dp_steps_total")


def round_record(stats: Mapping[str, dict], weights: Mapping[str, int], *, mb_down: float, mb_up: float,
                 seconds: float, **extra: object) -> dict:
    """One round: who took part, their statistics, the train loss weighted like FedAvg (by the examples each
    trained on), MB each way, seconds, and the DP parties' (epsilon, delta)."""
    losses = [(s["loss_mean"], weights[n]) for n, s in stats.items() if "loss_mean" in s]
    record = {
        "participants": list(stats), "parties": dict(stats),
        "train_loss": sum(lo * w for lo, w in losses) / sum(w for _, w in losses) if losses else None,
        "mb_down": mb_down, "mb_up": mb_up, "seconds": seconds, **extra,
    }
    privacy = {n: {"epsilon": s["epsilon"], "delta": s["delta"]} for n, s in stats.items() if "epsilon" in s}
    if privacy:
        record["dp"] = privacy
    return record


def round_lines(round_no: int, rounds: int, record: dict) -> list[str]:
    """The progress lines that close a round."""
    loss = f"train loss {record['train_loss']:.4f}, " if record["train_loss"] is not None else ""
    clipped = f", {100 * record['clipped_fraction']:.2g}% of update values clipped" if record.get(
        "clipped_fraction") else ""
    lines = [f"round {round_no}/{rounds} done with {counted(len(record['participants']), 'party')} in "
             f"{round_time(record)}: {loss}down {record['mb_down']:.2f} MB, up {record['mb_up']:.2f} MB{clipped}"]
    if record.get("fidelity"):
        lines.append(describe_fidelity(record["fidelity"]))
    if record.get("dp"):
        lines.append("privacy spent: " + ", ".join(f"{n} epsilon {v['epsilon']:.3f} (delta {v['delta']:.2g})"
                                                   for n, v in sorted(record["dp"].items())))
    return lines


def round_time(record: dict) -> str:
    """`151.0 s (parties 61.9 s, alignment 50.0 s, fidelity 37.1 s)`: a round's wall time and its parts."""
    parts = {k: v for k, v in (record.get("phase_seconds") or {}).items() if v}
    named = {"parties": "training and aggregation"}
    detail = ", ".join(f"{named.get(k, k)} {v:.1f} s" for k, v in parts.items())
    return f"{record['seconds']:.1f} s" + (f" ({detail})" if detail else "")


def describe_fidelity(fidelity: dict | None) -> str:
    """`gradient fidelity: cosine 0.52, norm ratio 1.8` for progress lines ('' without a measurement)."""
    if not fidelity:
        return ""
    cos, ratio = fidelity.get("cosine"), fidelity.get("norm_ratio")
    return ("gradient fidelity: cosine " + ("n/a" if cos is None else f"{cos:.3f}") + ", norm ratio "
            + ("n/a" if ratio is None else f"{ratio:.2f}"))


def privacy_reports(stats: Mapping[str, dict]) -> dict[str, dict]:
    """Each DP party's accounting (PRIVACY_REPORT keys) out of its round statistics."""
    return {n: {k: v for k, v in s.items() if k in PRIVACY_REPORT} for n, s in stats.items() if "epsilon" in s}


def run_totals(history: Sequence[dict], secure_agg: bool) -> dict:
    """The run-wide figures summary.json adds to the session's own; `party_examples` is the examples in the
    last aggregate (a masked round reveals only that total)."""
    return {"mb_down_total": sum(h.get("mb_down", 0.0) for h in history),
            "mb_up_total": sum(h.get("mb_up", 0.0) for h in history), "secure_agg": secure_agg,
            "party_examples": next((h["examples"] for h in reversed(history) if "examples" in h), 0)}


def clean_stats(raw: object) -> tuple[dict, list[str]]:
    """What a party reported about its round, kept only where it is what it claims to be (a party's numbers
    go into metrics and the weighted train loss, so a malformed one must not reach them), and the names of
    what was dropped."""
    if not isinstance(raw, dict):
        return {}, [type(raw).__name__]
    clean, dropped = {}, []
    for key, value in raw.items():
        if key == "accountant_history" and _number_rows(value):
            clean[key] = value
        elif isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            clean[key] = value
        elif isinstance(value, str) and len(value) <= 64:
            clean[key] = value
        else:
            dropped.append(str(key)[:32])
    if "epsilon" in clean and "delta" not in clean:
        dropped.append("epsilon (no delta)")
        clean.pop("epsilon")
    return clean, dropped


def _number_rows(value: object) -> bool:
    """A list (at most 10,000) of short lists of finite numbers: the shape of an accountant history."""
    return isinstance(value, list) and len(value) <= 10_000 and all(
        isinstance(row, list) and len(row) <= 8 and all(
            isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in row)
        for row in value)
