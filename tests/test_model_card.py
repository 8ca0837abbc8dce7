"""Model cards of the exported adapters: what they state, and that the directory still loads with peft."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from huggingface_hub import ModelCard
from peft import PeftModel
from transformers import AutoModelForCausalLM

from learning.lora import LoraSettings, attach_lora
from owner.cli import main
from owner.compress import compress
from owner.export import MODEL_CARD, export_adapfu
from owner.model_card import EMBEDDED_DEFAULT, CardFacts, base_model_name, dp_summary, render_card

FACTS = CardFacts(
    base_model="org/base-model", base_note=None, method="fedbiot", rounds=3, parties=4, on_hub=True,
    settings={"LoRA": "r=8, alpha=16", "learning rate": 3e-4}, data={"party training examples": 1234},
    nll={"base": 2.5, "adapfu": 1.25, "adapemu": 1.5}, eval_items=32, eval_data="packaged sample gsm8k-test",
    secure_agg=True, dp={"epsilon": 3.21, "delta": 1e-5, "parties": 4})


def front_matter(card) -> dict[str, object]:
    """The card's metadata as the hub reads it (huggingface_hub's ModelCard)."""
    return ModelCard(str(card)).data.to_dict()


@pytest.mark.parametrize("kind", ["adapfu", "adapemu"])
def test_card_states_the_run(kind):
    card = str(render_card(kind, FACTS))
    meta = front_matter(card)
    assert meta["library_name"] == "peft" and meta["pipeline_tag"] == "text-generation"
    if kind == "adapfu":  # the hub's base_model metadata: a hub id, and only for the adapter on it
        assert meta["base_model"] == "org/base-model" and meta["base_model_relation"] == "adapter"
    else:
        assert "base_model" not in meta
    assert meta["fedbiot"] == {"kind": kind, "method": "fedbiot", "template": "chat"}
    assert {"fedbiot", "lora", f"fedbiot-{kind}"} <= set(meta["tags"])
    for text in ("| rounds | 3 |", "| parties | 4 |", "| secure aggregation | yes |", "epsilon 3.21",
                 "| party training examples | 1,234 |", "| learning rate | 0.0003 |", "32 held-out items",
                 f'adapter = "path/to/{kind}"', "AutoPeftModelForCausalLM.from_pretrained(adapter)",
                 "apply_chat_template(messages, add_generation_prompt=True"):
        assert text in card, text
    this = "AdapFu (this adapter) | 1.2500 |" if kind == "adapfu" else "AdapEmu (this adapter) | 1.5000 |"
    assert this in card and "| base model | 2.5000 |" in card


def test_card_without_dp_and_the_default_model():
    card = str(render_card("adapfu", CardFacts(**{**FACTS.__dict__, "dp": None, "secure_agg": False})))
    assert "| differential privacy | none |" in card and "| secure aggregation | no |" in card
    assert base_model_name(None)[0] == EMBEDDED_DEFAULT and "Q4_1 GGUF" in base_model_name(None)[1]
    assert base_model_name("/models/x.Q4.gguf") == ("/models/x.Q4.gguf", "a GGUF file, dequantised to float32")
    assert base_model_name("org/m") == ("org/m", None)


def test_dp_summary_takes_the_largest_epsilon():
    report = {"party-1": {"epsilon": 1.5, "delta": 1e-5}, "party-2": {"epsilon": 2.5, "delta": 2e-5},
              "party-3": {"note": "no dp"}}
    assert dp_summary(report) == {"epsilon": 2.5, "delta": 2e-5, "parties": 2}
    assert dp_summary(None) is None and dp_summary({}) is None


def test_exported_card_beside_a_loadable_adapter(tiny_llama_dir, tmp_path):
    settings = LoraSettings(r=4, alpha=8)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    _, manifest = compress(model, 2, 0.5, str(tiny_llama_dir))
    teacher = attach_lora(AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)), manifest.full_adapter_layers,
                          settings, seed=0)
    card = render_card("adapfu", CardFacts(**{**FACTS.__dict__, "base_model": str(tiny_llama_dir)}))
    export_adapfu(teacher, manifest, str(tiny_llama_dir), tmp_path / "adapfu", card=card)
    assert (tmp_path / "adapfu" / MODEL_CARD).read_text(encoding="utf-8") == str(card)  # not PEFT's own card
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)), tmp_path / "adapfu")
    assert sum(1 for n, _ in loaded.named_parameters() if "lora_A" in n) > 0


def card_recipe(card: str, adapter) -> str:
    """The card's Python, pointed at `adapter` and made short."""
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    for kind in ("adapfu", "adapemu"):
        code = code.replace(f'"path/to/{kind}"', repr(str(adapter)))
    return code.replace("max_new_tokens=128", "max_new_tokens=4")


