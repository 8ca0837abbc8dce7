"""The GPU check: a GPU-marked pytest subset, then each measurement of `benchmarks.gpu_measures` in a process of
its own, with one report at the end (and after every step, so a stopped check still leaves one).

    python -m benchmarks.gpu_check [--out docs/results] [--work runs/gpu-check] [--only NAME ...]
        [--timeout S] [--no-pytest]

Each step is isolated: a failure, a crash or a timeout is recorded for that step (its error and the tail of
its output) and the next one runs. Nothing is installed or downloaded here (`benchmarks/gpu_check.sh` picks the
environment); on a machine without a CUDA GPU the check says so and exits 0 having run nothing. Writes
OUT/gpu_check.json and OUT/gpu_check.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from importlib import import_module
from pathlib import Path

from benchmarks.reports import write_report

REPO = Path(__file__).resolve().parents[1]
# name -> "module:function"; each function takes the work folder and returns JSON-able figures, raising when
# what it checks does not hold
CHECKS: dict[str, str] = {
    name: f"benchmarks.gpu_measures:{name}"
    for name in ("shared_storage", "cache_equality", "owner_memory", "party_precision", "float16_gradients",
                 "dp_and_nf4", "device_map", "loopback", "throughput")}
PYTEST = ("tests/test_gpu.py",)  # the GPU-marked tests
TAIL = 3000  # characters of a failed step's output kept in the report
ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def say(text: str) -> None:
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def cuda_device() -> str | None:
    """The first CUDA GPU's name, or None where torch sees none."""
    import torch  # noqa: PLC0415

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def environment() -> dict:
    import torch  # noqa: PLC0415

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env |= {"gpu": props.name, "gpu_memory_gb": round(props.total_memory / 1e9, 1),
                "capability": f"{props.major}.{props.minor}", "gpus": torch.cuda.device_count()}
    return env


# ------------------------------------------------------------------------------------------ one step

def run_step(name: str, argv: Sequence[str], timeout: float, result_file: Path | None = None) -> dict:
    """Run `argv` (a Python module invocation) in a process of its own; the step's record whatever happens.

    `result_file`: where the process writes its figures (a measurement); without it, the exit status decides
    (pytest)."""
    start = time.monotonic()
    if result_file is not None:
        result_file.unlink(missing_ok=True)
    try:
        proc = subprocess.run([sys.executable, *argv], cwd=REPO, env={**os.environ, **ENV}, capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        output, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        output = _text(e.stdout) + _text(e.stderr)
        return {"name": name, "status": "timeout", "seconds": round(time.monotonic() - start, 1),
                "error": f"still running after {timeout:g} s", "output": output[-TAIL:]}
    record = {"name": name, "seconds": round(time.monotonic() - start, 1)}
    if result_file is None and code == 0:
        return record | {"status": "ok", "figures": {"summary": (output.strip().splitlines() or [""])[-1]}}
    written = json.loads(result_file.read_text()) if result_file is not None and result_file.is_file() else None
    if written is not None and "error" not in written and code == 0:
        return record | {"status": "ok", "figures": written.get("figures", {})}
    error = (written or {}).get("error") or f"exit status {code}"
    return record | {"status": "failed", "error": error, "output": output[-TAIL:]}


def _text(data: str | bytes | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def worker(target: str, work: Path, result_file: Path) -> int:
    """In the step's own process: run the check `target` ("module:function") and write its figures, or its
    error, to `result_file`."""
    module, _, function = target.partition(":")
    work.mkdir(parents=True, exist_ok=True)
    try:
        check: Callable[[Path], dict] = getattr(import_module(module), function)
        out = {"figures": check(work)}
        code = 0
    except Exception as e:  # noqa: BLE001 - the report names whatever went wrong
        traceback.print_exc()
        out, code = {"error": f"{type(e).__name__}: {e}".strip()}, 1
    result_file.write_text(json.dumps(out, indent=1, default=str))
    return code


# ------------------------------------------------------------------------------------------ the report

def markdown(report: dict) -> str:
    """The report as markdown: the environment, one table row per step, then each step's figures or error."""
    env = report["environment"]
    lines = ["# GPU check", "", ", ".join(f"{k} {v}" for k, v in env.items()), "",
             "| step | status | seconds |", "| --- | --- | ---: |"]
    lines += [f"| {s['name']} | {s['status']} | {s['seconds']:.1f} |" for s in report["steps"]]
    for step in report["steps"]:
        lines += ["", f"## {step['name']}: {step['status']}", ""]
        if step["status"] == "ok":
            lines += [f"- {k}: {_fmt(v)}" for k, v in step.get("figures", {}).items()]
        else:
            lines += [step.get("error", ""), "", "```", step.get("output", "").strip()[-TAIL:], "```"]
    return "\n".join(lines) + "\n"


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_fmt(v)}" for k, v in value.items())
    return str(value)


def write(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_report(out / "gpu_check.json", json.dumps(report, indent=1) + "\n")
    write_report(out / "gpu_check.md", markdown(report))


def run(args: argparse.Namespace, checks: dict[str, str] | None = None) -> dict:
    """Every step in turn, the report rewritten after each."""
    checks = CHECKS if checks is None else checks
    chosen = args.only or list(checks)
    report = {"environment": environment(), "steps": []}
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if not args.no_pytest:
        say("pytest, GPU-marked tests")
        report["steps"].append(run_step("pytest", ["-m", "pytest", "-q", "-m", "gpu", *PYTEST], args.timeout))
        write(report, Path(args.out))
    for name in chosen:
        say(name)
        result = work / f"{name}.result.json"
        step = run_step(name, ["-m", "benchmarks.gpu_check", "--worker", checks[name], "--work",
                               str(work / name), "--result", str(result)], args.timeout, result)
        say(f"{name}: {step['status']} ({step['seconds']:.0f} s)")
        report["steps"].append(step)
        write(report, Path(args.out))
    return report


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(REPO / "docs" / "results"), help="where the report goes")
    p.add_argument("--work", default=str(REPO / "runs" / "gpu-check"), help="the steps' scratch folders")
    p.add_argument("--only", nargs="+", choices=sorted(CHECKS), help="these measurements only")
    p.add_argument("--timeout", type=float, default=300, help="seconds a step may take")
    p.add_argument("--no-pytest", action="store_true", help="skip the GPU-marked tests")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # module:function, run inside a step's process
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args.worker, Path(args.work), Path(args.result))
    gpu = cuda_device()
    if gpu is None:
        print("gpu-check: torch sees no CUDA GPU on this machine; nothing was run (run it where one is)")
        return 0
    say(f"on {gpu}")
    report = run(args)
    failed = [s["name"] for s in report["steps"] if s["status"] != "ok"]
    say(f"report: {Path(args.out) / 'gpu_check.md'}; " + (f"not ok: {', '.join(failed)}" if failed else "all ok"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
