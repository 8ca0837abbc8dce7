"""Losses over the vocabulary a chunk of positions at a time, fused with the output projection.

A loss over next-token distributions (the party's cross-entropy, the owner's KL to the teacher) needs, per
position, the logits over the whole vocabulary and their log-softmax. Taken at once over a batch, those are
several float32 matrices of [positions, vocabulary] (49k entries a row for SmolLM2, 262k for Gemma 3) kept for
the backward pass: on the owner they were most of the alignment step's peak, several times the model itself.

Here the projection, the loss and its gradient with respect to the hidden states are computed together, one
chunk of rows after another (`head_losses`): what stays for the backward pass is that gradient, [positions,
hidden], never the logits. The numbers are the same computation per row as the whole-vocabulary form; only
the order of a few float additions differs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

CHUNK_BYTES = 32 * 2**20  # float32 logits of one chunk: 170 rows of SmolLM2's 49k vocabulary, 32 of Gemma's 262k
MIN_CHUNK_ROWS = 16

Head = Callable[[torch.Tensor], torch.Tensor]  # hidden rows [c, H] -> float32 logits [c, V]
RowLoss = Callable[[torch.Tensor, slice], torch.Tensor]  # (logits of rows `sl`, sl) -> loss per row [c]


def chunk_rows(vocab_size: int, chunk_bytes: int | None = None) -> int:
    """Rows of float32 logits that fit in `chunk_bytes` (default CHUNK_BYTES; at least MIN_CHUNK_ROWS)."""
    budget = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    return max(MIN_CHUNK_ROWS, budget // (4 * max(1, vocab_size)))


def head_losses(hidden: torch.Tensor, head: Head, row_loss: RowLoss, rows: int,
                trainable: tuple[nn.Parameter, ...] = ()) -> torch.Tensor:
    """Loss per row of `hidden` [N, H] as `row_loss(head(hidden[sl]), sl)`, `rows` rows at a time.

    Differentiable in `hidden`: when a gradient is wanted, each chunk's gradient is computed in the forward
    pass (the loss of row i depends only on row i) and the backward pass scales it. A head with trainable
    parameters of its own (`trainable`: LoRA on lm_head, say) is computed in one piece, as a plain graph.
    """
    wants_grad = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in trainable))
    if not wants_grad:
        return torch.cat([row_loss(head(hidden[sl]), sl) for sl in _slices(hidden.shape[0], rows)])
    if any(p.requires_grad for p in trainable):
        return row_loss(head(hidden), slice(0, hidden.shape[0]))
    return _FusedHeadLoss.apply(hidden, head, row_loss, rows)


def _slices(n: int, rows: int) -> list[slice]:
    return [slice(i, min(n, i + rows)) for i in range(0, n, rows)] or [slice(0, 0)]


class _FusedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, head: Head, row_loss: RowLoss, rows: int) -> torch.Tensor:
        losses, grads = [], []
        for sl in _slices(hidden.shape[0], rows):
            with torch.enable_grad():
                part = hidden[sl].detach().requires_grad_(True)
                # The head sees a view, not the leaf: hooks on a module's inputs (torch's module tracker, as
                # FlopCounterMode uses) cannot be attached to a leaf inside autograd.grad.
                loss = row_loss(head(part.view_as(part)), sl)
                (grad,) = torch.autograd.grad(loss.sum(), part)
            losses.append(loss.detach())
            grads.append(grad)
        ctx.save_for_backward(torch.cat(grads))
        return torch.cat(losses)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (grads,) = ctx.saved_tensors
        return grads * grad_out.to(grads.device, grads.dtype).unsqueeze(-1), None, None, None