def test_simulated_run_writes_cards_and_reads_csv_with_columns(tiny_llama_dir, tmp_path):
    """End to end: CSV party data through --party-columns, then both cards agree with summary.json."""
    colours = "red blue green".split()
    rows = "".join(f'"Colour of item {i}?","Item {i} is {colours[i % 3]}."\n' for i in range(16))
    (tmp_path / "train.csv").write_text("ask,reply\n" + rows, encoding="utf-8")
    public = [{"instruction": f"Say hi {i} times.", "response": "hi " * (i % 3 + 1)} for i in range(8)]
    (tmp_path / "public.jsonl").write_text("".join(json.dumps(r) + "\n" for r in public), encoding="utf-8")
    (tmp_path / "eval.tsv").write_text("q\ta\n" + "".join(f"{i} + 1?\t{i + 1}\n" for i in range(4)),
                                       encoding="utf-8")
    out = tmp_path / "run"
    assert main(["--simulate", "2", "--rounds", "1", "--out", str(out), "--model", str(tiny_llama_dir),
                 "--party-data", str(tmp_path / "train.csv"), "--party-columns", "prompt=ask,response=reply",
                 "--public-data", str(tmp_path / "public.jsonl"), "--eval-data", str(tmp_path / "eval.tsv"),
                 "--eval-columns", "prompt=q,response=a", "--eval-items", "4",
                 "--max-length", "64", "--local-steps", "1", "--batch-size", "4", "--align-pre-steps", "1",
                 "--align-steps", "1", "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["party_examples"] == 16
    assert json.loads((out / "config.json").read_text())["party_columns"] == "prompt=ask,response=reply"
    for kind in ("adapfu", "adapemu"):
        card = (out / kind / MODEL_CARD).read_text(encoding="utf-8")
        meta = front_matter(card)
        assert "base_model" not in meta  # a local directory is no hub id
        assert meta["fedbiot"] == {"kind": kind, "method": "fedbiot", "template": "plain"}
        assert "| parties | 2 |" in card and "| rounds | 1 |" in card
        assert "| party training examples | 16 |" in card and "| public alignment examples | 8 |" in card
        assert f"(this adapter) | {summary['nll_' + kind]:.4f} |" in card and "4 held-out items of `eval.tsv`" in card
        assert "| differential privacy | none |" in card
        assert "### Instruction:" in card_recipe(card, "x")  # the plain template this tokenizer trained with
    assert summary["base_model"] == str(tiny_llama_dir) and "base_weights" not in summary
    # AdapFu names the base as the run was given it (no cache path); each adapter carries its tokenizer
    adapter_config = json.loads((out / "adapfu" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tiny_llama_dir)
    for kind in ("adapfu", "adapemu"):
        assert {"tokenizer.json", "tokenizer_config.json"} <= {f.name for f in (out / kind).iterdir()}
    # The card's recipe, run as written from another directory on a copy of each adapter: it loads the base
    # by the name the adapter carries, the tokenizer from the adapter's own directory, and generates.
    elsewhere = tmp_path / "elsewhere"
    for kind in ("adapfu", "adapemu"):
        copy = shutil.copytree(out / kind, elsewhere / kind)
        scope: dict = {}
        exec(card_recipe((copy / MODEL_CARD).read_text(encoding="utf-8"), copy), scope)
        assert 0 < scope["output"].shape[1] - scope["inputs"]["input_ids"].shape[1] <= 4
