"""Prompt templates and tokenisation with the loss restricted to the response.

Parties and the owner both train on "prompt -> response" pairs; only the response tokens (and the token
that ends the turn, so the model learns to stop) carry labels. Prompt and response are tokenised
separately so the boundary between them is exact whatever the tokenizer does at the seam.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from errors import ConfigError, DataError
from tasks.datasets import Example

log = logging.getLogger(__name__)

IGNORE_INDEX = -100

PLAIN_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"

TEMPLATES: dict[str, str] = {
    "auto": "the chat template when the tokenizer has one, else plain",
    "plain": "Alpaca-style '### Instruction: ... ### Response:' text, for base models",
    "chat": "the tokenizer's chat template: one user message and the assistant generation prompt",
}

_MARKER = "FEDBIOT_RESPONSE_MARKER"


@dataclass
class TokenizedExample:
    """Token ids of prompt + response + end token; labels are IGNORE_INDEX over the prompt."""

    input_ids: list[int]
    labels: list[int]


def resolve_template(tokenizer, template: str = "auto") -> str:
    """'plain' or 'chat' for this tokenizer; errors for an unknown name or a missing chat template."""
    if template not in TEMPLATES:
        raise ConfigError(f"unknown prompt template {template!r} (choose from {', '.join(TEMPLATES)})")
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if template == "auto":
        return "chat" if has_chat else "plain"
    if template == "chat" and not has_chat:
        raise ConfigError("--template chat: this tokenizer has no chat template (use plain or auto)")
    return template


def format_prompt(prompt: str, tokenizer, template: str = "auto") -> str:
    """The text the model sees before its response (the same at training and at generation time)."""
    if resolve_template(tokenizer, template) == "chat":
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return PLAIN_TEMPLATE.format(prompt=prompt)


def format_prompts(prompts: Sequence[str], tokenizer, template: str = "auto") -> list[str]:
    """`format_prompt` for many prompts, rendering a chat template in one batched call."""
    if resolve_template(tokenizer, template) == "chat":
        return list(tokenizer.apply_chat_template(
            [[{"role": "user", "content": p}] for p in prompts], tokenize=False, add_generation_prompt=True
        ))
    return [PLAIN_TEMPLATE.format(prompt=p) for p in prompts]


def _special_ids(tokenizer) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items() if tok.special)
    return ids


def end_token_id(tokenizer, template: str = "auto") -> int | None:
    """The token that closes a response: the chat template's end-of-turn token (e.g. SmolLM2's
    <|im_end|>) when it is one special token, else eos; None if the tokenizer has neither.

    A chat model stops generating at its end-of-turn token, so that is what it must learn to emit.
    """
    eos = tokenizer.eos_token_id
    if resolve_template(tokenizer, template) != "chat":
        return eos
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _MARKER}], tokenize=False
        )
    except Exception:  # templates may reject the probe conversation; eos is the safe answer then
        return eos
    if _MARKER not in text:
        return eos
    tail = text.split(_MARKER, 1)[1].lstrip()
    ids = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
    if ids and ids[0] in _special_ids(tokenizer):
        return int(ids[0])
    return eos


def tokenize_examples(examples: Sequence[Example], tokenizer, max_length: int = 256,
                      template: str = "auto", answer_line: bool = False, what: str = "",
                      use: str = "", warn: bool = True) -> list[TokenizedExample]:
    """Tokenise examples for training: prompt ids (with what the template / tokenizer adds) + response ids
    (nothing added) + the end token, cut to `max_length` from the right.

    Examples left with no labelled token are dropped with a warning that names the data (`what`, e.g.
    "--public-data dolly") and says how many remain for their `use` ("alignment"), unless `warn` is False;
    none left at all is a DataError.
    `answer_line=True` keeps the labels of the response's last line only (GSM8K: "The answer is N."; the end
    token is not part of it), for an NLL of the answer alone; items are dropped by the whole response's rule, so
    the list matches the plain one item for item (an answer line cut off by `max_length` leaves no label).
    """
    if max_length < 2:
        raise ConfigError(f"max_length must be at least 2, got {max_length}")
    if not examples:
        raise DataError("no examples to tokenise")
    mode = resolve_template(tokenizer, template)
    prompts = format_prompts([e.prompt for e in examples], tokenizer, mode)
    # Chat templates write their own BOS into the text; the plain template relies on the tokenizer's.
    prompt_ids = tokenizer(prompts, add_special_tokens=(mode == "plain"))["input_ids"]
    responses = [e.response for e in examples]
    response_ids = tokenizer(responses, add_special_tokens=False)["input_ids"]
    starts = last_line_starts(responses, tokenizer) if answer_line else [0] * len(responses)
    end = end_token_id(tokenizer, mode)
    tail = [end] if end is not None else []
    out: list[TokenizedExample] = []
    for p, r, start in zip(prompt_ids, response_ids, starts, strict=True):
        target = list(r) + tail
        ids = (list(p) + target)[:max_length]
        labels = ([IGNORE_INDEX] * len(p) + target)[:max_length]
        # Position 0 predicts nothing (the loss compares token t with the logits at t-1).
        if all(label == IGNORE_INDEX for label in labels[1:]):
            continue
        if answer_line:
            first, stop = len(p) + start, len(p) + len(r)
            labels = [label if first <= i < stop else IGNORE_INDEX for i, label in enumerate(labels)]
        out.append(TokenizedExample(ids, labels))
    dropped = len(examples) - len(out)
    lead = f"{what}: " if what else ""
    if not out:
        raise DataError(f"{lead}all {len(examples)} examples have a prompt of max_length={max_length} tokens or "
                        "more, so no response token is left: raise --max-length")
    if dropped and warn:
        left = f"only {len(out)}" if len(out) * 4 < len(examples) else str(len(out))
        log.warning("%sdropped %d of %d examples whose prompt leaves no response token within max_length=%d; %s "
                    "remain%s%s", lead, dropped, len(examples), max_length, left, f" for {use}" if use else "",
                    " (raise --max-length to keep more)" if left.startswith("only") else "")
    return out


def last_line_starts(responses: Sequence[str], tokenizer) -> list[int]:
    """Per response, the index of its first token of the last line (text after the last newline, trailing
    whitespace aside): by character offsets with a fast tokenizer (a token that straddles the newline counts as
    the answer's), else by the token count of the text before it."""
    cuts = [r.rstrip().rfind("\n") + 1 for r in responses]
    if getattr(tokenizer, "is_fast", False):
        offsets = tokenizer(list(responses), add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        return [next((k for k, (_, stop) in enumerate(spans) if stop > cut), len(spans)) if cut else 0
                for cut, spans in zip(cuts, offsets, strict=True)]
    return [len(tokenizer(r[:cut], add_special_tokens=False)["input_ids"]) if cut else 0
            for r, cut in zip(responses, cuts, strict=True)]


def pad_id_of(tokenizer) -> int:
    """The token that pads batches: the tokenizer's pad token, else its EOS token (padding is masked out)."""
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id
    if pad is None:
        raise ConfigError("the tokenizer has neither a pad nor an EOS token to pad batches with")
    return int(pad)
