"""`python -m benchmarks.accuracy` end to end on a tiny model (NLL only, one round): outputs, the untouched
row, reuse of finished runs, refusal to mix settings, and the seeded hold-out."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import pytest

from benchmarks.accuracy import (
    ORACLE_LABEL,
    TASKS,
    aggregate,
    extended_lrs,
    groups_of,
    lr_edge,
    main,
    paired_tests,
    parse_args,
    plan,
    prepare_data,
    run_config,
    run_record,
    tune,
    wilson_interval,
)
from benchmarks.accuracy_report import NO_REALIGN_LABEL, arm_of
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
FEDOT, FEDBIOT = f"fedot-s2-b0.5-kl{KL}-eps0-lr{LR}-seed0", f"fedbiot-s2-b0.5-ra1-kl{KL}-eps{EPS}-lr{LR}-seed0"


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
    assert "| method | adapter | beta | re-align steps | lambda | eps | lr (chosen) | variant | NLL" in table
    assert "FedOT" in table and "| answer-line NLL |" in table and "gradient cosine, task" in table
    # the answer-line NLL beside the response NLL in every row, the task fidelity in every run with an emulator
    assert all(r["answer_nll"] > 0 and r["answer_nll"] != r["nll"] for r in result["rows"])
    assert all(-1 <= r["fidelity_task_pre"] <= 1 and -1 <= r["fidelity_task_last"] <= 1 for r in result["rows"][1:])
    assert [(r["method"], r["align_steps"]) for r in result["rows"][1::2]] == [("fedot", 0), ("fedbiot", 1)]
    # one record per run (and the untouched model), what a later --resume-from reads
    assert sorted(r["name"] for r in result["runs"]) == sorted([FEDBIOT, FEDOT, "untouched"])
    (test,) = [t for t in result["tests"] if t["metric"] == "nll"]
    assert (test["a"], test["b"], test["n"], test["p_t"]) == ("FedBiOT", "FedOT", 1, None)
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


def arm(entry) -> tuple:
    """The arm a paired test files the entry's finished run under (its row carries the record's fields)."""
    return arm_of(run_record(entry, "", {}, Path("no-run")))


def test_grid_expansion_baselines_without_prox_and_the_oracle_row():
    args = grid_args()
    runs = [e for e in plan(args) if e.method != "untouched"]
    assert all(e.lr is None and e.seed is None for e in runs)  # settings are chosen later, per group
    by_method = {m: [e for e in runs if e.method == m] for m in ("offsite", "fedot", "fedbiot", "fedavg-full")}
    # FedBiOT at beta 0.5: 2 lambdas x 2 eps; the oracle: 2 eps, one lambda; the baselines: beta 0.5 x 2 lambdas
    assert len(by_method["fedavg-full"]) == 1 and len(by_method["offsite"]) == len(by_method["fedot"]) == 2
    assert {e.kl_weight for e in by_method["fedot"]} == {0.0, 1.0}
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
                           "fedbiot-s2-b0", "fedbiot-s4-b0.5-ra4", "fedbiot-s2-b0.5-ra4", "fedavg-full"}
    assert follows == {"fedbiot-s2-b0": "fedbiot-s4-b0", "fedbiot-s2-b0.5-ra4": "fedbiot-s4-b0.5-ra4"}
    assert len(groups["fedbiot-s4-b0.5-ra4"]) == 4 and len(groups["fedbiot-s4-b0"]) == 2
    # tuned at one drop rate, the other takes that setting per method; the oracle is tuned on its own
    args = grid_args("--drop-rates", "0", "0.2", "0.5", "--adapter-sizes", "4", "2", "--tune-sizes", "4",
                     "--tune-drop-rates", "0.2", "--align-steps", "4", "0")
    _, follows = groups_of(plan(args), args)
    assert follows == {"offsite-s2-b0.5": "offsite-s2-b0.2", "fedot-s2-b0.5": "fedot-s2-b0.2",
                       "fedbiot-s2-b0": "fedbiot-s4-b0",
                       **{f"fedbiot-s2-b0.2-ra{n}": f"fedbiot-s4-b0.2-ra{n}" for n in (4, 0)},
                       **{f"fedbiot-s{s}-b0.5-ra{n}": f"fedbiot-s4-b0.2-ra{n}" for s in (4, 2) for n in (4, 0)}}
    with pytest.raises(SystemExit):
        grid_args("--tune-drop-rates", "0.3")


@pytest.mark.parametrize("search", ["coordinate", "grid"])
def test_tuning_searches_on_the_first_seed(search):
    args = grid_args("--lrs", "1e-3", "2e-3", "4e-3", "--seeds", "3", "4", "--search", search)
    groups, _ = groups_of(plan(args), args)
    members = groups["fedbiot-s2-b0.5-ra4"]  # (lambda, eps) in (0, 0), (0, 0.01), (1, 0), (1, 0.01)
    # a validation NLL that prefers lr 2e-3, and lambda 1 / eps 0 at any lr
    best = {(1.0, 0.0): -0.5}
    scored = []

    def score(e):
        scored.append(e)
        return abs(e.lr - 2e-3) * 100 + best.get((e.kl_weight, e.prox_eps), 0.0)
    chosen, count = tune(members, args, score)
    assert (chosen.kl_weight, chosen.prox_eps, chosen.lr, chosen.seed) == (1.0, 0.0, 2e-3, 3)
    assert {e.seed for e in scored} == {3}  # the other seeds only ever run the choice
    assert len({e.name for e in scored}) == count == (3 + 1 + 1 if search == "coordinate" else 12)
    # one configuration and one lr: nothing to choose, nothing validated
    assert tune(members[:1], grid_args("--lrs", "1e-3"), lambda e: pytest.fail("scored")) == (
        replace(members[0], lr=1e-3, seed=0), 1)


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
    args = bench_args(tiny_llama_dir, data_files, out, "--lrs", "1e-4", "5e-2", "--seeds", "0", "1",
                      "--extend-lrs", "1")
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
    # of two lrs one is at an edge: the grid grew by one beyond it (x500 either way), and the choice is made again
    assert len(tried) == 3 and {1e-4, 5e-2} < set(tried) and tried[chosen] == min(tried.values())
    assert selection["lrs"] == sorted(tried) and selection["candidates"] == 3
    assert {t["seed"] for t in result["tuning"]} == {0}  # tuned on the first seed only
    assert all(-1 <= t["fidelity_pre"] <= 1 for t in result["tuning"])
    fedbiot_rows = [r for r in result["rows"] if r["method"] == "fedbiot"]
    assert {r["lr"] for r in fedbiot_rows} == {chosen} and sorted({r["seed"] for r in fedbiot_rows}) == [0, 1]
    assert {r["seed"]: r["val_nll"] is not None for r in fedbiot_rows} == {0: True, 1: False}
    cell = next(c for c in result["cells"] if c["method"] == "fedbiot" and c["variant"] == "adapfu")
    assert cell["n"] == 2 and cell["nll_std"] >= 0 and cell["seeds"] == [0, 1]
    assert len(list((out / "evals").glob("*-val-nll.json"))) == 3  # 3 lrs on seed 0, cached
    cache = list((out / "prealigned").iterdir())
    assert len([p for p in cache if p.is_dir()]) == 2  # one pre-alignment per seed, shared by every lr
    assert len([p for p in cache if p.name.startswith("base-nll-")]) == 1  # the untouched model scored once
    assert len(list((out / "runs").iterdir())) == 4  # seed 1 runs the chosen lr only
    # --finished-only reports what exists and trains nothing: a seed never run is left out
    assert main([*args, "--seeds", "0", "1", "2", "--finished-only"]) == 0
    assert len(list((out / "runs").iterdir())) == 4
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


def test_every_method_with_an_emulator_gets_the_same_number_of_candidates():
    args = parse_args(["--out", "x", "--methods", "offsite", "fedot", "fedbiot", "--drop-rates", "0", "0.2",
                       "--adapter-sizes", "4", "--kl-weights", "0", "1", "--lrs", "2e-3", "1e-3", "4e-3",
                       "--align-steps", "4", "0"])
    assert args.lrs == [1e-3, 2e-3, 4e-3]
    groups, _ = groups_of(plan(args), args)
    counts = {}
    for name, members in groups.items():
        scored = set()

        def score(e, scored=scored):
            scored.add(e.name)
            return abs(e.lr - 2e-3) + e.kl_weight
        _, counts[name] = tune(members, args, score)
        assert counts[name] == len(scored)
    # every lr at the first lambda, then the other lambda at the best lr; the oracle has no lambda to tune
    assert counts == {"offsite-s2-b0.2": 4, "fedot-s2-b0.2": 4, "fedbiot-s4-b0.2-ra4": 4, "fedbiot-s4-b0.2-ra0": 4,
                      "fedbiot-s4-b0": 3}


def test_fedbiot_without_re_alignment_is_its_own_row_with_no_per_round_steps():
    args = grid_args("--drop-rates", "0", "0.2", "--align-steps", "4", "0", "--align-pre-steps", "32")
    spec, data = TASKS["gsm8k"], argparse.Namespace(train="t", test="x", public="p", val="v")
    fedbiot = {e.align_steps: replace(e, lr=1e-3, seed=0) for e in plan(args)
               if e.method == "fedbiot" and e.drop_rate == 0.2 and (e.kl_weight, e.prox_eps) == (1.0, 0.01)}
    assert fedbiot[0].label == NO_REALIGN_LABEL and fedbiot[4].label == "FedBiOT"
    assert fedbiot[0].group != fedbiot[4].group and arm(fedbiot[0]) == ("fedbiot", 0, 0, 2, None)
    configs = {steps: run_config(e, args, spec, data) for steps, e in fedbiot.items()}
    assert configs[0].realigns_each_round and configs[0].align.round_steps == 0 and configs[4].align.round_steps == 4
    assert configs[0].align.pre_steps == configs[4].align.pre_steps == 32
    # nothing else differs: the same pre-alignment, data, seed and budget
    a, b = configs[0].to_dict(), configs[4].to_dict()
    a["align"].pop("round_steps"), b["align"].pop("round_steps")
    assert a == b
    # the baselines and the oracle never re-align, whatever --align-steps says
    for e in plan(args):
        if e.method != "untouched" and not (e.method == "fedbiot" and e.drop_rate):
            config = run_config(replace(e, lr=1e-3, seed=0), args, spec, data)
            assert e.realign_steps == 0 and config.align.round_steps == 0


def test_the_layout_ablation_takes_fedbiots_setting_and_changes_only_the_layout():
    args = grid_args("--drop-rates", "0", "0.2", "0.5", "--tune-drop-rates", "0.2", "--bottom-adapters", "0", "2")
    spec, data = TASKS["gsm8k"], argparse.Namespace(train="t", test="x", public="p", val="v")
    entries = [e for e in plan(args) if e.method == "fedbiot"]
    assert all(e.bottom == 0 for e in entries if e.oracle)  # drop rate 0 has no emulator below to move
    groups, follows = groups_of(entries, args)
    assert follows["fedbiot-s2-b0.2-ra4-a2"] == "fedbiot-s2-b0.2-ra4"  # not tuned itself: FedBiOT's choice
    assert follows["fedbiot-s2-b0.5-ra4-a2"] == "fedbiot-s2-b0.2-ra4"
    assert "fedbiot-s2-b0.2-ra4" not in follows
    plain, moved = (replace(next(e for e in groups[g] if (e.kl_weight, e.prox_eps) == (1.0, 0.01)), lr=1e-3, seed=0)
                    for g in ("fedbiot-s2-b0.2-ra4", "fedbiot-s2-b0.2-ra4-a2"))
    assert plain.name == "fedbiot-s2-b0.2-ra4-kl1-eps0.01-lr0.001-seed0"  # FedBiOT's own runs keep their names
    assert moved.label == "FedBiOT, first 2 + last s layers" and moved.adapter_label == "2+2"
    assert arm(moved) == ("fedbiot", 4, 2, 2, None) and arm(plain) == ("fedbiot", 4, 0, 2, None)
    a, b = run_config(plain, args, spec, data), run_config(moved, args, spec, data)
    assert a.adapter_layout(30) == (0, 2) and b.adapter_layout(30) == (2, 2) and b.realigns_each_round
    a, b = a.to_dict(), b.to_dict()
    assert b.pop("bottom_adapter") == 2 and a.pop("bottom_adapter") is None and a == b  # nothing else differs
    with pytest.raises(SystemExit):
        grid_args("--bottom-adapters", "-1")


def test_paired_tests_pair_the_layout_ablation_by_seed():
    def row(method, seed, nll, steps=4, bottom=0, size=4, eps=None):
        adapter = f"{bottom}+{size}" if bottom or method != "fedbiot" else str(size)
        return {"variant": "adapfu", "drop_rate": 0.2, "method": method, "align_steps": steps, "adapter": adapter,
                "adapter_size": size, "bottom_adapter": bottom, "prox_ablation": eps, "seed": seed, "nll": nll,
                "answer_nll": nll / 2}
    rows = [row("fedbiot", s, 1.0 + 0.01 * s) for s in range(3)] + \
        [row("fedbiot", s, 0.9 + 0.02 * s, bottom=2) for s in range(3)] + \
        [row("fedbiot", s, 0.97, bottom=2, size=2) for s in range(3)] + \
        [row("fedbiot", s, 1.2, size=2) for s in range(3)] + \
        [row("fedbiot", s, 1.1, eps=0.0) for s in range(3)] + \
        [row("fedot", s, 0.95, steps=0, bottom=2, size=2) for s in (0, 1)]
    tests = {(t["a"], t["adapter_a"], t["b"], t["adapter_b"], t["metric"]): t for t in paired_tests(rows, 4, 0, 4)}
    moved, bare = "FedBiOT, first 2 + last s layers", "FedBiOT without the proximal term"
    # FedBiOT itself (last 4) against every other arm; the ablation with FedOT's very adapter against FedOT too;
    # FedBiOT without the proximal term against every arm but FedBiOT (compared once, as FedBiOT against it)
    assert {k[:4] for k in tests} == {("FedBiOT", "4", moved, "2+4"), ("FedBiOT", "4", moved, "2+2"),
                                      ("FedBiOT", "4", "FedBiOT", "2"), ("FedBiOT", "4", bare, "4"),
                                      ("FedBiOT", "4", "FedOT", "2+2"), (moved, "2+2", "FedOT", "2+2"),
                                      ("FedBiOT", "2", moved, "2+2"),  # the layouts compared at s=2 as well
                                      (bare, "4", moved, "2+4"), (bare, "4", moved, "2+2"), (bare, "4", "FedBiOT", "2"),
                                      (bare, "4", "FedOT", "2+2")}
    assert tests[bare, "4", moved, "2+2", "nll"]["mean_difference"] == pytest.approx(1.1 - 0.97)
    assert tests[bare, "4", "FedOT", "2+2", "nll"]["seeds"] == [0, 1]
    t = tests["FedBiOT", "4", moved, "2+4", "nll"]
    assert t["n"] == 3 and t["bottom_adapter_b"] == 2 and t["bottom_adapter_a"] == 0 and t["adapter_size_b"] == 4
    assert t["mean_difference"] == pytest.approx(sum(0.1 - 0.01 * s for s in range(3)) / 3)
    assert tests["FedBiOT", "4", "FedOT", "2+2", "nll"]["seeds"] == [0, 1]
    # sizes are arms of their own (one size's seeds never stand in for another's)
    assert tests["FedBiOT", "4", "FedBiOT", "2", "nll"]["mean_difference"] == pytest.approx(0.01 - 0.2)
    assert tests[moved, "2+2", "FedOT", "2+2", "nll"]["mean_difference"] == pytest.approx(0.02)
    assert tests["FedBiOT", "2", moved, "2+2", "nll"]["mean_difference"] == pytest.approx(1.2 - 0.97)
    assert tests["FedBiOT", "4", bare, "4", "answer_nll"]["prox_ablation_b"] == 0.0
    # without a reference size every FedBiOT size is FedBiOT itself
    assert {(t["adapter_a"], t["adapter_b"]) for t in paired_tests(rows, 4) if t["b"] == "FedOT"} == {
        ("4", "2+2"), ("2", "2+2"), ("2+2", "2+2")}


def test_the_proximal_ablation_takes_fedbiots_setting_and_changes_only_eps():
    args = grid_args("--drop-rates", "0", "0.2", "--prox-eps", "0.01", "--prox-ablation", "0")
    spec, data = TASKS["gsm8k"], argparse.Namespace(train="t", test="x", public="p", val="v")
    entries = [e for e in plan(args) if e.method == "fedbiot"]
    assert not any(e.eps_ablation for e in entries if e.oracle)
    groups, follows = groups_of(entries, args)
    assert follows["fedbiot-s2-b0.2-ra4-eps0"] == "fedbiot-s2-b0.2-ra4"  # not tuned itself
    plain, bare = (replace(next(e for e in groups[g] if e.kl_weight == 1.0), lr=1e-3, seed=0)
                   for g in ("fedbiot-s2-b0.2-ra4", "fedbiot-s2-b0.2-ra4-eps0"))
    assert bare.name == "fedbiot-s2-b0.2-ra4-eps0-kl1-lr0.001-seed0" and bare.label.endswith("the proximal term")
    assert arm(bare) == ("fedbiot", 4, 0, 2, 0.0) and arm(plain) == ("fedbiot", 4, 0, 2, None)
    assert plain.prox_eps == 0.01
    a, b = run_config(plain, args, spec, data).to_dict(), run_config(bare, args, spec, data).to_dict()
    assert a["train"].pop("prox_eps") == 0.01 and b["train"].pop("prox_eps") == 0.0 and a == b  # nothing else
    for bad in (("--prox-ablation", "-1"), ("--prox-eps", "0", "0.01", "--prox-ablation", "0")):
        with pytest.raises(SystemExit):
            grid_args(*bad)


def test_the_lr_grid_grows_beyond_the_edge_a_group_chose():
    assert lr_edge(2e-3, [1e-3, 2e-3]) == "top" and lr_edge(1e-3, [1e-3, 2e-3, 4e-3]) == "bottom"
    assert lr_edge(2e-3, [1e-3, 2e-3, 4e-3]) is None and lr_edge(1e-3, [1e-3]) is None
    assert extended_lrs([1e-3, 2e-3, 4e-3], ["top", None]) == [1e-3, 2e-3, 4e-3, 8e-3]
    assert extended_lrs([1e-3, 2e-3], [None, "bottom", "top"]) == [5e-4, 1e-3, 2e-3, 4e-3]


def test_a_seed_gives_every_method_the_same_items_in_the_same_order(data_files):
    from owner.config import RunConfig
    from owner.simulate import party_splits

    def splits(method, seed):
        return party_splits(RunConfig(method=method, parties=3, seed=seed, party_data=str(data_files / "train.jsonl")))
    for seed in (0, 1):
        fedot, fedbiot, offsite = (splits(m, seed) for m in ("fedot", "fedbiot", "offsite"))
        assert fedot == fedbiot and len(fedot) == 3  # the same parties, hence the same batches (seeded per party)
        assert offsite == [[e for part in fedot for e in part]]  # one party: the same items in the same order
    assert splits("fedot", 0) != splits("fedot", 1)


def test_resume_from_a_report_skips_its_finished_runs(tiny_llama_dir, data_files, tmp_path, capsys):
    first, second = tmp_path / "first", tmp_path / "second"
    same = ("--align-steps", "1", "0", "--seeds", "0", "1", "--rounds", "2")
    assert main(bench_args(tiny_llama_dir, data_files, first, *same)) == 0
    result = json.loads((first / "accuracy.json").read_text())
    # the ablation: FedBiOT without re-alignment aligns before round 1 only
    for steps in (1, 0):
        (name,) = [r["run"] for r in result["rows"] if r["method"] == "fedbiot" and r["align_steps"] == steps][:1]
        events = [json.loads(line) for line in (first / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        per_round = [e for e in events if e["event"] == "align_step" and e["stage"] >= 0]
        rounds = [e["alignment"]["steps"] for e in events if e["event"] == "round"]
        assert bool(per_round) == bool(steps) and rounds == [steps, steps]
        assert next(e for e in events if e["event"] == "pre_alignment")["steps"] == 1
    # the paired tests: per-seed differences of the rows, FedBiOT against each other method
    fu = {(r["method"], r["align_steps"], r["seed"]): r for r in result["rows"] if r["variant"] == "adapfu"}
    tests = {(t["b"], t["metric"]): t for t in result["tests"]}
    assert set(tests) == {(b, m) for b in ("FedOT", NO_REALIGN_LABEL) for m in ("nll", "answer_nll")}
    for (other, steps), label in ((("fedot", 0), "FedOT"), (("fedbiot", 0), NO_REALIGN_LABEL)):
        diffs = [fu["fedbiot", 1, seed]["nll"] - fu[other, steps, seed]["nll"] for seed in (0, 1)]
        t = tests[label, "nll"]
        assert t["n"] == 2 and t["seeds"] == [0, 1] and t["mean_difference"] == pytest.approx(sum(diffs) / 2)
        assert 0 < t["p_t"] <= 1 and t["p_wilcoxon"] == pytest.approx(1.0 if diffs[0] * diffs[1] < 0 else 0.5)
    assert len(result["runs"]) == 7  # 3 methods x 2 seeds, and the untouched model
    assert "Paired tests over seeds" in (first / "accuracy.md").read_text()
    capsys.readouterr()

    # a fresh directory resuming from the report trains nothing and loads no model: the same rows and tests
    report = tmp_path / "report" / "grid"
    assert main([*bench_args(tiny_llama_dir, data_files, second, *same),
                 "--resume-from", str(first / "accuracy.json"), "--report", str(report)]) == 0
    err = capsys.readouterr().err
    assert "training" not in err and "untouched model: NLL" not in err
    assert not (second / "runs").exists() and (report.with_suffix(".md")).is_file()
    again = json.loads(report.with_suffix(".json").read_text())
    assert again["rows"] == result["rows"] and again["tests"] == result["tests"] and again["runs"] == result["runs"]
    # other settings are other runs: not taken from the report; and with no candidate finished there is no choice,
    # so no edge of the lr grid to grow past
    assert main([*bench_args(tiny_llama_dir, data_files, second, *same, "--local-steps", "2"), "--finished-only",
                 "--resume-from", str(first / "accuracy.json"), "--lrs", "1e-3", "2e-3", "--extend-lrs", "1"]) == 0
    assert capsys.readouterr().err.count("not finished, left out") == 3 * 2 + 3  # 2 lrs at seed 0, seed 1: each once
    partial = json.loads((second / "accuracy.json").read_text())
    assert all(s["lrs"] == [1e-3, 2e-3] and s["lr_edge"] is None for s in partial["selection"])
    assert {s["finished"] for s in partial["selection"]} == {0} and partial["rows"][0]["method"] == "untouched"
