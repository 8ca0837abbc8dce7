"""Held-out response-token NLL: the number that says whether a model got better at the task."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from learning.forward import response_positions, response_token_losses, unwrap_causal_lm
from tasks.batching import collate, eval_groups
from tasks.prompts import TokenizedExample


@torch.no_grad()
def mean_response_nll(model: nn.Module, data: Sequence[TokenizedExample], pad_id: int,
                      batch_size: int = 8) -> float:
    """Mean negative log-likelihood per response token over `data`."""
    return response_and_answer_nll(model, data, None, pad_id, batch_size)[0]


def eval_batch_count(n_items: int, batch_size: int = 8) -> int:
    """How many batches `response_and_answer_nll` runs over `n_items` items."""
    return -(-n_items // batch_size)


@torch.no_grad()
def response_and_answer_nll(model: nn.Module, data: Sequence[TokenizedExample],
                            answers: Sequence[TokenizedExample] | None, pad_id: int, batch_size: int = 8,
                            progress: Callable[[], None] | None = None) -> tuple[float, float | None]:
    """Mean NLL per response token over `data`, and per answer-line token over `answers` (the same items with
    labels on a subset of the response: `tokenize_examples(..., answer_line=True)`), from one forward pass;
    the second is None without `answers` (or when no answer token is left). `progress()` is called after each
    batch (`eval_batch_count` of them)."""
    if answers is not None and len(answers) != len(data):
        raise ValueError(f"{len(answers)} answer items for {len(data)} items")
    was_training = model.training
    model.eval()
    total, count, answer_total, answer_count = 0.0, 0, 0.0, 0
    weight = unwrap_causal_lm(model).get_input_embeddings().weight
    device = None if weight.device.type == "meta" else weight.device  # offloaded: accelerate moves inputs
    for rows in eval_groups(data, batch_size):
        batch = collate([data[i] for i in rows], pad_id)
        if device is not None:
            batch = {k: v.to(device) for k, v in batch.items()}
        out = response_token_losses(model, batch)
        losses = out.losses
        total += float(losses.sum())
        count += int(losses.numel())
        if answers is not None:
            mask, _ = response_positions(collate([answers[i] for i in rows], pad_id)["labels"])
            chosen = mask[out.positions[:, 0].cpu(), out.positions[:, 1].cpu()].to(losses.device)
            answer_total += float(losses[chosen].sum())
            answer_count += int(chosen.sum())
        if progress:
            progress()
    model.train(was_training)
    return total / max(count, 1), (answer_total / answer_count if answer_count else None)
