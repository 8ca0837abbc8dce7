"""`python -m benchmarks.alignment` on a tiny model: one trajectory per (drop rate, layout, lr, lambda), measured at
every checkpoint, reused when rerun, and the bad grids it refuses."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks.alignment import main, parse_args


def sweep_args(model_dir, out, *extra):
    return ["--out", str(out), "--model", str(model_dir), "--drop-rates", "0.5", "--layouts", "fedbiot-2",
            "fedot-1", "--lrs", "1e-2", "--kl-weights", "0", "--checkpoints", "0", "3", "--eval-items", "4",
            "--public-limit", "16", "--grad-batches", "1", "--max-length", "256", *extra]


def test_sweep_measures_every_checkpoint_and_reuses_trajectories(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "align"
    assert main(sweep_args(tiny_llama_dir, out)) == 0
    result = json.loads((out / "alignment.json").read_text())
    assert [t["layout"] for t in result["trajectories"]] == ["fedbiot-2", "fedot-1"]
    for t in result["trajectories"]:
        assert [p["steps"] for p in t["points"]] == [0, 3] and t["full_nll"] > 0
        first, last = t["points"]
        assert first["align_seconds"] == 0 and last["align_seconds"] > 0
        assert all(math.isfinite(p["zero_adapter_nll"]) and -1 <= p["cosine_task"] <= 1 for p in t["points"])
        # aligning changes the emulator, so what the adapter starts from changes
        assert last["zero_adapter_nll"] != first["zero_adapter_nll"]
    assert "| 0.5 | fedbiot-2 | 0.01 | 0 | 3 |" in (out / "alignment.md").read_text()
    assert (out / "alignment.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    assert main(sweep_args(tiny_llama_dir, out)) == 0
    assert capsys.readouterr().err.count(": reused") == 2
    assert json.loads((out / "alignment.json").read_text())["trajectories"] == result["trajectories"]
    # a later command adds a trajectory; the report holds every finished one
    more = sweep_args(tiny_llama_dir, out)
    more[more.index("--layouts") + 1:more.index("--lrs")] = ["fedbiot-1"]
    assert main(more) == 0
    layouts = [t["layout"] for t in json.loads((out / "alignment.json").read_text())["trajectories"]]
    assert sorted(layouts) == ["fedbiot-1", "fedbiot-2", "fedot-1"]


@pytest.mark.parametrize("bad", [["--layouts", "fedavg-2"], ["--layouts", "fedbiot"], ["--checkpoints", "8", "4"],
                                 ["--lrs", "0"], ["--kl-weights", "-1"]])
def test_bad_sweeps_are_refused(bad):
    with pytest.raises(SystemExit):
        parse_args(["--out", "x", *bad])
