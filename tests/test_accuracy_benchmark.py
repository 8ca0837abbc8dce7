"""`python -m benchmarks.accuracy` end to end on a tiny model (NLL only, one round): outputs, the untouched
row, reuse of finished runs, refusal to mix settings, and the seeded hold-out."""

from __future__ import annotations

import argparse
import json

import pytest

from benchmarks.accuracy import TASKS, main, prepare_data


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-data")
    words = "red blue green yellow black white".split()
    train = [{"question": f"What colour is item {i}?", "answer": f"Item {i} is {words[i % 6]}.\n#### {i}"}
             for i in range(16)]
    public = [{"instruction": f"Say hello {i} times.", "context": "", "response": "hello " * (i % 4 + 1),
               "category": "open_qa"} for i in range(8)]
    test = [{"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(6)]
    for name, rows in [("train.jsonl", train), ("public.jsonl", public), ("test.jsonl", test)]:
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def bench_args(model_dir, data, out, *extra):
    return ["--out", str(out), "--task", "gsm8k", "--model", str(model_dir), "--methods", "untouched", "fedot",
            "fedbiot", "--drop-rates", "0.5", "--adapter-sizes", "2", "--rounds", "1", "--local-steps", "1",
            "--batch-size", "2", "--align-pre-steps", "1", "--align-steps", "1", "--eval-items", "4",
            "--max-length", "64", "--parties", "2", "--no-accuracy", "--train-data", str(data / "train.jsonl"),
            "--test-data", str(data / "test.jsonl"), "--public-data", str(data / "public.jsonl"), *extra]


def test_benchmark_writes_table_json_and_plot_and_reuses_runs(tiny_llama_dir, data_files, tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(bench_args(tiny_llama_dir, data_files, out)) == 0
    result = json.loads((out / "accuracy.json").read_text())
    rows = [(r["method"], r["adapter"], r["variant"]) for r in result["rows"]]
    assert rows == [("untouched", "-", "full"), ("fedot", "2+2", "adapemu"), ("fedot", "2+2", "adapfu"),
                    ("fedbiot", "2", "adapemu"), ("fedbiot", "2", "adapfu")]
    assert all(r["nll"] > 0 and r["accuracy"] is None for r in result["rows"])
    # The untouched row is computed by the benchmark itself and agrees with what each run measured.
    for name in ("fedot-s2-b0.5", "fedbiot-s2-b0.5"):
        summary = json.loads((out / "runs" / name / "summary.json").read_text())
        assert summary["nll_base"] == pytest.approx(result["rows"][0]["nll"], rel=1e-4)
        assert summary["parties"] == 2 and summary["rounds"] == 1
    assert result["budget"]["rounds"] == 1 and result["budget"]["eval_items"] == 4
    table = (out / "accuracy.md").read_text()
    assert "| method | adapter | beta | variant | NLL |" in table and "FedOT" in table and "Budget:" in table
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    first = (out / "runs" / "fedbiot-s2-b0.5" / "summary.json").stat().st_mtime_ns
    capsys.readouterr()

    # The same command again: both runs are reused, nothing is retrained, the table is the same.
    assert main(bench_args(tiny_llama_dir, data_files, out)) == 0
    assert capsys.readouterr().err.count("finished run reused") == 2
    assert (out / "runs" / "fedbiot-s2-b0.5" / "summary.json").stat().st_mtime_ns == first
    again = json.loads((out / "accuracy.json").read_text())
    assert [r["nll"] for r in again["rows"]] == [r["nll"] for r in result["rows"]]

    # Other settings in the same directory would mix results: refused with one error line.
    assert main(bench_args(tiny_llama_dir, data_files, out, "--lr", "0.01")) == 2
    assert "other settings" in capsys.readouterr().err


def test_hold_out_is_seeded_and_disjoint(tmp_path):
    args = argparse.Namespace(train_data=None, public_data=None, test_data=None, eval_items=24, acc_items=5,
                              seed=0)
    first = prepare_data(TASKS["dolly"], args, tmp_path / "a")
    second = prepare_data(TASKS["dolly"], args, tmp_path / "b")
    train = (tmp_path / "a" / "train.jsonl").read_text().splitlines()
    test = (tmp_path / "a" / "test.jsonl").read_text().splitlines()
    assert len(test) == 24 and len(train) == 400 - 24 and not set(train) & set(test)
    assert first.test_records == second.test_records
    assert first.public == "codealpaca"
