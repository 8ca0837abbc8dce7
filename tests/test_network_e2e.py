"""End to end on the embedded model: `owner --listen` and three `party --connect` processes on 127.0.0.1
train SmolLM2-135M-Instruct for two rounds (secure aggregation on, the networked default), then AdapFu
loads on the full model with plain transformers + peft and generates."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoTokenizer

from owner.models import load_model
from protocol.keys import generate_keypair
from secure_agg.identity import ConsortiumRoster, generate_identity
from tasks.datasets import load_examples
from tasks.splits import split_iid
from tests.test_network import ENV, ROOT, events, free_port

pytestmark = pytest.mark.e2e

PARTIES = ("party-1", "party-2", "party-3")
WAIT_S = 420  # the whole run, bounded (downloading and loading the real model on a shared 2-core machine)


def test_three_parties_train_the_embedded_model_over_the_network(tmp_path: Path):
    keys = {name: generate_keypair(tmp_path / "keys" / name, name) for name in ("owner", *PARTIES)}
    for name in PARTIES:
        generate_identity(tmp_path / "keys" / name, name)
    roster = tmp_path / "roster.json"  # the consortium's roster, which every party pins; the owner allows it
    ConsortiumRoster.from_public_files([tmp_path / "keys" / name for name in PARTIES]).save(roster)
    parts = split_iid(load_examples("gsm8k-train", limit=24), len(PARTIES), 0)
    endpoint, out = f"tcp://127.0.0.1:{free_port()}", tmp_path / "out"

    logs, procs = {}, {}
    try:
        for name, args in [("owner", [
            "-m", "owner.cli", "--listen", endpoint, "--parties", "3", "--rounds", "2", "--out", str(out),
            "--key", str(keys["owner"][1]), "--allow", str(roster), "--local-steps", "2", "--batch-size", "2",
            "--align-pre-steps", "2", "--align-steps", "1", "--max-length", "128", "--eval-items", "4",
            "--public-limit", "16", "--join-timeout", "300", "--round-timeout", "300"])] + [
            (name, ["-m", "party.cli", "--connect", endpoint, "--data", str(data_file(tmp_path, name, part)),
                    "--key", str(keys[name][1]), "--owner-key", str(keys["owner"][0]), "--roster", str(roster),
                    "--work", str(tmp_path / f"work-{name}"), "--timeout", str(WAIT_S)])
                for name, part in zip(PARTIES, parts, strict=True)]:
            logs[name] = tmp_path / f"{name}.log"
            with logs[name].open("wb") as fh:
                procs[name] = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=ENV, stdout=fh,
                                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        codes = {name: procs[name].wait(WAIT_S) for name in ("owner", *PARTIES)}
    except subprocess.TimeoutExpired:
        pytest.fail("the run did not finish in time:\n" + "\n".join(
            f"--- {n}\n{p.read_text()[-2000:]}" for n, p in logs.items()))
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    text = {name: path.read_text() for name, path in logs.items()}
    assert codes == {name: 0 for name in codes}, {n: t[-2000:] for n, t in text.items()}

    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["secure_agg"] is True and summary["rejected_messages"] == 0
    rounds = events(out, "round")
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["participants"] == list(PARTIES) for r in rounds)
    for name in PARTIES:  # each party joined once (the owner was busy pre-aligning) and got the model once
        assert text["owner"].count(f"{name} joined") == 1
        assert text[name].count("downloading the compressed model") == 1
        assert re.search(r"model download: ([\d.]+)/\1 MB", text[name])  # complete, with its rate
        assert "the owner ended the run: run finished" in text[name]

    # AdapFu: the full model plus the adapter LoRA in its last layers. It names the hub model the embedded GGUF
    # quantises, which this offline machine does not hold: the embedded weights it was trained on stand in.
    assert summary["base_model"] == json.loads((out / "adapfu" / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    tokenizer = AutoTokenizer.from_pretrained(out / "adapfu")
    model = PeftModel.from_pretrained(load_model(None).model, out / "adapfu").eval()
    n_layers = model.base_model.model.config.num_hidden_layers
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    last4 = "|".join(str(i) for i in range(n_layers - 4, n_layers))  # the default adapter: the last 4 layers
    assert lora and all(re.search(rf"layers\.({last4})\.", n) for n in lora)
    assert max(float(p.abs().max()) for n, p in lora.items() if "lora_B" in n) > 0
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], tokenize=False,
                                           add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**ids, max_new_tokens=6, do_sample=False)
    new = generated[0, ids["input_ids"].shape[1]:]
    assert 0 < len(new) <= 6 and isinstance(tokenizer.decode(new, skip_special_tokens=True), str)


def data_file(root: Path, name: str, part) -> Path:
    """A party's local training file (instruction / input / output lines)."""
    path = root / f"{name}.jsonl"
    path.write_text("".join(json.dumps({"instruction": e.prompt, "input": "", "output": e.response}) + "\n"
                            for e in part))
    return path

