"""`python -m benchmarks.accuracy` end to end on a tiny model (NLL only, one round): outputs, the untouched
row, reuse of finished runs, refusal to mix settings, and the seeded hold-out."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import pytest

from benchmarks.accuracy import (
    ORACLE_LABEL,
    TASKS,
    aggregate,
    groups_of,
    main,
    parse_args,
    plan,
    prepare_data,
    run_config,
    tune,
    wilson_interval,
)
from learning.training import TrainSettings
from owner.alignment import AlignSettings


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
            "--test-data", str(data / "test.jsonl"), "--public-data", str(data / "public.jsonl"),
            "--val-items", "4", *extra]

LR, KL, EPS = f"{TrainSettings().lr:g}", f"{AlignSettings().kl_weight:g}", f"{TrainSettings().prox_eps:g}"
FEDOT, FEDBIOT = f"fedot-s2-b0.5-eps0-lr{LR}-seed0", f"fedbiot-s2-b0.5-kl{KL}-eps{EPS}-lr{LR}-seed0"


def test_benchmark_writes_table_json_and_plot_and_reuses_runs(tiny_llama_dir, data_files, tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(bench_args(tiny_llama_dir, data_files, out)) == 0
    result = json.loads((out / "accuracy.json").read_text())
    rows = [(r["method"], r["adapter"], r["variant"]) for r in result["rows"]]
    assert rows == [("untouched", "-", "full"), ("fedot", "2+2", "adapemu"), ("fedot", "2+2", "adapfu"),
                    ("fedbiot", "2", "adapemu"), ("fedbiot", "2", "adapfu")]
    assert all(r["nll"] > 0 and r["accuracy"] is None for r in result["rows"])
    # the gradient fidelity each run logged, after pre-alignment and after its last round
    for r in result["rows"][1:]:
        assert -1 <= r["fidelity_pre"] <= 1 and -1 <= r["fidelity_last"] <= 1
    assert result["rows"][0]["fidelity_pre"] is None
    # The untouched row is computed by the benchmark itself and agrees with what each run measured.
    for name in (FEDOT, FEDBIOT):
        summary = json.loads((out / "runs" / name / "summary.json").read_text())
        assert summary["nll_base"] == pytest.approx(result["rows"][0]["nll"], rel=1e-4)
        assert summary["parties"] == 2 and summary["rounds"] == 1
    assert result["budget"]["rounds"] == 1 and result["budget"]["eval_items"] == 4
    table = (out / "accuracy.md").read_text()
    assert "| method | adapter | beta | lambda | eps | lr (chosen) | variant | NLL" in table and "FedOT" in table
    assert "gradient cosine (pre-aligned -> last round)" in table
    assert "Budget:" in table and "without the proximal term" in table
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    first = (out / "runs" / FEDBIOT / "summary.json").stat().st_mtime_ns
    capsys.readouterr()

    # The same command again: both runs are reused, nothing is retrained, the table is the same.
    assert main(bench_args(tiny_llama_dir, data_files, out)) == 0
    assert capsys.readouterr().err.count("finished run reused") == 2
    assert (out / "runs" / FEDBIOT / "summary.json").stat().st_mtime_ns == first
    again = json.loads((out / "accuracy.json").read_text())
    assert [r["nll"] for r in again["rows"]] == [r["nll"] for r in result["rows"]]

    # Other settings in the same directory would mix results: refused with one error line.
    assert main(bench_args(tiny_llama_dir, data_files, out, "--local-steps", "2")) == 2
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


def grid_args(*extra):
    return parse_args(["--out", "unused", "--methods", "untouched", "offsite", "fedot", "fedbiot", "fedavg-full",
                       "--drop-rates", "0", "0.5", "--adapter-sizes", "2", "--kl-weights", "0", "1",
                       "--prox-eps", "0", "0.01", "--lrs", "1e-3", "2e-3", "--seeds", "0", "1", *extra])


def test_grid_expansion_baselines_without_prox_and_the_oracle_row():
    args = grid_args()
    runs = [e for e in plan(args) if e.method != "untouched"]
    assert all(e.lr is None and e.seed is None for e in runs)  # settings are chosen later, per group
    by_method = {m: [e for e in runs if e.method == m] for m in ("offsite", "fedot", "fedbiot", "fedavg-full")}
    # FedBiOT at beta 0.5: 2 lambdas x 2 eps; the oracle: 2 eps, one lambda; the baselines: beta 0.5 only
    assert len(by_method["fedavg-full"]) == 1 and len(by_method["offsite"]) == len(by_method["fedot"]) == 1
    dropped = [e for e in by_method["fedbiot"] if e.drop_rate == 0.5]
    oracle = [e for e in by_method["fedbiot"] if e.drop_rate == 0.0]
    assert len(dropped) == 4 and len(oracle) == 2
    assert {(e.kl_weight, e.prox_eps) for e in dropped} == {(0, 0), (0, 0.01), (1, 0), (1, 0.01)}
    assert len({e.cell for e in runs}) == len(runs)  # one configuration each
    spec = TASKS["gsm8k"]
    data = argparse.Namespace(train="t", test="x", public="p", val="v")
    for method in ("offsite", "fedot", "fedavg-full"):
        for e in by_method[method]:
            assert e.prox_eps == 0.0 and run_config(e, args, spec, data).train.prox_eps == 0.0
    assert {run_config(e, args, spec, data).train.prox_eps for e in dropped} == {0.0, 0.01}
    for e in oracle:
        assert e.label == ORACLE_LABEL and e.variants == ("adapfu",)
        config = run_config(e, args, spec, data)
        assert config.drop_rate == 0.0 and config.align.pre_steps == 0 and config.align.round_steps == 0
    e = replace(dropped[0], lr=2e-3, seed=1)
    config = run_config(e, grid_args("--align-lr", "5e-4", "--dtype", "bfloat16"), spec, data)
    assert (config.align.lr, config.align.kl_weight, config.train.lr, config.seed) == (5e-4, e.kl_weight, 2e-3, 1)
    assert config.dtype == "bfloat16"


def test_groups_and_sizes_that_follow_a_tuned_size():
    args = grid_args("--adapter-sizes", "4", "2", "--tune-sizes", "4")
    groups, follows = groups_of(plan(args), args)
    assert set(groups) == {"offsite-s2-b0.5", "fedot-s2-b0.5", "fedbiot-s4-b0",
                           "fedbiot-s2-b0", "fedbiot-s4-b0.5", "fedbiot-s2-b0.5", "fedavg-full"}
    assert follows == {"fedbiot-s2-b0": "fedbiot-s4-b0", "fedbiot-s2-b0.5": "fedbiot-s4-b0.5"}
    assert len(groups["fedbiot-s4-b0.5"]) == 4 and len(groups["fedbiot-s4-b0"]) == 2
    # tuned at one drop rate, the other takes that setting per method; the oracle is tuned on its own
    args = grid_args("--drop-rates", "0", "0.2", "0.5", "--adapter-sizes", "4", "2", "--tune-sizes", "4",
                     "--tune-drop-rates", "0.2")
    _, follows = groups_of(plan(args), args)
    assert follows == {"offsite-s2-b0.5": "offsite-s2-b0.2", "fedot-s2-b0.5": "fedot-s2-b0.2",
                       "fedbiot-s2-b0": "fedbiot-s4-b0", "fedbiot-s2-b0.2": "fedbiot-s4-b0.2",
                       "fedbiot-s4-b0.5": "fedbiot-s4-b0.2", "fedbiot-s2-b0.5": "fedbiot-s4-b0.2"}
    with pytest.raises(SystemExit):
        grid_args("--tune-drop-rates", "0.3")


@pytest.mark.parametrize("search", ["coordinate", "grid"])
def test_tuning_searches_on_the_first_seed(search):
    args = grid_args("--lrs", "1e-3", "2e-3", "4e-3", "--seeds", "3", "4", "--search", search)
    groups, _ = groups_of(plan(args), args)
    members = groups["fedbiot-s2-b0.5"]  # (lambda, eps) in (0, 0), (0, 0.01), (1, 0), (1, 0.01)
    # a validation NLL that prefers lr 2e-3, and lambda 1 / eps 0 at any lr
    best = {(1.0, 0.0): -0.5}
    scored = []

    def score(e):
        scored.append(e)
        return abs(e.lr - 2e-3) * 100 + best.get((e.kl_weight, e.prox_eps), 0.0)
    chosen = tune(members, args, score)
    assert (chosen.kl_weight, chosen.prox_eps, chosen.lr, chosen.seed) == (1.0, 0.0, 2e-3, 3)
    assert {e.seed for e in scored} == {3}  # the other seeds only ever run the choice
    assert len({e.name for e in scored}) == (3 + 1 + 1 if search == "coordinate" else 12)
    # one configuration and one lr: nothing to choose, nothing validated
    assert tune(members[:1], grid_args("--lrs", "1e-3"), lambda e: pytest.fail("scored")).lr == 1e-3


def test_bad_grids_are_one_clear_error():
    with pytest.raises(SystemExit):
        grid_args("--val-items", "0")  # several lrs cannot be chosen without a validation split
    with pytest.raises(SystemExit):
        parse_args(["--out", "x", "--prox-eps", "-1"])


def test_mean_spread_and_wilson():
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    assert wilson_interval(0, 0) is None
    base = {"method": "fedbiot", "label": "FedBiOT", "adapter": "2", "adapter_size": 2, "drop_rate": 0.2,
            "kl_weight": 1.0, "prox_eps": 0.01, "lr": 1e-3, "variant": "adapfu"}
    rows = [{**base, "seed": 0, "nll": 1.0, "accuracy": 0.5, "n_correct": 5, "n_acc": 10},
            {**base, "seed": 1, "nll": 2.0, "accuracy": 0.3, "n_correct": 3, "n_acc": 10},
            {**base, "variant": "adapemu", "seed": 0, "nll": 3.0, "accuracy": None, "n_correct": None,
             "n_acc": None}]
    fu, emu = aggregate(rows)
    assert fu["nll"] == 1.5 and fu["nll_std"] == pytest.approx(0.7071, abs=1e-4) and fu["n"] == 2
    assert fu["accuracy"] == pytest.approx(0.4) and (fu["n_correct"], fu["n_acc"]) == (8, 20)
    assert fu["ci95"] == pytest.approx(wilson_interval(8, 20)) and fu["seeds"] == [0, 1]
    assert emu["n"] == 1 and emu["nll_std"] == 0.0 and emu["accuracy"] is None and emu["ci95"] is None


def test_lr_is_chosen_on_validation_items_and_seeds_are_pooled(tiny_llama_dir, data_files, tmp_path):
    out = tmp_path / "grid"
    args = bench_args(tiny_llama_dir, data_files, out, "--lrs", "1e-4", "5e-2", "--seeds", "0", "1")
    args[args.index("--methods") + 1:args.index("--drop-rates")] = ["untouched", "fedbiot"]
    assert main(args) == 0
    result = json.loads((out / "accuracy.json").read_text())
    val = (out / "data" / "val.jsonl").read_text().splitlines()
    train = (out / "data" / "train.jsonl").read_text().splitlines()
    test = (data_files / "test.jsonl").read_text().splitlines()
    assert len(val) == 4 and len(train) == 12 and not set(val) & (set(train) | set(test))
    (selection,) = result["selection"]
    chosen = selection["lr"]
    tried = {t["lr"]: t["val_nll"] for t in result["tuning"]}
    assert sorted(tried) == [1e-4, 5e-2] and tried[chosen] == min(tried.values())
    assert {t["seed"] for t in result["tuning"]} == {0}  # tuned on the first seed only
    assert all(-1 <= t["fidelity_pre"] <= 1 for t in result["tuning"])
    fedbiot_rows = [r for r in result["rows"] if r["method"] == "fedbiot"]
    assert {r["lr"] for r in fedbiot_rows} == {chosen} and sorted({r["seed"] for r in fedbiot_rows}) == [0, 1]
    assert {r["seed"]: r["val_nll"] is not None for r in fedbiot_rows} == {0: True, 1: False}
    cell = next(c for c in result["cells"] if c["method"] == "fedbiot" and c["variant"] == "adapfu")
    assert cell["n"] == 2 and cell["nll_std"] >= 0 and cell["seeds"] == [0, 1]
    assert len(list((out / "evals").glob("*-val-nll.json"))) == 2  # 2 lrs on seed 0, cached
    cache = list((out / "prealigned").iterdir())
    assert len([p for p in cache if p.is_dir()]) == 2  # one pre-alignment per seed, shared by both lrs
    assert len([p for p in cache if p.name.startswith("base-nll-")]) == 1  # the untouched model scored once
    assert len(list((out / "runs").iterdir())) == 3  # seed 1 runs the chosen lr only
    # --finished-only reports what exists and trains nothing: a seed never run is left out
    assert main([*args, "--seeds", "0", "1", "2", "--finished-only"]) == 0
    assert len(list((out / "runs").iterdir())) == 3
    again = json.loads((out / "accuracy.json").read_text())
    cell = next(c for c in again["cells"] if c["method"] == "fedbiot" and c["variant"] == "adapfu")
    assert cell["seeds"] == [0, 1] and again["selection"] == result["selection"]
    assert "(n=2)" in (out / "accuracy.md").read_text()


def test_gsm8k_prompts_in_the_training_template(tiny_chat_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.gsm8k import evaluate_gsm8k

    model, tok = AutoModelForCausalLM.from_pretrained(tiny_chat_dir), AutoTokenizer.from_pretrained(tiny_chat_dir)
    data = [{"question": "What is 1 + 1?", "answer": "1 + 1 = 2\n#### 2"}]
    result = evaluate_gsm8k(model, tok, data, batch_size=1, max_new_tokens=3, progress=False, template="auto")
    assert result["n_shots"] == 0 and result["prompt"] == "training template (chat)" and result["n"] == 1
    raw = evaluate_gsm8k(model, tok, data, n_shots=1, batch_size=1, max_new_tokens=3, progress=False)
    assert raw["prompt"] == "1-shot text"
