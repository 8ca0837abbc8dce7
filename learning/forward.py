"""Forward passes that compute logits only where a loss is taken.

The vocabulary projection dominates a small model's step (49k x 576 for SmolLM2), and most positions of an
instruction example are prompt or padding. Running the decoder once and projecting only the positions whose
next token is a labelled response token cuts that cost to the response length.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

IGNORE_INDEX = -100


def unwrap_causal_lm(model: nn.Module) -> nn.Module:
    """The plain causal LM inside PEFT / Opacus wrappers (LoRA layers stay injected in it)."""
    while True:
        if hasattr(model, "_module"):  # opacus GradSampleModule
            model = model._module
        elif hasattr(model, "get_base_model") and callable(model.get_base_model):  # peft PeftModel
            model = model.get_base_model()
        else:
            return model


@dataclass
class ResponseLogits:
    """Logits at the positions that predict a labelled token, and those tokens."""

    logits: torch.Tensor  # [N, vocab]
    targets: torch.Tensor  # [N]
    positions: torch.Tensor  # [N, 2] (batch, position) of each row, for aligning other per-position values


def response_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean mask [B, T] of positions whose next token is labelled, and the targets at those positions."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask, labels[:, 1:][mask[:, :-1]]


def project(causal_lm: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """lm_head (plus Gemma-style final logit soft-capping) applied to selected hidden states."""
    logits = causal_lm.get_output_embeddings()(hidden)
    cap = getattr(causal_lm.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits.float()


def model_device(model: nn.Module) -> torch.device:
    """Where the model's inputs go: the device of its input embeddings."""
    return unwrap_causal_lm(model).get_input_embeddings().weight.device


def precision_context(model: nn.Module) -> contextlib.AbstractContextManager:
    """Autocast to the frozen weights' dtype when it is half precision (bf16/fp16), so the float32 LoRA and
    the half-precision base layers meet in one dtype; nothing (exact float32) otherwise."""
    weight = unwrap_causal_lm(model).get_input_embeddings().weight
    if weight.dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(device_type=weight.device.type, dtype=weight.dtype)
    return contextlib.nullcontext()


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    if all(t.device == device for t in batch.values()):
        return batch
    return {k: t.to(device, non_blocking=True) for k, t in batch.items()}


def response_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> ResponseLogits:
    """Run the decoder on the batch and project only the positions that predict response tokens (on the
    model's device, in its precision; the logits come back float32)."""
    causal_lm = unwrap_causal_lm(model)
    decoder = causal_lm.get_decoder()
    batch = to_device(batch, model_device(model))
    with precision_context(model):
        hidden = decoder(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).last_hidden_state
        mask, targets = response_positions(batch["labels"].to(hidden.device))  # a dispatched model ends elsewhere
        logits = project(causal_lm, hidden[mask])
    return ResponseLogits(logits, targets, mask.nonzero())


def response_nll_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed negative log-likelihood of the response tokens and their count."""
    out = response_logits(model, batch)
    nll = nn.functional.cross_entropy(out.logits, out.targets, reduction="sum")
    return nll, int(out.targets.numel())


@contextmanager
def capture_layer_input(layer: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Record the hidden states entering a decoder layer (the output of everything below it)."""
    seen: list[torch.Tensor] = []

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        seen.append(args[0] if args else kwargs["hidden_states"])

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()
