"""Emulator quality against alignment steps: what pre-alignment buys, for which owner lr and lambda.

    python -m benchmarks.alignment --out DIR [--drop-rates 0.2 0.5] [--layouts fedbiot-4 fedot-2]
        [--lrs 3e-4 1e-3 3e-3] [--kl-weights 0 1] [--checkpoints 0 16 32 64 128] [--dtype bfloat16]
        [--eval-items 128] [--task-data SOURCE] [--task-skip N] [--threads N]

For every (drop rate, layout, owner lr, lambda) the owner's aligner runs one trajectory of distillation steps
on the public set (the steps up to the first checkpoint are exactly a run's pre-alignment; later ones continue
on fresh batches), and at each checkpoint two numbers say how good the emulator is for the parties:
- the zero-adapter NLL: held-out response NLL of the compressed model (emulator + untrained adapter) on held-out
  task items, against the full model's (what the adapter would start from on each);
- the gradient fidelity: cosine and norm ratio between the adapter-LoRA gradient through the emulator and
  through the full model, on batches of the parties' task and on the owner's public batches (what
  `metrics.jsonl` logs during a run).
The owner's alignment lr and steps are chosen here, so nothing here is a test item: the task items are training
records (`--task-data`, after the first `--task-skip`, e.g. the ones a grid's parties train on), shuffled with the
seed and cut into the `--eval-items` scored for the NLL and a disjoint pool for the gradient batches
(`--eval-data` replaces the former with another held-out source, never the test set). The report's choice: per
drop rate and lambda, the (owner lr, steps > 0) with the lowest zero-adapter NLL averaged over the layouts (ties:
fewer steps, then the smaller lr).
Writes DIR/alignment.json, DIR/alignment.md and DIR/alignment.png; a finished trajectory is reused, and the report
holds every trajectory finished in DIR with the same measurement settings (so a sweep can grow by later commands).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.accuracy import Progress
from benchmarks.reports import save_figure, write_report
from errors import FedbiotError

LAYOUTS = ("fedbiot", "offsite", "fedot")  # METHOD of --layouts METHOD-S


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.alignment", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", default=None, help="hub id or checkpoint (default: embedded SmolLM2)")
    p.add_argument("--drop-rates", nargs="+", type=float, default=[0.2, 0.5])
    p.add_argument("--layouts", nargs="+", default=["fedbiot-4"],
                   help="METHOD-S: FedBiOT's last S layers (fedbiot-4) or the baselines' first 2 + last S (fedot-2)")
    p.add_argument("--lrs", nargs="+", type=float, default=[3e-4, 1e-3, 3e-3], help="owner alignment lrs")
    p.add_argument("--kl-weights", nargs="+", type=float, default=[0.0, 1.0], help="lambda values")
    p.add_argument("--checkpoints", nargs="+", type=int, default=[0, 16, 32, 64, 128],
                   help="alignment steps at which the emulator is measured")
    p.add_argument("--public-data", default="dolly")
    p.add_argument("--public-limit", type=int, default=400)
    p.add_argument("--task-data", default="gsm8k-train",
                   help="the parties' task (training records): held-out NLL items and gradient batches")
    p.add_argument("--task-skip", type=int, default=0,
                   help="task records skipped from the start (e.g. the ones the grid's parties train on)")
    p.add_argument("--eval-data", default=None,
                   help="held-out items for the zero-adapter NLL (default: --eval-items of the task records, "
                        "disjoint from the gradient batches; never the test set: this chooses settings)")
    p.add_argument("--eval-items", type=int, default=128)
    p.add_argument("--grad-batches", type=int, default=4, help="batches of 4 for each gradient cosine")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--dtype", default="float32", help="frozen weights: float32 | bfloat16 | float16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    for layout in args.layouts:
        method, _, size = layout.partition("-")
        if method not in LAYOUTS or not size.isdigit() or int(size) < 1:
            p.error(f"--layouts: {layout!r} is not METHOD-S with METHOD fedbiot, offsite or fedot")
    if sorted(set(args.checkpoints)) != args.checkpoints or args.checkpoints[0] < 0:
        p.error("--checkpoints must be increasing and >= 0")
    if any(v <= 0 for v in args.lrs) or any(v < 0 for v in args.kl_weights):
        p.error("--lrs must be > 0 and --kl-weights >= 0")
    if args.task_skip < 0 or args.eval_items < 1:
        p.error("--task-skip must be >= 0 and --eval-items >= 1")
    return args


GRAD_POOL = 256  # task records the gradient batches are drawn from


def task_items(args: argparse.Namespace) -> tuple[list, list]:
    """(held-out NLL items, gradient-batch pool): disjoint, from the task's training records after `--task-skip`
    (seeded shuffle), or the NLL items from `--eval-data` when given."""
    import random  # noqa: PLC0415

    from errors import ConfigError  # noqa: PLC0415
    from tasks.datasets import load_examples  # noqa: PLC0415

    held = 0 if args.eval_data else args.eval_items
    records = load_examples(args.task_data, limit=args.task_skip + held + GRAD_POOL)[args.task_skip:]
    if len(records) < held + 4:
        raise ConfigError(f"{args.task_data}: {len(records)} records after --task-skip {args.task_skip} are too few "
                          f"for {held} held-out items and gradient batches")
    random.Random(f"{args.seed}/alignment-holdout").shuffle(records)
    evaluation = load_examples(args.eval_data, limit=args.eval_items) if args.eval_data else records[:held]
    return evaluation, records[held:]


def choose(trajectories: Sequence[dict]) -> list[dict]:
    """Per (drop rate, lambda): the (owner lr, steps > 0) whose zero-adapter NLL, averaged over the layouts measured
    at both, is lowest (ties: fewer steps, then the smaller lr)."""
    cells: dict[tuple, dict[tuple, list[float]]] = {}
    layouts: dict[tuple, set] = {}
    for t in trajectories:
        key = (t["drop_rate"], t["kl_weight"])
        layouts.setdefault(key, set()).add(t["layout"])
        for pt in t["points"]:
            if pt["steps"] > 0:
                cells.setdefault(key, {}).setdefault((pt["steps"], t["lr"]), []).append(pt["zero_adapter_nll"])
    out = []
    for key, points in sorted(cells.items()):
        complete = {k: v for k, v in points.items() if len(v) == len(layouts[key])}
        if not complete:
            continue
        (steps, lr), nlls = min(complete.items(), key=lambda kv: (sum(kv[1]) / len(kv[1]), kv[0]))
        out.append({"drop_rate": key[0], "kl_weight": key[1], "lr": lr, "steps": steps,
                    "zero_adapter_nll": sum(nlls) / len(nlls), "layouts": sorted(layouts[key])})
    return out


def trajectory(args: argparse.Namespace, beta: float, layout: str, lr: float, kl: float, run_dir: Path,
               base, say) -> dict:
    """One alignment trajectory measured at every checkpoint."""
    import torch  # noqa: PLC0415

    from owner.alignment import AlignSettings  # noqa: PLC0415
    from owner.config import RunConfig  # noqa: PLC0415
    from owner.evaluate import mean_response_nll  # noqa: PLC0415
    from owner.fidelity import fidelity_batches, gradient_fidelity  # noqa: PLC0415
    from owner.metrics import MetricsLog  # noqa: PLC0415
    from owner.session import OwnerData, OwnerSession  # noqa: PLC0415
    from tasks.datasets import load_examples  # noqa: PLC0415
    from tasks.prompts import tokenize_examples  # noqa: PLC0415

    method, _, size = layout.partition("-")
    config = RunConfig(model=args.model, method=method, adapter_size=int(size), drop_rate=beta, seed=args.seed,
                       public_data=args.public_data, public_limit=args.public_limit, max_length=args.max_length,
                       dtype=args.dtype,
                       align=AlignSettings(pre_steps=0, round_steps=0, lr=lr, kl_weight=kl, fidelity_batches=0))
    evaluation, pool = task_items(args)
    data = OwnerData(load_examples(args.public_data, limit=args.public_limit), evaluation)
    data.tokenize(base.tokenizer, config)
    session = OwnerSession.create(config, run_dir, MetricsLog(None, quiet=True), base, data)
    task_tokens = tokenize_examples(pool, base.tokenizer, args.max_length, config.template)
    task_groups = fidelity_batches(task_tokens, args.grad_batches, 4, args.seed)
    public_groups = fidelity_batches(data.public_tokens, args.grad_batches, 4, args.seed)
    points, done, seconds = [], 0, 0.0
    for k, steps in enumerate(args.checkpoints):
        if steps > done:
            started = time.perf_counter()
            info = session.aligner.run(steps - done, -1 if done == 0 else 1000 + k)
            seconds += time.perf_counter() - started
            done = steps
            say(f"  {steps} steps: distillation loss {info['loss_first']:.4f} -> {info['loss_last']:.4f}")
        task = gradient_fidelity(session.student, session.teacher, session.manifest, task_tokens, task_groups,
                                 session.pad_id)
        public = gradient_fidelity(session.student, session.teacher, session.manifest, data.public_tokens,
                                   public_groups, session.pad_id)
        with torch.no_grad():
            nll = mean_response_nll(session.student, data.eval_tokens, session.pad_id)
        points.append({"steps": steps, "zero_adapter_nll": nll, "align_seconds": round(seconds, 1),
                       "cosine_task": task["cosine"], "norm_ratio_task": task["norm_ratio"],
                       "cosine_public": public["cosine"], "norm_ratio_public": public["norm_ratio"]})
        say(f"  {steps} steps: zero-adapter NLL {nll:.4f}, gradient cosine task {task['cosine']:.3f} "
            f"(norm ratio {task['norm_ratio']:.2f}), public {public['cosine']:.3f}")
    with session.teacher.disable_adapter(), torch.no_grad():
        full = mean_response_nll(session.teacher, data.eval_tokens, session.pad_id)
    emulator = len(session.manifest.emulator_layers)
    return {"drop_rate": beta, "layout": layout, "lr": lr, "kl_weight": kl, "emulator_layers": emulator,
            "full_nll": full, "points": points}


def markdown(result: dict) -> str:
    lines = ["# Emulator quality against alignment steps", "",
             f"Model: {result['model']}, {result['dtype']}. Command: `{result['command']}`", "",
             "| beta | layout | owner lr | lambda | steps | zero-adapter NLL (full model) | cosine, task | "
             "norm ratio, task | cosine, public | align s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for t in result["trajectories"]:
        for pt in t["points"]:
            lines.append(f"| {t['drop_rate']:g} | {t['layout']} | {t['lr']:g} | {t['kl_weight']:g} | {pt['steps']} | "
                         f"{pt['zero_adapter_nll']:.4f} ({t['full_nll']:.4f}) | {pt['cosine_task']:.3f} | "
                         f"{pt['norm_ratio_task']:.2f} | {pt['cosine_public']:.3f} | {pt['align_seconds']:.0f} |")
    if result.get("choice"):
        lines += ["", "Choice (lowest zero-adapter NLL averaged over the layouts; steps > 0):", "",
                  "| beta | lambda | layouts | owner lr | steps | mean zero-adapter NLL |", "|---|---|---|---|---|---|"]
        lines += [f"| {c['drop_rate']:g} | {c['kl_weight']:g} | {', '.join(c['layouts'])} | {c['lr']:g} | "
                  f"{c['steps']} | {c['zero_adapter_nll']:.4f} |" for c in result["choice"]]
    lines += ["", f"Zero-adapter NLL: response NLL of the compressed model with an untrained adapter on "
              f"{result['eval_items']} held-out items ({result['eval_data']}; never test items) (the full model's "
              "in brackets). "
              "Cosine / norm ratio: adapter-LoRA gradient through the emulator against through the full model "
              f"(mean over {result['grad_batches']} batches of 4), on the parties' task and on the owner's public "
              "data. Alignment batch 4; the steps up to the first checkpoint are a run's pre-alignment.",
              f"Machine: {result['machine']}."]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for t in result["trajectories"]:
        steps = [p["steps"] for p in t["points"]]
        label = f"beta {t['drop_rate']:g} {t['layout']} lr {t['lr']:g} lambda {t['kl_weight']:g}"
        axes[0].plot(steps, [p["zero_adapter_nll"] for p in t["points"]], marker="o", label=label)
        axes[1].plot(steps, [p["cosine_task"] for p in t["points"]], marker="o", label=label)
    full = result["trajectories"][0]["full_nll"]
    axes[0].axhline(full, color="black", linestyle="--", linewidth=0.8, label="full model")
    axes[0].set(xlabel="alignment steps", ylabel="zero-adapter held-out NLL", title="emulator output quality")
    axes[1].set(xlabel="alignment steps", ylabel="cosine", title="adapter-gradient fidelity (task batches)")
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    save_figure(fig, path)


def _finished(path: Path, settings: dict) -> dict | None:
    """The trajectory saved at `path` when it was measured with `settings`, else None."""
    if not path.is_file():
        return None
    t = json.loads(path.read_text())
    return t if t.get("settings") == settings else None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from console.terminal import quiet_import_noise  # noqa: PLC0415

    quiet_import_noise(argv)
    args = parse_args(argv)
    from console.terminal import quiet_libraries  # noqa: PLC0415

    quiet_libraries()
    say = Progress()
    folder = args.out / "trajectories"
    settings = {k: getattr(args, k) for k in ("model", "checkpoints", "eval_items", "dtype", "public_limit",
                                              "grad_batches", "seed", "task_data", "task_skip", "eval_data")}
    try:
        import torch  # noqa: PLC0415

        from learning.hardware import resolve_hardware  # noqa: PLC0415
        from owner.models import load_model  # noqa: PLC0415

        if args.threads:
            torch.set_num_threads(args.threads)
        hardware = resolve_hardware("cpu", args.dtype)
        folder.mkdir(parents=True, exist_ok=True)
        for beta in args.drop_rates:
            for layout in args.layouts:
                for kl in args.kl_weights:
                    for lr in args.lrs:
                        name = f"b{beta:g}-{layout}-lr{lr:g}-kl{kl:g}"
                        saved = folder / f"{name}.json"
                        if _finished(saved, settings) is not None:
                            say(f"{name}: reused")
                            continue
                        say(f"{name}: aligning")
                        base = load_model(args.model, dtype=hardware.dtype)  # fresh: LoRA is attached in place
                        t = trajectory(args, beta, layout, lr, kl, args.out / "runs" / name, base, say)
                        write_report(saved, json.dumps({**t, "settings": settings}, indent=1) + "\n")
    except FedbiotError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # the report: every trajectory finished in DIR with these settings, this command's and earlier ones'
    trajectories = [t for path in sorted(folder.glob("*.json")) if (t := _finished(path, settings)) is not None]
    trajectories.sort(key=lambda t: (t["drop_rate"], t["layout"], t["kl_weight"], t["lr"]))
    result = {"model": args.model or "SmolLM2-135M-Instruct (embedded default)", "dtype": args.dtype,
              "command": "python -m benchmarks.alignment " + " ".join(argv), "eval_items": args.eval_items,
              "eval_data": args.eval_data or (f"training records of {args.task_data} after the first "
                                              f"{args.task_skip}, disjoint from the gradient batches"),
              "grad_batches": args.grad_batches, "choice": choose(trajectories),
              "machine": f"{os.cpu_count()} CPU cores ({platform.machine()}), {args.threads or 'default'} threads",
              "trajectories": trajectories}
    write_report(args.out / "alignment.json", json.dumps(result, indent=1) + "\n")
    table = markdown(result)
    write_report(args.out / "alignment.md", table)
    plot(result, args.out / "alignment.png")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
