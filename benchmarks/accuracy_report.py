"""The accuracy benchmark's report: cells pooled over seeds, paired tests between methods, the gradient fidelity
against the NLL across runs, and the markdown table and plot (what `benchmarks.accuracy` writes)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from benchmarks.reports import save_figure
from benchmarks.stats import paired_test, spearman

METHOD_LABELS = {"untouched": "untouched", "offsite": "Offsite-tuning", "fedot": "FedOT", "fedbiot": "FedBiOT",
                 "fedavg-full": "FedAvg-LoRA (full model)"}
NO_REALIGN_LABEL = "FedBiOT without re-alignment"
VARIANT_LABELS = {"full": "-", "adapemu": "AdapEmu", "adapfu": "AdapFu"}
FIDELITY_KEYS = ("fidelity_pre", "fidelity_last", "fidelity_task_pre", "fidelity_task_last")
FIDELITY_LABELS = {"fidelity_pre": "public, pre-aligned", "fidelity_last": "public, last round",
                   "fidelity_task_pre": "task, pre-aligned", "fidelity_task_last": "task, last round"}
CELL_KEYS = ("method", "label", "adapter", "adapter_size", "drop_rate", "align_steps", "bottom_adapter", "kl_weight",
             "prox_eps", "prox_ablation", "lr", "variant")
TESTED = ("nll", "answer_nll")


def wilson_interval(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float] | None:
    """95% Wilson score interval of a proportion k/n (sound for small n and for 0 or n successes)."""
    if n <= 0:
        return None
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    """Mean, sample std (0 for one value) and n of the values that exist."""
    xs = [v for v in values if v is not None]
    if not xs:
        return None, None, 0
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return mean, std, len(xs)


def aggregate(rows: Sequence[dict]) -> list[dict]:
    """One cell per configuration and variant: NLL, answer-line NLL and accuracy as mean, std and n over seeds,
    the mean fidelity, and the 95% Wilson interval of the pooled accuracy counts."""
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault(tuple(json.dumps(r.get(k)) for k in CELL_KEYS), []).append(r)
    out = []
    for group in cells.values():
        nll, nll_std, n = mean_std([r["nll"] for r in group])
        answer, answer_std, _ = mean_std([r.get("answer_nll") for r in group])
        fidelity = {key: mean_std([r.get(key) for r in group])[0] for key in FIDELITY_KEYS}
        acc, acc_std, n_acc_seeds = mean_std([r["accuracy"] for r in group])
        k = sum(r["n_correct"] or 0 for r in group if r["accuracy"] is not None)
        total = sum(r["n_acc"] or 0 for r in group if r["accuracy"] is not None)
        out.append({**{key: group[0].get(key) for key in CELL_KEYS}, "seeds": [r["seed"] for r in group],
                    "nll": nll, "nll_std": nll_std, "n": n, "answer_nll": answer, "answer_nll_std": answer_std,
                    **fidelity, "accuracy": acc, "accuracy_std": acc_std, "n_accuracy_seeds": n_acc_seeds,
                    "n_correct": k if total else None, "n_acc": total or None,
                    "ci95": wilson_interval(k, total) if total else None})
    return out


def arm_label(method: str, align_steps: int, bottom: int = 0, eps: float | None = None) -> str:
    """A method's row label; FedBiOT's ablations say what they take away or change."""
    if method != "fedbiot":
        return METHOD_LABELS[method]
    label = "FedBiOT" if align_steps else NO_REALIGN_LABEL
    label += f", first {bottom} + last s layers" if bottom else ""
    if eps is not None:
        label += " without the proximal term" if eps == 0 else f", proximal eps {eps:g}"
    return label


def arm_of(row: dict) -> tuple:
    """What a paired test compares: the method, its re-alignment steps, FedBiOT's first-a layers, the adapter size
    and the proximal ablation's eps (None: the method's own)."""
    return (row["method"], row.get("align_steps") or 0, row.get("bottom_adapter") or 0, row.get("adapter_size"),
            row.get("prox_ablation"))


def paired_tests(rows: Sequence[dict], reference_steps: int, reference_bottom: int = 0,
                 reference_size: int | None = None, variant: str = "adapfu") -> list[dict]:
    """Per drop rate > 0, paired by seed over the seeds both have, on the response and the answer-line NLL:
    FedBiOT itself (`reference_steps` re-alignment steps, `reference_bottom` first adapter layers, adapter size
    `reference_size`, None = every size) against every other arm (method, re-alignment, layout, adapter size,
    proximal ablation); each other FedBiOT arm against each baseline with its very adapter (FedBiOT's first
    2 + last 2 against FedOT's), which says what FedBiOT's training adds at the baselines' layout; and at every
    other size, FedBiOT's own layout against its ablations there (last 2 against first 2 + last 2); and FedBiOT with
    another proximal eps against every arm, which says where a changed default would stand.
    `mean_difference` is A minus B (negative: A's NLL is lower)."""
    by_beta: dict[float, dict[tuple, dict[int, dict]]] = {}
    for r in rows:
        if r["variant"] == variant and r.get("drop_rate") and r["method"] in ("offsite", "fedot", "fedbiot"):
            by_beta.setdefault(r["drop_rate"], {}).setdefault(arm_of(r), {})[r["seed"]] = r
    tests = []
    for beta, arms in sorted(by_beta.items()):
        itself = {a[3]: a for a in arms if a[0] == "fedbiot" and a[1:3] == (reference_steps, reference_bottom)
                  and a[4] is None}  # FedBiOT's own layout, by adapter size
        own = [a for size, a in itself.items() if reference_size in (None, size)]
        adapter = {a: next(iter(seeds.values()))["adapter"] for a, seeds in arms.items()}
        pairs = [(a, b) for a in own for b in arms if b != a]
        pairs += [(a, b) for a in arms if a[0] == "fedbiot" and a not in own  # at the baselines' very adapter
                  for b in arms if b[0] != "fedbiot" and adapter[b] == adapter[a]]
        pairs += [(itself[b[3]], b) for b in arms if b[0] == "fedbiot" and b[3] in itself  # at the other sizes
                  and itself[b[3]] not in own and b != itself[b[3]]]
        pairs += [(a, b) for a in arms if a[0] == "fedbiot" and a[4] is not None  # another eps against all arms
                  for b in arms if b != a]
        once: dict[frozenset, tuple] = {}
        for pair in pairs:
            once.setdefault(frozenset(pair), pair)  # each pair once, in the orientation its rule gave first
        for a, b in once.values():
            seeds = sorted(set(arms[a]) & set(arms[b]))
            for metric in TESTED:
                values = [(arms[a][s][metric], arms[b][s][metric]) for s in seeds
                          if arms[a][s].get(metric) is not None and arms[b][s].get(metric) is not None]
                result = paired_test([x for x, _ in values], [y for _, y in values])
                test = {"a": arm_label(*a[:3], a[4]), "b": arm_label(*b[:3], b[4])}
                for side, arm in (("a", a), ("b", b)):
                    method, steps, bottom, size, eps = arm
                    test |= {f"method_{side}": method, f"align_steps_{side}": steps, f"bottom_adapter_{side}": bottom,
                             f"adapter_size_{side}": size, f"adapter_{side}": adapter[arm],
                             f"prox_ablation_{side}": eps}
                tests.append({**test, "drop_rate": beta, "variant": variant, "metric": metric, "seeds": seeds,
                              **result})
    return tests


def fidelity_correlations(runs: Sequence[dict]) -> list[dict]:
    """Spearman's rho between each gradient-fidelity measurement and the AdapFu NLL across the finished runs with an
    emulator (every lr, lambda and seed), per drop rate and pooled."""
    runs = [r for r in runs if r.get("drop_rate") and r["method"] in ("offsite", "fedot", "fedbiot")]
    out = []
    for beta in [*sorted({r["drop_rate"] for r in runs}), None]:
        chosen = [r for r in runs if beta is None or r["drop_rate"] == beta]
        for key in FIDELITY_KEYS:
            pairs = [(r["fidelity"].get(key), r["summary"].get("nll_adapfu")) for r in chosen]
            pairs = [(f, nll) for f, nll in pairs if f is not None and nll is not None]
            out.append({"drop_rate": beta, "measure": key, **spearman([f for f, _ in pairs], [n for _, n in pairs])})
    return out


# ---------------------------------------------------------------------------------------------- markdown

def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _spread(mean: float | None, std: float | None, n: int, digits: int) -> str:
    if mean is None:
        return "-"
    return f"{mean:.{digits}f} ± {std:.{digits}f} (n={n})" if n > 1 else f"{mean:.{digits}f} (n=1)"


def _g(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def _p(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _fidelity(cell: dict, prefix: str = "fidelity") -> str:
    if cell.get("method") in ("untouched", "fedavg-full") or cell.get(f"{prefix}_pre") is None:
        return "-"
    return f"{cell[f'{prefix}_pre']:.3f} -> {_fmt(cell.get(f'{prefix}_last'), 3)}"


def _table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A markdown table (with a title line above it when given)."""
    head = [title, ""] if title else []
    return [*head, "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
            *("| " + " | ".join(row) + " |" for row in rows)]


def _results_table(result: dict) -> list[str]:
    rows = []
    for c in result["cells"]:
        accuracy = "-"
        if c["accuracy"] is not None:
            lo, hi = c["ci95"]
            accuracy = (f"{_spread(c['accuracy'], c['accuracy_std'], c['n_accuracy_seeds'], 3)}; pooled "
                        f"{c['n_correct']}/{c['n_acc']}, 95% CI [{lo:.3f}, {hi:.3f}]")
        rows.append([c["label"], c["adapter"], _fmt(c["drop_rate"], 1), _g(c.get("align_steps")), _g(c["kl_weight"]),
                     _g(c["prox_eps"]), _g(c["lr"]), VARIANT_LABELS[c["variant"]],
                     _spread(c["nll"], c["nll_std"], c["n"], 4),
                     _spread(c.get("answer_nll"), c.get("answer_nll_std"), c["n"], 4), _fidelity(c),
                     _fidelity(c, "fidelity_task"), accuracy])
    return _table(None, ["method", "adapter", "beta", "re-align steps", "lambda", "eps", "lr (chosen)", "variant",
                         "NLL mean ± std (n seeds)", "answer-line NLL", "gradient cosine, public (pre-aligned -> last "
                         "round)", "gradient cosine, task", result["accuracy_metric"] or "accuracy"], rows)


def _tests_table(tests: Sequence[dict]) -> list[str]:
    rows = [[f"{t['drop_rate']:g}", f"{t['a']} ({t['adapter_a']})", f"{t['b']} ({t['adapter_b']})", t["metric"],
             str(t["n"]), ", ".join(str(s) for s in t["seeds"]) or "-",
             "-" if t["mean_difference"] is None else f"{t['mean_difference']:+.4f}",
             "-" if t["ci95"] is None else f"[{t['ci95'][0]:+.4f}, {t['ci95'][1]:+.4f}]", _p(t["p_t"]),
             _p(t["p_wilcoxon"])] for t in tests]
    return _table("Paired tests over seeds (AdapFu; difference = A minus B, negative = A lower; adapter layers in "
                  "brackets):", ["beta", "A", "B", "metric", "n", "seeds", "mean difference", "95% CI", "paired t p",
                   "Wilcoxon p"], rows)


def _correlation_table(correlations: Sequence[dict]) -> list[str]:
    rows = [["all" if c["drop_rate"] is None else f"{c['drop_rate']:g}", FIDELITY_LABELS[c["measure"]], str(c["n"]),
             _fmt(c["rho"], 3), _p(c["p"])] for c in correlations]
    return _table("Gradient fidelity against AdapFu test NLL across runs (Spearman's rho; every finished run with an "
                  "emulator: tuning candidates and seeds):", ["beta", "fidelity measured on", "n runs", "rho", "p"],
                  rows)


def _selection_table(selection: Sequence[dict]) -> list[str]:
    rows = [[s["group"] + (f" (takes {s['follows']})" if s.get("follows") else ""),
             f"{s.get('candidates', '-')}" + (f" ({s['finished']} finished)" if s.get("candidates") else ""),
             ", ".join(f"{v:g}" for v in s.get("lrs") or []), _g(s["lr"]), _g(s["kl_weight"]), _g(s["prox_eps"]),
             s.get("lr_edge") or "no"] for s in selection]
    return _table("Selection (on the first seed's validation NLL; candidates = settings the search compares; "
                  "finished = tuning runs finished for the group):",
                  ["group", "candidates", "lr grid", "lr", "lambda", "eps", "lr at the grid's edge"], rows)


def _tuning_table(tuning: Sequence[dict]) -> list[str]:
    order = sorted(tuning, key=lambda t: (t["group"], t["kl_weight"] or 0, t["prox_eps"] or 0, t["lr"]))
    rows = [[t["group"], _g(t["kl_weight"]), _g(t["prox_eps"]), f"{t['lr']:g}", _fmt(t["val_nll"], 4),
             _fmt(t["nll_adapfu"], 4), _fmt(t.get("answer_nll_adapfu"), 4), _fmt(t["nll_adapemu"], 4),
             _fidelity({"method": t["group"], **t}), _fidelity({"method": t["group"], **t}, "fidelity_task")]
            for t in order]
    return _table("Tuning runs on the first seed (validation NLL of AdapFu chooses; the test NLLs beside it do not):",
                  ["group", "lambda", "eps", "lr", "validation NLL", "test NLL AdapFu", "answer-line NLL AdapFu",
                   "test NLL AdapEmu", "gradient cosine, public", "gradient cosine, task"], rows)


def markdown(result: dict) -> str:
    b, acc = result["budget"], result["accuracy_metric"]
    lines = [f"# {result['task']}: FedBiOT and baselines on one engine", "",
             f"Model: {b['model']}. Command: `{result['command']}`", "", *_results_table(result)]
    for section, table in (("tests", _tests_table), ("fidelity_vs_nll", _correlation_table),
                           ("selection", _selection_table), ("tuning", _tuning_table)):
        if result.get(section):
            lines += ["", *table(result[section])]
    parties = ", ".join(f"{METHOD_LABELS[m]} {n}" for m, n in b["parties"].items())
    realign = ", ".join(str(v) for v in b["align_steps"])
    lines += [
        "",
        "Budget: " + (
            f"{b['train_examples']} training examples ({b['train_data']}) split {b['split']} over the parties "
            f"({parties}); {b['rounds']} rounds of {b['local_steps']} local steps x batch {b['batch_size']} per "
            f"party (LoRA r{b['lora_r']}, max {b['max_length']} tokens, frozen weights in {b['dtype']}); per group "
            f"the party lr out of {', '.join(f'{v:g}' for v in b['lrs'])} and, for every method with an emulator, "
            f"lambda out of {', '.join(f'{v:g}' for v in b['kl_weights'])} (FedBiOT's eps out of "
            f"{', '.join(f'{v:g}' for v in b['prox_eps'])}) chosen ({b['search']} search) on seed {b['seeds'][0]} by "
            f"the AdapFu NLL on {b['val_items']} held-out training items, then seeds "
            f"{', '.join(str(s) for s in b['seeds'])} at the choice"
            + "".join(f" (beta {beta}: seeds {', '.join(str(s) for s in seeds)})"
                      for beta, seeds in (b.get("seeds_at") or {}).items())
            + f"; the owner aligns the emulator on {b['public_examples']} public examples ({b['public_data']}) at lr "
            f"{b['align_lr']:g}: {b['align_pre_steps']} steps before round 1 (every method with an emulator), then "
            f"{realign} after every round (FedBiOT; 0 is FedBiOT without re-alignment). Baselines train without the "
            "proximal term."),
        "",
        f"NLL: mean response-token negative log-likelihood on {b['eval_items']} held-out items "
        f"({b['test_data']}); answer-line NLL: the same over the tokens of the response's last line only (GSM8K: "
        f"\"The answer is N.\"), on the {b.get('answer_items') or 'N'} items whose answer line fits in "
        f"{b['max_length']} tokens; lower is better.",
        "Paired seeds: at one seed every method with 3 parties gets the same party split and batches; Offsite-tuning "
        "(1 party) gets the same items in the same seed-derived order. Gradient cosine: the adapter-LoRA gradient "
        "through the emulator against through the full model, after pre-alignment -> after the last round, on the "
        f"owner's public batches and on {b.get('task_fidelity_batches', 0)} batches of 4 validation items (task).",
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


def plot(cells: list[dict], path: Path, title: str, accuracy_label: str | None) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    labels = [f"{r['label']}\ns={r['adapter']} beta={_fmt(r['drop_rate'], 1)} "
              f"{VARIANT_LABELS[r['variant']]}" if r["method"] != "untouched" else "untouched" for r in cells]
    panels = [("nll", "held-out response NLL (lower is better)")]
    if accuracy_label and any(r["accuracy"] is not None for r in cells):
        panels.append(("accuracy", accuracy_label))
    fig, axes = plt.subplots(1, len(panels), figsize=(max(6.0, 1.1 * len(cells)) * len(panels) / 1.5, 4.5),
                             squeeze=False)
    colours = {"untouched": "#888888", "offsite": "#d62728", "fedot": "#ff7f0e", "fedbiot": "#1f77b4",
               "fedavg-full": "#2ca02c"}
    for ax, (key, label) in zip(axes[0], panels, strict=True):
        values = [r[key] if r[key] is not None else 0.0 for r in cells]
        errors = [r.get(f"{key}_std") or 0.0 for r in cells]
        bars = ax.bar(range(len(cells)), values, yerr=errors, capsize=2,
                      color=[colours[r["method"]] for r in cells], edgecolor="black", linewidth=0.5)
        for bar, r in zip(bars, cells, strict=True):
            if r["variant"] == "adapemu":  # hatched: the adapter on the emulator, not on the full model
                bar.set_hatch("//")
            if r["method"] == "fedbiot" and r["drop_rate"] and (r.get("align_steps") == 0 or r.get("bottom_adapter")
                                                          or r.get("prox_ablation") is not None):
                bar.set_alpha(0.5)  # an ablation: without re-alignment, another layout or another proximal eps
        ax.set_xticks(range(len(cells)), labels, rotation=60, ha="right", fontsize=7)
        ax.set_title(label, fontsize=9)
        if key == "nll" and values:
            low, high = min(values), max(values)
            ax.set_ylim(max(0.0, low - 0.2 * (high - low + 1e-3)), high + 0.1 * (high - low + 1e-3))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
