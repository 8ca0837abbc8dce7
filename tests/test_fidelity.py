"""Gradient fidelity (owner/fidelity.py): cosine and norm ratio of the adapter-LoRA gradient through the emulator
vs the full model, measured without touching the run."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from owner.cli import main
from owner.plot import plot_run
from owner.records import describe_fidelity, round_lines
from tests.test_simulate import args_for, data_files  # noqa: F401 - the data fixture


def fidelity_events(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["event"] == "fidelity"], rows


def test_cosine_is_one_when_the_emulator_is_the_full_model(tiny_llama_dir, data_files, tmp_path):  # noqa: F811
    # drop rate 0 keeps every lower layer; no alignment steps keep the emulator LoRA at zero (B = 0): with
    # steps, AdamW turns the rounding noise of a zero loss into lr-sized steps and the emulator drifts a little
    out = tmp_path / "oracle"
    assert main(args_for(tiny_llama_dir, data_files, out, "--drop-rate", "0", "--align-pre-steps", "0",
                         "--align-steps", "0")) == 0
    events, _ = fidelity_events(out)
    assert [e["stage"] for e in events] == [-1, 0, 1]
    for e in events:
        assert e["cosine"] == pytest.approx(1.0, abs=1e-5)
        assert e["norm_ratio"] == pytest.approx(1.0, abs=1e-4)
        assert e["batches"] == 2


def test_dropped_emulator_is_measured_below_one_and_changes_nothing(tiny_llama_dir, data_files, tmp_path):  # noqa: F811
    on, off = tmp_path / "on", tmp_path / "off"
    quick = ("--drop-rate", "0.5", "--rounds", "1")
    assert main(args_for(tiny_llama_dir, data_files, on, *quick, "--fidelity-batches", "3")) == 0
    assert main(args_for(tiny_llama_dir, data_files, off, *quick, "--fidelity-batches", "0")) == 0
    events, rows = fidelity_events(on)
    assert [e["stage"] for e in events] == [-1, 0] and all(e["batches"] == 3 for e in events)
    assert all(e["cosine"] < 0.999 and e["norm_ratio"] > 0 for e in events)
    rounds = [r for r in rows if r["event"] == "round"]
    assert all("fidelity" in r for r in rounds)
    assert "fidelity" in next(r for r in rows if r["event"] == "pre_alignment")
    assert fidelity_events(off)[0] == []
    # bit-identical adapters and emulator: measuring leaks into nothing
    for rel in ("adapfu/adapter_model.safetensors", "adapemu/adapter_model.safetensors"):
        a, b = load_file(str(on / rel)), load_file(str(off / rel))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), rel
    assert plot_run(on, tmp_path / "m.png").stat().st_size > 0


def test_task_fidelity_after_pre_alignment_and_the_last_round_changes_nothing(tiny_llama_dir, data_files,  # noqa: F811
                                                                               tmp_path):
    """--task-fidelity-data: the same measurement on held-out task batches, at the two stages a report reads."""
    task, plain = tmp_path / "task", tmp_path / "plain"
    quick = ("--drop-rate", "0.5", "--rounds", "3", "--align-pre-steps", "1")
    assert main(args_for(tiny_llama_dir, data_files, task, *quick, "--task-fidelity-data",
                         str(data_files / "eval.jsonl"), "--task-fidelity-batches", "1")) == 0
    assert main(args_for(tiny_llama_dir, data_files, plain, *quick)) == 0
    rows = [json.loads(line) for line in (task / "metrics.jsonl").read_text().splitlines()]
    measured = [r for r in rows if r["event"] == "task_fidelity"]
    assert [r["stage"] for r in measured] == [-1, 2] and all(r["batches"] == 1 for r in measured)
    assert all(-1 <= r["cosine"] <= 1 and r["norm_ratio"] > 0 for r in measured)
    public = {r["stage"]: r["cosine"] for r in rows if r["event"] == "fidelity"}
    assert measured[0]["cosine"] != public[-1]  # other batches than the public ones
    assert not [r for r in (json.loads(line) for line in (plain / "metrics.jsonl").read_text().splitlines())
                if r["event"] == "task_fidelity"]
    for rel in ("adapfu/adapter_model.safetensors", "adapemu/adapter_model.safetensors"):
        a, b = load_file(str(task / rel)), load_file(str(plain / rel))
        assert all(torch.equal(a[k], b[k]) for k in a), rel


def test_progress_line_shows_fidelity():
    record = {"participants": ["a"], "train_loss": 1.0, "mb_down": 1.0, "mb_up": 1.0, "seconds": 1.0,
              "fidelity": {"cosine": 0.5, "norm_ratio": 2.25, "batches": 2}}
    assert "gradient fidelity: cosine 0.500, norm ratio 2.25" in round_lines(1, 2, record)
    assert describe_fidelity({"cosine": None, "norm_ratio": None}).endswith("cosine n/a, norm ratio n/a")


def test_bad_setting_is_one_clear_error():
    from errors import ConfigError
    from owner.alignment import AlignSettings

    with pytest.raises(ConfigError, match="fidelity"):
        AlignSettings(fidelity_batches=-1)
