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

from learning.vocab_loss import chunk_rows, head_losses

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


@dataclass
class ResponseLosses:
    """Cross-entropy of each labelled token, with its target and position (rows as in `ResponseLogits`)."""

    losses: torch.Tensor  # [N] float32
    targets: torch.Tensor  # [N]
    positions: torch.Tensor  # [N, 2]


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


def execution_device(module: nn.Module) -> torch.device:
    """Where a module computes: the execution device of accelerate's hook when its weights are offloaded (meta
    placeholders between forwards), else the device of its first real tensor (the CPU for a module without)."""
    hook = getattr(module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    for t in (*module.parameters(), *module.buffers()):
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")


def model_device(model: nn.Module) -> torch.device:
    """Where the model's inputs go: the device its input embeddings run on."""
    return execution_device(unwrap_causal_lm(model).get_input_embeddings())


def frozen_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's frozen weights, read from its input embeddings (a meta placeholder keeps it)."""
    return unwrap_causal_lm(model).get_input_embeddings().weight.dtype


def precision_context(model: nn.Module) -> contextlib.AbstractContextManager:
    """Autocast to the frozen weights' dtype when it is half precision (bf16/fp16), so the float32 LoRA and
    the half-precision base layers meet in one dtype; nothing (exact float32) otherwise. Autocast is for the
    device the model computes on, also when accelerate offloads its embeddings (their placeholder is on meta)."""
    dtype = frozen_dtype(model)
    if dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(device_type=model_device(model).type, dtype=dtype)
    return contextlib.nullcontext()


def loss_scaler(model: nn.Module) -> torch.amp.GradScaler:
    """Dynamic loss scaling for float16 frozen weights, whose activation gradients underflow to zero unscaled
    (bfloat16 has float32's range and needs none); a disabled scaler, which changes nothing, otherwise."""
    return torch.amp.GradScaler(model_device(model).type, enabled=frozen_dtype(model) == torch.float16)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    if all(t.device == device for t in batch.values()):
        return batch
    return {k: t.to(device, non_blocking=True) for k, t in batch.items()}


def response_hidden(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor,
                                                                          torch.Tensor]:
    """Run the decoder on the batch (in the model's precision context; call it inside one) and keep the last
    hidden states of the positions that predict response tokens: (hidden [N, H], targets [N], positions [N, 2])."""
    causal_lm = unwrap_causal_lm(model)
    batch = to_device(batch, model_device(model))
    hidden = causal_lm.get_decoder()(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).last_hidden_state
    mask, targets = response_positions(batch["labels"].to(hidden.device))  # a dispatched model ends elsewhere
    return hidden[mask], targets, mask.nonzero()


def response_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> ResponseLogits:
    """Run the decoder on the batch and project only the positions that predict response tokens (on the
    model's device, in its precision; the logits come back float32)."""
    with precision_context(model):
        hidden, targets, positions = response_hidden(model, batch)
        logits = project(unwrap_causal_lm(model), hidden)
    return ResponseLogits(logits, targets, positions)


def vocab_size(causal_lm: nn.Module) -> int:
    """Rows of the output projection (the vocabulary it scores)."""
    weight = getattr(causal_lm.get_output_embeddings(), "weight", None)
    return int(weight.shape[0]) if weight is not None else int(causal_lm.config.get_text_config().vocab_size)


def head_parameters(causal_lm: nn.Module) -> tuple[nn.Parameter, ...]:
    """The output projection's parameters (a loss fused with it needs to know whether any of them trains)."""
    return tuple(causal_lm.get_output_embeddings().parameters())


def response_token_losses(model: nn.Module, batch: dict[str, torch.Tensor]) -> ResponseLosses:
    """Cross-entropy of every response token, the vocabulary projected a chunk of positions at a time
    (`learning.vocab_loss`): the same numbers as `cross_entropy(response_logits(...))` without holding
    [N, vocab] logits for the backward pass."""
    causal_lm = unwrap_causal_lm(model)
    with precision_context(model):
        hidden, targets, positions = response_hidden(model, batch)

        def row_loss(logits: torch.Tensor, sl: slice) -> torch.Tensor:
            return nn.functional.cross_entropy(logits, targets[sl].to(logits.device), reduction="none")

        losses = head_losses(hidden, lambda h: project(causal_lm, h), row_loss,
                             chunk_rows(vocab_size(causal_lm)), head_parameters(causal_lm))
    return ResponseLosses(losses, targets.to(losses.device), positions)


def response_nll_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed negative log-likelihood of the response tokens and their count."""
    out = response_token_losses(model, batch)
    return out.losses.sum(), int(out.targets.numel())


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
