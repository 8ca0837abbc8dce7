"""The in-process run end to end on a tiny model: outputs, determinism, resume, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from owner.cli import main
from owner.plot import main as plot_main
from owner.state import latest_checkpoint_dir, load_checkpoint


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    words = "red blue green yellow black white".split()
    train = [{"instruction": f"Colour of item {i}?", "input": "", "output": f"Item {i} is {words[i % 6]}."}
             for i in range(24)]
    public = [{"instruction": f"Say hello {i} times.", "context": "", "response": "hello " * (i % 4 + 1),
               "category": "open_qa"} for i in range(16)]
    evaluation = [{"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"}
                  for i in range(6)]
    for name, rows in [("train.jsonl", train), ("public.jsonl", public), ("eval.jsonl", evaluation)]:
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def args_for(model_dir, data, out, *extra):
    return [
        "--simulate", "2", "--rounds", "2", "--out", str(out), "--model", str(model_dir),
        "--party-data", str(data / "train.jsonl"), "--public-data", str(data / "public.jsonl"),
        "--eval-data", str(data / "eval.jsonl"), "--eval-items", "6", "--max-length", "96",
        "--local-steps", "2", "--batch-size", "4", "--align-pre-steps", "2", "--align-steps", "1",
        "--lr", "1e-2", "--align-lr", "1e-3", "--kl-weight", "1", "--quiet", *extra,
    ]  # the alignment pinned: the tolerances below were measured at these settings, not at whatever the defaults are


def adapfu_tensors(out):
    return load_file(str(out / "adapfu" / "adapter_model.safetensors"))


def test_simulation_writes_every_output(tiny_llama_dir, data_files, tmp_path):
    out = tmp_path / "run"
    assert main(args_for(tiny_llama_dir, data_files, out)) == 0
    for rel in ["compressed/config.json", "compressed/fedbiot.json", "adapemu/adapter_config.json",
                "adapfu/adapter_config.json", "adapfu/adapter_model.safetensors", "config.json"]:
        assert (out / rel).is_file(), rel
    summary = json.loads((out / "summary.json").read_text())
    for key in ("nll_base", "nll_adapemu", "nll_adapfu", "answer_nll_base", "answer_nll_adapemu", "answer_nll_adapfu"):
        assert summary[key] > 0
    assert summary["answer_nll_adapfu"] != summary["nll_adapfu"]  # the answer line alone
    assert summary["answer_items"] == summary["eval_items"] == 6
    assert summary["rounds"] == 2
    events = [json.loads(line)["event"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert events.count("round") == 2 and "party_step" in events and "align_step" in events
    ckpt = load_checkpoint(latest_checkpoint_dir(out))
    assert ckpt.round == 2
    # AdapFu loads on the full model with plain transformers + peft and carries the final adapter LoRA.
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    model = PeftModel.from_pretrained(base, out / "adapfu")
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.isfinite(model(ids).logits).all()
    n_layers = 8
    loaded = {n: p for n, p in model.named_parameters() if "lora_" in n}
    adapter = {f"layers.{i}." for i in range(n_layers - 4, n_layers)}  # the default: the last 4 layers
    assert loaded and all(any(layer in n for layer in adapter) for n in loaded)
    assert sum(float(t.abs().sum()) for n, t in ckpt.adapter_state.items() if "lora_B" in n) > 0
    # The metrics plot: a PNG of the run; a directory with no run is one clear error.
    assert plot_main([str(out)]) == 0 and (out / "metrics.png").read_bytes()[:4] == b"\x89PNG"
    assert plot_main([str(tmp_path / "nothing")]) == 2


def test_same_seed_same_result_and_resume_continues(tiny_llama_dir, data_files, tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert main(args_for(tiny_llama_dir, data_files, a)) == 0
    assert main(args_for(tiny_llama_dir, data_files, b)) == 0
    ta, tb = adapfu_tensors(a), adapfu_tensors(b)
    assert all(torch.equal(ta[n], tb[n]) for n in ta)
    # One round, then --resume to two rounds: same adapter as two rounds straight.
    first = args_for(tiny_llama_dir, data_files, c)
    first[first.index("--rounds") + 1] = "1"
    assert main(first) == 0
    assert load_checkpoint(latest_checkpoint_dir(c)).round == 1
    assert main(args_for(tiny_llama_dir, data_files, c, "--resume")) == 0
    tc = adapfu_tensors(c)
    # To float tolerance, not bit for bit: the parties fold the frozen emulator LoRA into their weights, and
    # the straight run got there as base + d1 - d1 + d2, the resumed one as base + d2 (about 4e-6 apart here).
    assert all(torch.allclose(ta[n], tc[n], atol=2e-5) for n in ta)
    rounds = [json.loads(x) for x in (c / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds if r["event"] == "round"] == [1, 2]


@pytest.mark.parametrize("change, message", [
    ({"--party-data": "missing.jsonl"}, "missing.jsonl"),
    ({"--adapter-size": "8"}, "adapter"),
    ({"--drop-rate": "1.0"}, "drop"),
    ({"--party-limit": "1"}, "empty"),
    ({"--public-data": "bad.jsonl"}, "bad.jsonl"),
    ({"--drop-rate": "-0.1"}, "drop"),
    ({"--model": "no/such-model-dir"}, "no/such-model-dir"),
    # found only after the model is compressed into --out: what was written there is removed again
    ({"--dp-epsilon": "1e-9"}, "no noise multiplier reaches epsilon"),
])
def test_bad_input_gives_one_error_line_and_writes_nothing(tiny_llama_dir, data_files, tmp_path, capsys,
                                                           change, message):
    (data_files / "bad.jsonl").write_text(json.dumps({"instruction": "no output field"}) + "\n")
    out = tmp_path / "run"
    args = args_for(tiny_llama_dir, data_files, out)
    for flag, value in change.items():
        if flag in args:
            args[args.index(flag) + 1] = value if "/" in value or not value.endswith("jsonl") \
                else str(data_files / value)
        else:
            args += [flag, value]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and message in err[-1].lower(), err
    assert [line for line in err if line.startswith("error:")] == err[-1:]
    assert not out.exists()


def test_a_non_empty_out_is_refused_before_the_model_is_loaded(data_files, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    assert main(args_for(tmp_path / "no-such-model", data_files, out)) == 2  # the model would fail to load
    assert "is not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_secure_aggregation_gives_the_plain_result_within_fixed_point_error(tiny_llama_dir, data_files,
                                                                             tmp_path, capsys):
    plain, secure = tmp_path / "plain", tmp_path / "secure"
    assert main(args_for(tiny_llama_dir, data_files, plain, "--simulate", "3")) == 0
    assert main(args_for(tiny_llama_dir, data_files, secure, "--simulate", "3", "--secure-agg")) == 0
    tp, ts = adapfu_tensors(plain), adapfu_tensors(secure)
    assert tp.keys() == ts.keys()
    worst = max(float((tp[n] - ts[n]).abs().max()) for n in tp)
    assert worst < 1e-5, worst
    assert any(float(t.abs().max()) > 1e-3 for n, t in tp.items() if "lora_B" in n)
    rounds = [json.loads(x) for x in (secure / "metrics.jsonl").read_text().splitlines()]
    assert all("secagg" in r for r in rounds if r["event"] == "round")
    capsys.readouterr()
    assert main(args_for(tiny_llama_dir, data_files, tmp_path / "two", "--secure-agg")) == 2  # two parties
    assert "secure aggregation needs at least 3 parties" in capsys.readouterr().err


def test_sparse_secure_aggregation_gives_the_plain_result(tiny_llama_dir, data_files, tmp_path):
    """SecAgg+'s sparse graph (8 parties: 6 neighbours each instead of 7) sums to the same adapter."""
    plain, sparse = tmp_path / "plain", tmp_path / "sparse"
    for out, extra in ((plain, ()), (sparse, ("--secure-agg", "--secagg-graph", "sparse"))):
        args = args_for(tiny_llama_dir, data_files, out, "--rounds", "1", *extra)
        args[args.index("--simulate") + 1] = "8"
        assert main(args) == 0
    assert json.loads((sparse / "config.json").read_text())["secagg_graph"] == "sparse"
    tp, ts = adapfu_tensors(plain), adapfu_tensors(sparse)
    assert max(float((tp[n] - ts[n]).abs().max()) for n in tp) < 1e-5
    assert any(float(t.abs().max()) > 1e-3 for n, t in tp.items() if "lora_B" in n)


