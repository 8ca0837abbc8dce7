"""Gradient fidelity: does the emulator steer the adapter LoRA the way the full model would?

Parties train the adapter LoRA through the emulator (compressed model + emulator LoRA), but the result is used
on the full model (AdapFu). What matters for that is the gradient the parties follow, so the owner measures on a
few fixed public batches the adapter-LoRA gradient of the response cross-entropy through the student
(compressed model + emulator LoRA + adapter LoRA) and through the teacher (full model + the same adapter LoRA on
its adapter layers), and reports their cosine and the norm ratio |g_student| / |g_teacher|.

Measuring is read-only: gradients come from `torch.autograd.grad` (nothing lands in `.grad`), the flags
`requires_grad` are restored, both models run in eval mode (no dropout draw), and the batches come from their
own seeded generator, so a run with fidelity on gives the same adapters as one with it off.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from errors import ModelError
from learning.compressed_model import Manifest
from learning.forward import response_token_losses
from learning.lora import lora_parameters, remap_layer_indices
from learning.seeds import derive_seed
from tasks.batching import collate, round_batch_indices
from tasks.prompts import TokenizedExample


def fidelity_batches(data: Sequence[TokenizedExample], n_batches: int, batch_size: int, seed: int
                     ) -> list[list[int]]:
    """The same `n_batches` public batches at every stage (so the numbers are comparable over rounds)."""
    if n_batches < 1 or not data:
        return []
    return round_batch_indices([len(it.input_ids) for it in data], 0, n_batches, batch_size,
                               derive_seed(seed, "fidelity"))


def _adapter_grad(model: nn.Module, params: list[nn.Parameter], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Flat gradient of the mean response cross-entropy w.r.t. `params` (float32, CPU)."""
    loss = response_token_losses(model, batch).losses.mean()
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).detach().float().reshape(-1).cpu()
                      for p, g in zip(params, grads, strict=True)])


def _paired_params(student: nn.Module, teacher: nn.Module, manifest: Manifest
                   ) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """The adapter LoRA Parameters of both models, paired by canonical name (compressed -> full index)."""
    mapping = dict(zip(manifest.adapter_layers, manifest.full_adapter_layers, strict=True))
    student_named = remap_layer_indices(dict(lora_parameters(student, manifest.adapter_layers)), mapping,
                                        manifest.layers_path)
    teacher_named = dict(lora_parameters(teacher, manifest.full_adapter_layers))
    names = sorted(student_named)
    if set(names) != set(teacher_named):
        raise ModelError("the student's and the teacher's adapter LoRA do not match")
    return [student_named[n] for n in names], [teacher_named[n] for n in names]


def gradient_fidelity(student: nn.Module, teacher: nn.Module, manifest: Manifest,
                      data: Sequence[TokenizedExample], groups: Sequence[Sequence[int]], pad_id: int,
                      progress: Callable[[int], None] | None = None) -> dict[str, float | None] | None:
    """Mean over `groups` (item indices per batch) of the cosine and the norm ratio (student / teacher) of
    the adapter-LoRA gradients; None without batches. Leaves both models exactly as it found them.
    `progress(n)` is told after each batch how many are done."""
    if not groups:
        return None
    s_params, t_params = _paired_params(student, teacher, manifest)
    flags = [(p, p.requires_grad) for p in s_params + t_params]
    modes = [(m, m.training) for m in (student, teacher)]
    cosines, ratios = [], []
    try:
        for p, _ in flags:
            p.requires_grad_(True)
        for m, _ in modes:
            m.eval()
        for group in groups:
            batch = collate([data[i] for i in group], pad_id)
            g_s = _adapter_grad(student, s_params, batch)
            g_t = _adapter_grad(teacher, t_params, batch)
            n_s, n_t = float(g_s.norm()), float(g_t.norm())
            cosines.append(float(g_s @ g_t) / (n_s * n_t) if n_s > 0 and n_t > 0 else float("nan"))
            ratios.append(n_s / n_t if n_t > 0 else float("nan"))
            if progress:
                progress(len(ratios))
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.train(mode)
    return {"cosine": _mean(cosines), "norm_ratio": _mean(ratios), "batches": len(groups)}


def _mean(values: list[float]) -> float | None:
    """Mean of the finite values (a zero gradient has no direction); None when there is none (valid JSON)."""
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None

