"""--prealign-cache: a second run with the same model, layout, public data and settings loads the pre-aligned
emulator instead of pre-aligning, and ends bit-identical to a run without the cache."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from errors import ConfigError
from owner.cli import main
from owner.prealign_cache import load_prealigned
from tests.test_simulate import args_for, data_files  # noqa: F401 - the data fixture


def events(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def same_adapters(a, b):
    for rel in ("adapfu/adapter_model.safetensors", "adapemu/adapter_model.safetensors"):
        x, y = load_file(str(a / rel)), load_file(str(b / rel))
        if x.keys() != y.keys() or not all(torch.equal(x[k], y[k]) for k in x):
            return False
    return True


def test_second_run_skips_pre_alignment_and_is_bit_identical(tiny_llama_dir, data_files, tmp_path):  # noqa: F811
    cache = tmp_path / "cache"
    plain, first, second = tmp_path / "plain", tmp_path / "first", tmp_path / "second"
    flags = ("--rounds", "1", "--align-pre-steps", "3")
    assert main(args_for(tiny_llama_dir, data_files, plain, *flags)) == 0
    assert main(args_for(tiny_llama_dir, data_files, first, *flags, "--prealign-cache", str(cache))) == 0
    assert main(args_for(tiny_llama_dir, data_files, second, *flags, "--prealign-cache", str(cache))) == 0
    pre1 = next(e for e in events(first) if e["event"] == "pre_alignment")
    pre2 = next(e for e in events(second) if e["event"] == "pre_alignment")
    assert pre1["cache"] == "stored" and pre2["cache"] == "loaded" and pre1["cache_key"] == pre2["cache_key"]
    assert pre2["loss_last"] == pre1["loss_last"] and pre2["steps"] == 3
    assert not [e for e in events(second) if e["event"] == "align_step" and e["stage"] == -1]
    assert len([e for e in events(first) if e["event"] == "align_step" and e["stage"] == -1]) == 3
    assert same_adapters(plain, first) and same_adapters(plain, second)
    # the fidelity after pre-alignment is measured on the loaded emulator too, and agrees
    fid = [[e for e in events(out) if e["event"] == "fidelity" and e["stage"] == -1][0] for out in (first, second)]
    assert fid[0]["cosine"] == fid[1]["cosine"]

    # other alignment settings: another key, pre-aligned afresh
    third = tmp_path / "third"
    assert main(args_for(tiny_llama_dir, data_files, third, *flags, "--kl-weight", "0",
                         "--prealign-cache", str(cache))) == 0
    pre3 = next(e for e in events(third) if e["event"] == "pre_alignment")
    assert pre3["cache"] == "stored" and pre3["cache_key"] != pre1["cache_key"]
    assert len([p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")]) == 2

    # the untouched model is scored once for all three runs: one entry, and the runs report its number
    (base,) = cache.glob("base-nll-*.json")
    summaries = [json.loads((out / "summary.json").read_text()) for out in (plain, first, second, third)]
    assert {s["nll_base"] for s in summaries} == {json.loads(base.read_text())["nll"]}
    assert {s["answer_nll_base"] for s in summaries} == {json.loads(base.read_text())["answer_nll"]}
    base.write_text(json.dumps({"nll": 123.0, "answer_nll": 45.0}))  # read back, not recomputed
    fourth = tmp_path / "fourth"
    assert main(args_for(tiny_llama_dir, data_files, fourth, *flags, "--prealign-cache", str(cache))) == 0
    summary = json.loads((fourth / "summary.json").read_text())
    assert (summary["nll_base"], summary["answer_nll_base"]) == (123.0, 45.0)
    base.write_text(json.dumps({"nll": 123.0}))  # an entry from before the answer-line NLL: computed again
    fifth = tmp_path / "fifth"
    assert main(args_for(tiny_llama_dir, data_files, fifth, *flags, "--prealign-cache", str(cache))) == 0
    assert json.loads((fifth / "summary.json").read_text())["nll_base"] == summaries[0]["nll_base"]


def test_a_damaged_entry_is_one_clear_error(tmp_path):
    entry = tmp_path / "abc"
    entry.mkdir()
    (entry / "info.json").write_text("{not json")
    with pytest.raises(ConfigError, match="unreadable"):
        load_prealigned(tmp_path, "abc")
    assert load_prealigned(tmp_path, "missing") is None