def test_a_bfloat16_run_ships_a_half_size_model_and_exports_float32_adapters(tiny_llama_dir, data_files, tmp_path):
    out = tmp_path / "bf16"
    assert main(args_for(tiny_llama_dir, data_files, out, "--dtype", "bfloat16", "--device", "cpu")) == 0
    shipped = load_file(str(out / "compressed" / "model.safetensors"))
    assert {t.dtype for t in shipped.values()} == {torch.bfloat16}  # the download is in the run's dtype
    assert all(t.dtype == torch.float32 for t in adapfu_tensors(out).values())
    summary = json.loads((out / "summary.json").read_text())
    assert all(summary[k] > 0 and summary[k] < 100 for k in ("nll_base", "nll_adapemu", "nll_adapfu"))
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse refuses a value outside its choices
        return int(exc.code)


@pytest.mark.parametrize("flags, message", [
    (["--dtype", "int3"], "--dtype"),
    (["--device", "tpu"], "--device"),
    (["--quantize", "int2"], "--quantize"),
    pytest.param(["--device", "cuda"], "no CUDA GPU", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="the machine has a GPU")),
])
def test_bad_hardware_flags_are_one_line_and_write_nothing(tiny_llama_dir, data_files, tmp_path, capsys, flags,
                                                           message):
    out = tmp_path / "never"
    assert exit_code(args_for(tiny_llama_dir, data_files, out, *flags)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and message in err[-1] and err[-1].startswith(("error:", "owner: error:")), err
    assert not out.exists()


def test_a_run_that_leaves_the_adapter_unchanged_is_no_success(tiny_llama_dir, data_files, tmp_path, capsys):
    # lr 5e-324 is 0 in float32: every round is aggregated, and every aggregate is the adapter it started from.
    out = tmp_path / "run"
    assert main(args_for(tiny_llama_dir, data_files, out, "--lr", "5e-324")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: the run ended untrained: the adapter is unchanged after 2 "
                                               "aggregated rounds"), err
    summary = json.loads((out / "summary.json").read_text())  # the outputs are written all the same
    assert summary["rounds"] == 2 and "unchanged" in summary["untrained"]
    trained = tmp_path / "trained"
    assert main(args_for(tiny_llama_dir, data_files, trained)) == 0
    assert "untrained" not in json.loads((trained / "summary.json").read_text())


def test_every_phase_shows_and_the_round_time_is_its_wall_time(tiny_llama_dir, data_files, tmp_path, capsys):
    """In plain mode the owner is never quiet for a phase (alignment from its start, the gradient fidelity, the
    held-out NLL) and the round line gives the round's wall time with its parts, as metrics.jsonl records it."""
    out = tmp_path / "run"
    argv = [a for a in args_for(tiny_llama_dir, data_files, out) if a != "--quiet"]
    assert main([*argv, "--progress", "plain"]) == 0
    lines = [line.split("] ", 1)[-1] for line in capsys.readouterr().err.splitlines()]
    for start in ("pre-alignment: step 0/2", "round 1 alignment: step 0/1", "gradient fidelity: batch 0/2",
                  "held-out NLL (base, AdapEmu, AdapFu): batch 0/3"):
        assert start in lines, start
    assert any(line.startswith("held-out NLL (base, AdapEmu, AdapFu): batch 3/3 |") for line in lines)
    assert "2 parties with [12, 12] examples; 2 rounds of 2 steps x batch 4" in lines
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["event"] == "round"]
    for record in rounds:
        parts = record["phase_seconds"]
        assert set(parts) == {"parties", "alignment", "fidelity"} and all(v > 0 for v in parts.values())
        assert sum(parts.values()) <= record["seconds"] < sum(parts.values()) + 5
        said = next(line for line in lines if line.startswith(f"round {record['round']}/2 done with 2 parties in "))
        assert said.startswith(f"round {record['round']}/2 done with 2 parties in {record['seconds']:.1f} s "
                               f"(training and aggregation {parts['parties']:.1f} s, alignment "
                               f"{parts['alignment']:.1f} s, fidelity {parts['fidelity']:.1f} s): train loss ")
