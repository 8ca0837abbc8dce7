"""The GPU check's driver on a CPU: each step in its own process and reported whatever the others do (a
failure, a crash, a timeout), the report written as JSON and markdown after every step, and a clean exit that
runs nothing where there is no GPU. The measurements themselves need one."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import benchmarks.gpu_check as gpu_check

ROOT = Path(__file__).resolve().parents[1]
HERE = "tests.test_gpu_check"


# the checks the fake runs use, each run by the driver in a process of its own
def passes(work: Path) -> dict:
    (work / "touched").write_text("yes")
    return {"value": 1.5, "pid": os.getpid()}


def fails(work: Path) -> dict:
    raise AssertionError("the numbers did not hold: 3 > 2")


def crashes(work: Path) -> dict:
    print("about to die", flush=True)
    os._exit(3)


def hangs(work: Path) -> dict:
    time.sleep(60)
    return {}


def args(tmp_path: Path, **overrides) -> argparse.Namespace:
    base = {"out": str(tmp_path / "results"), "work": str(tmp_path / "work"), "only": None, "timeout": 30.0,
            "no_pytest": True}
    return argparse.Namespace(**(base | overrides))


def test_every_step_is_reported_whatever_the_others_do(tmp_path):
    checks = {name: f"{HERE}:{name}" for name in ("passes", "fails", "crashes", "hangs")} | {
        "again": f"{HERE}:passes"}
    report = gpu_check.run(args(tmp_path, timeout=8.0), checks)
    steps = {s["name"]: s for s in report["steps"]}
    assert [s["name"] for s in report["steps"]] == list(checks)
    assert {n: s["status"] for n, s in steps.items()} == {"passes": "ok", "fails": "failed", "crashes": "failed",
                                                         "hangs": "timeout", "again": "ok"}
    assert steps["passes"]["figures"]["value"] == 1.5
    assert steps["passes"]["figures"]["pid"] not in (os.getpid(), steps["again"]["figures"]["pid"])
    assert (tmp_path / "work" / "passes" / "touched").is_file()
    assert "AssertionError: the numbers did not hold: 3 > 2" == steps["fails"]["error"]
    assert steps["crashes"]["error"] == "exit status 3" and "about to die" in steps["crashes"]["output"]
    assert "still running after 8 s" in steps["hangs"]["error"]

    saved = json.loads((tmp_path / "results" / "gpu_check.json").read_text())
    assert saved["steps"] == report["steps"] and "torch" in saved["environment"]
    md = (tmp_path / "results" / "gpu_check.md").read_text()
    assert "| passes | ok |" in md and "| hangs | timeout |" in md and "- value: 1.5" in md
    assert "## fails: failed" in md and "3 > 2" in md


def test_the_report_is_written_after_each_step(tmp_path, monkeypatch):
    seen = []
    real = gpu_check.write

    def spy(report, out):
        real(report, out)
        seen.append([s["name"] for s in json.loads((out / "gpu_check.json").read_text())["steps"]])

    monkeypatch.setattr(gpu_check, "write", spy)
    gpu_check.run(args(tmp_path), {"one": f"{HERE}:passes", "two": f"{HERE}:fails"})
    assert seen == [["one"], ["one", "two"]]


def test_the_pytest_step_runs_the_gpu_marked_tests(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(gpu_check, "run_step", lambda name, argv, timeout, result=None: calls.append(argv) or {
        "name": name, "status": "ok", "seconds": 0.0, "figures": {}})
    gpu_check.run(args(tmp_path, no_pytest=False), {"one": f"{HERE}:passes"})
    assert calls[0][:2] == ["-m", "pytest"] and "gpu" in calls[0] and "tests/test_gpu.py" in calls[0]
    assert all((ROOT / p).is_file() for p in gpu_check.PYTEST)
    assert calls[1][:3] == ["-m", "benchmarks.gpu_check", "--worker"]


def test_a_step_without_a_result_file_is_judged_by_its_exit_status(tmp_path):
    """The pytest step: its last line is its summary, a nonzero exit its failure."""
    ok = gpu_check.run_step("pytest", ["-c", "print('noise'); print('3 passed in 1.0s')"], 30)
    assert ok["status"] == "ok" and ok["figures"] == {"summary": "3 passed in 1.0s"}
    bad = gpu_check.run_step("pytest", ["-c", "import sys; print('1 failed'); sys.exit(1)"], 30)
    assert bad["status"] == "failed" and bad["error"] == "exit status 1" and "1 failed" in bad["output"]


def test_every_measurement_is_a_function_of_the_measures_module():
    import benchmarks.gpu_measures as measures

    for target in gpu_check.CHECKS.values():
        module, _, function = target.partition(":")
        assert module == "benchmarks.gpu_measures" and callable(getattr(measures, function))


def test_without_a_gpu_it_says_so_and_runs_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "cuda_device", lambda: None)
    assert gpu_check.main(["--out", str(tmp_path / "results"), "--work", str(tmp_path / "work")]) == 0
    assert "no CUDA GPU" in capsys.readouterr().out
    assert not (tmp_path / "results").exists() and not (tmp_path / "work").exists()


@pytest.mark.skipif(sys.platform == "win32", reason="a bash script")
def test_the_script_installs_nothing_when_the_environment_is_there(tmp_path):
    """With a ready Python it goes straight to the driver (no pip, no venv made): on a machine without a GPU
    that is the clean 'no CUDA GPU' exit."""
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("on a GPU machine the script would run the whole check")
    env = {**os.environ, "PYTHON": sys.executable, "FEDBIOT_OFFLINE": "1"}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--out", str(tmp_path / "r")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA GPU" in proc.stdout and "install" not in proc.stderr  # FEDBIOT_OFFLINE=1 would refuse it
