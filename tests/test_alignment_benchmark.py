"""`python -m benchmarks.alignment` on a tiny model: one trajectory per (drop rate, layout, lr, lambda), measured at
every checkpoint, reused when rerun, and the bad grids it refuses."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks.alignment import choose, main, parse_args, task_items


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
    assert "never test items" in (out / "alignment.md").read_text() and "test" not in result["eval_data"]
    assert [(c["lr"], c["steps"], c["layouts"]) for c in result["choice"]] == [(1e-2, 3, ["fedbiot-2", "fedot-1"])]
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


def test_nll_items_are_held_out_training_records_disjoint_from_the_gradient_batches():
    args = parse_args(["--out", "x", "--eval-items", "20", "--task-skip", "100"])
    evaluation, pool = task_items(args)
    assert len(evaluation) == 20 and len(pool) == 256
    assert not {e.prompt for e in evaluation} & {e.prompt for e in pool}
    from tasks.datasets import load_examples

    skipped = {e.prompt for e in load_examples("gsm8k-train", limit=100)}
    assert not skipped & {e.prompt for e in evaluation + pool}
    assert not {e.prompt for e in load_examples("gsm8k-test")} & {e.prompt for e in evaluation + pool}
    # the same items every time (a seeded shuffle)
    assert [e.prompt for e in task_items(args)[0]] == [e.prompt for e in evaluation]


def test_the_choice_is_the_lowest_nll_averaged_over_layouts():
    def traj(layout, lr, nlls):
        return {"drop_rate": 0.2, "kl_weight": 1.0, "layout": layout, "lr": lr,
                "points": [{"steps": s, "zero_adapter_nll": v} for s, v in zip((0, 16, 32), nlls, strict=True)]}
    # lr 1e-3 at 32 steps is best on average (2.0 and 2.2) although lr 3e-3 at 16 is best for one layout
    trajectories = [traj("fedbiot-4", 1e-3, [9.0, 2.6, 2.0]), traj("fedot-2", 1e-3, [9.0, 2.6, 2.2]),
                    traj("fedbiot-4", 3e-3, [9.0, 1.9, 2.5]), traj("fedot-2", 3e-3, [9.0, 2.5, 2.5])]
    (choice,) = choose(trajectories)
    assert (choice["lr"], choice["steps"]) == (1e-3, 32) and choice["zero_adapter_nll"] == pytest.approx(2.1)
    # 0 steps (no alignment) is never the choice, and a tie goes to fewer steps
    (choice,) = choose([traj("fedbiot-4", 1e-3, [1.0, 2.0, 2.0])])
    assert choice["steps"] == 16
