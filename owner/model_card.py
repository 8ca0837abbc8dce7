"""The README.md model card of an exported adapter, as PEFT adapters on the Hugging Face hub carry one.

A run's result travels without its run directory; the card says what it is (base model, method and settings,
rounds, parties, data sizes as totals, DP epsilon), how well it did (held-out NLL) and how to load it. The
parties' data are described by their total size only: their names and paths are theirs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EMBEDDED_DEFAULT = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the embedded default GGUF is a quantisation of
KINDS = {
    "adapfu": ("AdapFu", "the adapter LoRA on the full model's top layers: the result to use"),
    "adapemu": ("AdapEmu", "the adapter LoRA plus the aligned emulator LoRA on the compressed model the "
                           "parties trained on"),
}


@dataclass(frozen=True)
class CardFacts:
    """Everything a card states; `nll` maps base / adapfu / adapemu to the held-out mean response NLL."""

    base_model: str  # the model's name: hub id, or the path it was loaded from
    base_note: str | None  # what the name does not say (e.g. the embedded GGUF), or None
    method: str
    rounds: int
    parties: int
    settings: dict[str, Any]
    data: dict[str, int]  # totals, e.g. {"party training examples": 400}
    nll: dict[str, float]
    eval_items: int
    eval_data: str
    secure_agg: bool
    dp: dict[str, float] | None = None  # {"epsilon": largest of the parties, "delta": ..., "parties": n}
    tags: tuple[str, ...] = field(default=("fedbiot", "federated-learning", "lora", "peft"))


def dp_summary(report: dict[str, dict] | None) -> dict[str, float] | None:
    """The parties' privacy reports ({party: {"epsilon", "delta", ...}}) as the worst case, or None."""
    spent = [r for r in (report or {}).values() if isinstance(r, dict) and "epsilon" in r]
    if not spent:
        return None
    return {"epsilon": max(float(r["epsilon"]) for r in spent),
            "delta": max(float(r.get("delta", 0.0)) for r in spent), "parties": len(spent)}


def base_model_name(model: str | None) -> tuple[str, str | None]:
    """(name on the card, note) of the `--model` option: None is the embedded default GGUF."""
    if model is None:
        return EMBEDDED_DEFAULT, "the embedded Q4_1 GGUF of this model, dequantised to float32"
    if model.lower().endswith(".gguf"):
        return Path(model).name, "a GGUF file, dequantised to float32"
    return model, None


def _front_matter(kind: str, facts: CardFacts) -> str:
    tags = [*facts.tags, f"fedbiot-{kind}", facts.method]
    lines = ["---", f"base_model: {json.dumps(facts.base_model)}", "library_name: peft",
             "pipeline_tag: text-generation", "tags:"]
    lines += [f"- {json.dumps(t)}" for t in dict.fromkeys(tags)]
    return "\n".join([*lines, "---"])


def _table(rows: dict[str, Any]) -> str:
    out = ["| | |", "|---|---|"]
    out += [f"| {k} | {_fmt(v)} |" for k, v in rows.items()]
    return "\n".join(out)


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value).replace("|", "\\|")


def _loading(kind: str) -> str:
    if kind == "adapfu":
        base = "the base model named in adapter_config.json"
    else:
        base = "the compressed model (compressed/ of the run) named in adapter_config.json"
    return "\n".join([
        f"The adapter loads onto {base}, with transformers and peft alone:",
        "",
        "```python",
        "from peft import AutoPeftModelForCausalLM",
        "from transformers import AutoTokenizer",
        "",
        f'model = AutoPeftModelForCausalLM.from_pretrained("path/to/{kind}")',
        "tokenizer = AutoTokenizer.from_pretrained(model.peft_config[\"default\"].base_model_name_or_path)",
        "```",
        "",
        "or from this project: `python -m owner.generate --adapter path/to/"
        f"{kind} --prompt \"What is 12 * 7?\"`.",
    ])


def render_card(kind: str, facts: CardFacts) -> str:
    """README.md text for the `kind` ("adapfu" or "adapemu") directory."""
    title, what = KINDS[kind]
    base = f"`{facts.base_model}`" + (f" ({facts.base_note})" if facts.base_note else "")
    privacy = ("none" if facts.dp is None else
               f"DP-SGD on {facts.dp['parties']:.0f} parties: epsilon {facts.dp['epsilon']:.3g} "
               f"(delta {facts.dp['delta']:.2g}), the largest any party spent")
    training = {"method": facts.method, "rounds": facts.rounds, "parties": facts.parties,
                "secure aggregation": facts.secure_agg, "differential privacy": privacy}
    nll = {"base model": facts.nll.get("base")}
    nll.update({f"{KINDS[k][0]}{' (this adapter)' if k == kind else ''}": facts.nll.get(k)
                for k in KINDS if k in facts.nll})
    nll = {k: f"{v:.4f}" for k, v in nll.items() if v is not None}
    body = [
        _front_matter(kind, facts),
        "",
        f"# {title} LoRA adapter for {facts.base_model} (FedBiOT)",
        "",
        f"A LoRA adapter of {base}, fine-tuned with FedBiOT (federated fine-tuning without handing the parties "
        f"the full model, KDD 2024): {title} is {what}.",
        "",
        "## Training",
        "",
        _table(training),
        "",
        "## Settings",
        "",
        _table(facts.settings),
        "",
        "## Data (totals)",
        "",
        _table(facts.data),
        "",
        "## Held-out NLL",
        "",
        f"Mean negative log-likelihood of the response tokens on {facts.eval_items:,} held-out items of "
        f"`{facts.eval_data}` (lower is better):",
        "",
        _table(nll),
        "",
        "## How to load",
        "",
        _loading(kind),
        "",
    ]
    return "\n".join(body)
