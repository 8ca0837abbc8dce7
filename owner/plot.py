"""Plot a run's metrics.jsonl: `python -m owner.plot RUN_DIR [--out FILE.png]`.

One figure with what a user watches during a run and checks after it: the parties' training loss per step
(in-process runs; a networked owner only sees each round's mean), the owner's alignment loss with its L2 and
KL terms, each round's mean training loss and megabytes sent each way, the held-out NLL of the untouched
model, AdapEmu and AdapFu once the run has finished, and the gradient fidelity after each alignment (cosine and
norm ratio of the adapter-LoRA gradient through the emulator vs the full model: how well parties are steered).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from errors import ConfigError


def read_events(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"{run_dir}: no metrics.jsonl (is it the --out directory of a run?)")
    lines = path.read_text().splitlines()
    events = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError as exc:
            if lineno == len(lines):  # a run killed mid-write: only its last line may be cut
                break
            raise ConfigError(f"{path}: line {lineno}: invalid JSON ({exc.msg})") from None
        if isinstance(event, dict) and "event" in event:
            events.append(event)
    return events


def plot_run(run_dir: Path, out: Path) -> Path:
    try:
        import matplotlib  # noqa: PLC0415
    except ImportError:
        raise ConfigError("drawing a run needs matplotlib: pip install 'fedbiot[owner]'") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    from matplotlib.ticker import MaxNLocator  # noqa: PLC0415

    events = read_events(run_dir)
    by_kind: dict[str, list[dict]] = defaultdict(list)
    for e in events:
        by_kind[e["event"]].append(e)
    fig = plt.figure(figsize=(12, 11))
    grid = fig.add_gridspec(3, 2, height_ratios=[1, 1, 0.8])
    ax_party, ax_align = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])
    ax_round, ax_nll = fig.add_subplot(grid[1, 0]), fig.add_subplot(grid[1, 1])
    _fidelity_panel(fig.add_subplot(grid[2, :]), by_kind["fidelity"], MaxNLocator)

    per_party: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for e in by_kind["party_step"]:
        per_party[e["party"]].append((e["round"] * e["steps"] + e["step"], e["loss"]))
    for name, points in sorted(per_party.items()):
        ax_party.plot(*zip(*points, strict=True), label=name, linewidth=1)
    ax_party.set(title="party training loss (response tokens)", xlabel="local step", ylabel="cross-entropy")
    if per_party:
        ax_party.legend(fontsize=7)
    else:
        ax_party.text(0.5, 0.5, "no per-step losses here\n(networked run: see the round panel)",
                      ha="center", va="center", transform=ax_party.transAxes)

    align = by_kind["align_step"]
    if align:
        xs = list(range(1, len(align) + 1))
        for key, style in (("loss", "-"), ("l2", "--"), ("kl", ":")):
            ax_align.plot(xs, [e[key] for e in align], style, label=key)
        for i, e in enumerate(align, 1):  # where each round's alignment starts
            if e["step"] == 1 and e["stage"] >= 0:
                ax_align.axvline(i, color="grey", linewidth=0.5)
        ax_align.legend(fontsize=7)
    ax_align.set(title="owner emulator alignment (Eq. 7)", xlabel="alignment step", ylabel="loss")

    rounds = by_kind["round"]
    if rounds:
        xs = [e["round"] for e in rounds]
        ax_round.plot(xs, [e.get("mb_down", 0.0) for e in rounds], "o-", label="MB down")
        ax_round.plot(xs, [e.get("mb_up", 0.0) for e in rounds], "s-", label="MB up")
        ax_round.set(xlabel="round", ylabel="MB per round (all parties)")
        ax_round.legend(fontsize=7, loc="center left")
        ax_round.xaxis.set_major_locator(MaxNLocator(integer=True))
        losses = [(x, e["train_loss"]) for x, e in zip(xs, rounds, strict=True) if e.get("train_loss") is not None]
        if losses:
            twin = ax_round.twinx()
            twin.plot(*zip(*losses, strict=True), "d--", color="black", label="mean train loss")
            twin.set_ylabel("mean train loss")
            twin.legend(fontsize=7, loc="center right")
    ax_round.set_title("rounds")

    summary = by_kind["summary"][-1] if by_kind["summary"] else None
    if summary:
        names = ["untouched", "AdapEmu", "AdapFu"]
        values = [summary.get("nll_base"), summary.get("nll_adapemu"), summary.get("nll_adapfu")]
        bars = ax_nll.bar(names, [v or 0.0 for v in values], color=["#888888", "#ff7f0e", "#1f77b4"])
        for bar, v in zip(bars, values, strict=True):
            if v is not None:
                ax_nll.annotate(f"{v:.4f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                                va="bottom", fontsize=8)
    else:
        ax_nll.text(0.5, 0.5, "the run has not finished", ha="center", va="center", transform=ax_nll.transAxes)
    ax_nll.set(title="held-out response NLL (lower is better)", ylabel="NLL")

    fig.suptitle(f"{run_dir.name}: {len(rounds)} round(s)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return out


def _fidelity_panel(ax, events: list[dict], locator) -> None:
    """Cosine (left axis) and norm ratio (right axis) of the adapter-LoRA gradients, at 0 = after pre-alignment
    and at r = after round r's alignment."""
    points = [(e["stage"] + 1, e.get("cosine"), e.get("norm_ratio")) for e in events if "stage" in e]
    ax.set(title="gradient fidelity: adapter-LoRA gradient through the emulator vs the full model",
           xlabel="after round (0 = pre-alignment)", ylabel="cosine")
    if not points:
        ax.text(0.5, 0.5, "not measured (no emulator, or --fidelity-batches 0)", ha="center", va="center",
                transform=ax.transAxes)
        return
    cos = [(x, c) for x, c, _ in points if c is not None]
    ratio = [(x, r) for x, _, r in points if r is not None]
    if cos:
        ax.plot(*zip(*cos, strict=True), "o-", color="#1f77b4", label="cosine (1 = same direction)")
    ax.axhline(1.0, color="grey", linewidth=0.5)
    ax.legend(fontsize=7, loc="lower left")
    ax.xaxis.set_major_locator(locator(integer=True))
    if ratio:
        twin = ax.twinx()
        twin.plot(*zip(*ratio, strict=True), "s--", color="#d62728", label="norm ratio emulator / full")
        twin.set_ylabel("norm ratio")
        twin.legend(fontsize=7, loc="lower right")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m owner.plot", description=__doc__.split("\n")[0])
    p.add_argument("run_dir", type=Path, help="a run's --out directory")
    p.add_argument("--out", type=Path, help="PNG to write (default: RUN_DIR/metrics.png)")
    args = p.parse_args(argv)
    try:
        written = plot_run(args.run_dir, args.out or args.run_dir / "metrics.png")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(written)
    return 0


if __name__ == "__main__":
    sys.exit(main())
