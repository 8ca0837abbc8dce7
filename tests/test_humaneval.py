"""HumanEval: problems, the unbiased pass@k estimator, completions checked in the sandbox."""

from __future__ import annotations

import gzip
import itertools
import json
import math
import sys
from fractions import Fraction

import pytest

from errors import ConfigError, DataError
from tasks.humaneval import (
    STOP_STRINGS,
    build_program,
    check_completion,
    evaluate_humaneval,
    load_problems,
    pass_at_k,
)
from tasks.sandbox import STATUSES
from tests.tiny_models import byte_tokenizer, tiny_model

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox targets Linux")


@pytest.fixture(scope="module")
def problems():
    return load_problems()


def brute_force_pass_at_k(n: int, c: int, k: int) -> Fraction:
    """Share of all k-subsets of n samples (c of them correct) that hold at least one correct one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(samples[i] for i in s) for s in subsets), len(subsets))


@pytest.mark.parametrize("n", range(1, 8))
def test_pass_at_k_matches_enumeration_of_subsets(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(float(brute_force_pass_at_k(n, c, k)), abs=1e-12)


def test_pass_at_k_is_stable_for_large_n():
    n, c, k = 200, 3, 100
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12)
    assert pass_at_k(1000, 0, 10) == 0.0
    assert pass_at_k(1000, 995, 10) == 1.0
    assert pass_at_k(10, 1, 1) == pytest.approx(0.1)


@pytest.mark.parametrize(("n", "c", "k"), [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)])
def test_pass_at_k_rejects_impossible_counts(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_default_problems_come_from_the_package(problems):
    assert len(problems) == 164
    first = problems["HumanEval/0"]
    assert first["entry_point"] == "has_close_elements"
    assert all({"prompt", "test", "entry_point", "canonical_solution"} <= set(p) for p in problems.values())


def test_humaneval_x_file_loads_with_inferred_entry_points(tmp_path, problems):
    """HumanEval-X (Python) records have no entry_point and their tests already call check()."""
    source = problems["HumanEval/2"]
    name = source["entry_point"]
    record = {
        "task_id": "Python/2",
        "prompt": source["prompt"],
        "canonical_solution": source["canonical_solution"],
        "test": source["test"].replace("candidate", name) + f"\ncheck({name})\n",
        "declaration": source["prompt"],
    }
    path = tmp_path / "humaneval_python.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    loaded = load_problems(str(path))
    assert list(loaded) == ["Python/2"]
    problem = loaded["Python/2"]
    assert problem["entry_point"] == name
    assert build_program(problem, problem["canonical_solution"]).count("\ncheck(") == 1
    assert build_program(source, source["canonical_solution"]).count("\ncheck(") == 1


def test_bad_problem_files(tmp_path):
    with pytest.raises(DataError):
        load_problems(str(tmp_path / "missing.jsonl"))
    incomplete = tmp_path / "incomplete.jsonl"
    incomplete.write_text(json.dumps({"task_id": "x/1", "prompt": "def f():\n"}) + "\n")
    with pytest.raises(DataError):
        load_problems(str(incomplete))
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    with pytest.raises(DataError):
        load_problems(str(broken))


@linux_only
@pytest.mark.parametrize("task_id", ["HumanEval/0", "HumanEval/12", "HumanEval/53", "HumanEval/163"])
def test_canonical_solutions_pass_in_the_sandbox(problems, task_id):
    problem = problems[task_id]
    result = check_completion(problem, problem["canonical_solution"], timeout_s=10.0)
    assert result.passed and result.status == "passed", result.detail


@linux_only
def test_wrong_and_looping_completions_fail(problems):
    problem = problems["HumanEval/0"]
    wrong = check_completion(problem, "    return False\n", timeout_s=10.0)
    assert not wrong.passed and wrong.status == "failed" and "AssertionError" in wrong.detail
    looping = check_completion(problem, "    while True:\n        pass\n", timeout_s=1.0)
    assert looping.status == "timeout"


@linux_only
def test_evaluate_humaneval_with_a_tiny_model(problems):
    model, tok = tiny_model("llama", n_layers=2), byte_tokenizer()
    result = evaluate_humaneval(model, tok, problems, n_samples=2, k=(1, 2), temperature=0.8,
                                batch_size=4, max_new_tokens=8, limit=2, progress=False)
    assert result["n_tasks"] == 2 and result["n_samples"] == 2
    assert [r["task_id"] for r in result["records"]] == ["HumanEval/0", "HumanEval/1"]
    assert "audit-hook" in result["sandbox_layers"]
    for record in result["records"]:
        assert len(record["samples"]) == 2
        assert all(s["status"] in STATUSES for s in record["samples"])
        assert all(not any(stop in s["completion"] for stop in STOP_STRINGS) for s in record["samples"])
        n_correct = sum(s["status"] == "passed" for s in record["samples"])
        assert record["n_correct"] == n_correct
        assert record["pass@2"] == pass_at_k(2, n_correct, 2)
    for k in (1, 2):
        assert result[f"pass@{k}"] == pytest.approx(sum(r[f"pass@{k}"] for r in result["records"]) / 2)
    json.dumps(result)  # results are written as JSON


def test_evaluate_humaneval_rejects_inconsistent_settings(problems):
    model, tok = tiny_model("llama", n_layers=2), byte_tokenizer()
    with pytest.raises(ConfigError):
        evaluate_humaneval(model, tok, problems, n_samples=3, temperature=0.0, limit=1, progress=False)
    with pytest.raises(ConfigError):
        evaluate_humaneval(model, tok, problems, n_samples=2, k=(5,), temperature=0.8, limit=1,
                           progress=False)
