"""Held-out response-token NLL: the number that says whether a model got better at the task."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from learning.forward import response_nll_sum, unwrap_causal_lm
from tasks.batching import eval_batches
from tasks.prompts import TokenizedExample


@torch.no_grad()
def mean_response_nll(model: nn.Module, data: Sequence[TokenizedExample], pad_id: int,
                      batch_size: int = 8) -> float:
    """Mean negative log-likelihood per response token over `data`."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    weight = unwrap_causal_lm(model).get_input_embeddings().weight
    device = None if weight.device.type == "meta" else weight.device  # offloaded: accelerate moves inputs
    for batch in eval_batches(list(data), batch_size, pad_id):
        if device is not None:
            batch = {k: v.to(device) for k, v in batch.items()}
        nll, n = response_nll_sum(model, batch)
        total += float(nll)
        count += n
    model.train(was_training)
    return total / max(count, 1)
