"""Owner-side emulator alignment (paper Eq. 7): distil the emulator LoRA towards the full model.

    L = mean ||(E*(x) - E(x)) / rms(E*(x))||^2  +  lambda * KL( M(x; A, E*) || M(x; A, E) )

E* is the full model's lower n-s layers, E the compressed emulator with its LoRA, A the adapter with the current
global adapter LoRA. Both terms are taken on response positions only (the paper's "ground truth part"); padding
never counts. One forward of the full model (with the adapter LoRA on its adapter layers) gives both targets: the
hidden states entering layer n-s and the output logits. Only the emulator LoRA trains. With a bottom adapter (the
Offsite-tuning/FedOT layout) its first a layers run with the adapter LoRA in both models, and the L2 boundary stays
the input of the first top adapter layer.

E*(x) cannot change during a run (frozen weights, fixed public data), so by default the aligner computes it once
per example (`owner.teacher_cache`) and each step runs the teacher only through the adapter layers and lm_head.
With a bottom adapter E* does depend on the adapter LoRA, so there the cache only lives for one `run` call.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from errors import ConfigError
from learning.compressed_model import Manifest
from learning.forward import (
    capture_layer_input,
    head_parameters,
    loss_scaler,
    precision_context,
    project,
    response_positions,
    unwrap_causal_lm,
    vocab_size,
)
from learning.lora import set_trainable
from learning.seeds import derive_seed
from learning.vocab_loss import chunk_rows, head_losses
from owner.config import AlignSettings
from owner.models import decoder_layers
from owner.teacher_cache import TeacherInputCache, fingerprint, input_device, upper_forward
from tasks.batching import collate, round_batch_indices
from tasks.prompts import TokenizedExample


@dataclass
class AlignmentTerms:
    total: torch.Tensor
    l2: torch.Tensor
    kl: torch.Tensor


def alignment_loss(
    student: nn.Module,
    teacher: nn.Module,
    manifest: Manifest,
    batch: Mapping[str, torch.Tensor],
    kl_weight: float,
    teacher_input: torch.Tensor | None = None,
) -> AlignmentTerms:
    """Eq. 7 on one batch; the teacher runs without gradient.

    `teacher_input`: E* of the batch ([B, T, H], right-padded), if cached; then the teacher runs only its
    adapter layers and lm_head.
    """
    mask, _ = response_positions(batch["labels"])
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    teacher_lm, student_lm = unwrap_causal_lm(teacher), unwrap_causal_lm(student)
    with torch.no_grad(), precision_context(teacher):  # autocast when the frozen weights are bf16/fp16
        if teacher_input is None:
            device = input_device(teacher_lm)
            teacher_inputs = inputs if device is None else {k: v.to(device) if torch.is_tensor(v) else v
                                                            for k, v in inputs.items()}
            boundary = decoder_layers(teacher_lm)[manifest.n_layers - manifest.adapter_size]
            with capture_layer_input(boundary) as seen:
                hidden_t = teacher_lm.get_decoder()(**teacher_inputs).last_hidden_state
            emu_t = seen[0][mask.to(seen[0].device)]
        else:
            hidden_t = upper_forward(teacher, manifest, teacher_input, batch["attention_mask"])
            emu_t = teacher_input[mask.to(teacher_input.device)]
        rows_t = hidden_t[mask.to(hidden_t.device)]
    device = input_device(student_lm)
    if device is not None:
        inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
    boundary = decoder_layers(student_lm)[manifest.top_adapter_start]
    with precision_context(student), capture_layer_input(boundary) as seen:
        hidden_s = student_lm.get_decoder()(**inputs).last_hidden_state
        emu_s = seen[0][mask.to(seen[0].device)].float()  # the loss itself in float32 (a no-op in float32)
        kl = distillation_kl(student, teacher, hidden_s[mask.to(hidden_s.device)], rows_t).mean()
    emu_t = emu_t.to(emu_s.device, torch.float32)
    rms = emu_t.pow(2).mean(dim=-1, keepdim=True).sqrt().clamp_min(1e-6)
    l2 = ((emu_t - emu_s) / rms).pow(2).mean()
    kl = kl.to(l2.device)
    return AlignmentTerms(l2 + kl_weight * kl, l2.detach(), kl.detach())


def distillation_kl(student: nn.Module, teacher: nn.Module, hidden_s: torch.Tensor, hidden_t: torch.Tensor
                    ) -> torch.Tensor:
    """KL(teacher || student) of the next-token distributions, one value per row of the final hidden states
    [N, H] of each model: the vocabulary projected a chunk of rows at a time (`learning.vocab_loss`), the
    teacher's log-probabilities computed per chunk without gradient, so no [N, vocab] matrix is held."""
    teacher_lm, student_lm = unwrap_causal_lm(teacher), unwrap_causal_lm(student)

    def row_kl(logits_s: torch.Tensor, sl: slice) -> torch.Tensor:
        with torch.no_grad(), precision_context(teacher):
            log_p_t = torch.log_softmax(project(teacher_lm, hidden_t[sl]), dim=-1).to(logits_s.device)
        log_p_s = torch.log_softmax(logits_s, dim=-1)
        return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1)

    return head_losses(hidden_s, lambda h: project(student_lm, h), row_kl, chunk_rows(vocab_size(student_lm)),
                       head_parameters(student_lm))


class EmulatorAligner:
    """Keeps the owner's AdamW state for the emulator LoRA across rounds and runs alignment steps."""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        manifest: Manifest,
        public_data: Sequence[TokenizedExample],
        pad_id: int,
        settings: AlignSettings,
        seed: int,
        cache_dir: Path | None = None,
    ) -> None:
        """`cache_dir`: where E* spills past `settings.cache_memory_mb` (without one, it is recomputed)."""
        if not public_data:
            raise ConfigError("the owner's public data set is empty")
        self.student, self.teacher, self.manifest = student, teacher, manifest
        self.data = list(public_data)
        self.pad_id = pad_id
        self.settings = settings
        self.seed = derive_seed(seed, "alignment")
        self.params = set_trainable(student, manifest.emulator_layers)
        self.optimizer = torch.optim.AdamW(self.params, lr=settings.lr, betas=settings.betas, weight_decay=0.0)
        self.scaler = loss_scaler(student)  # float16 weights: the loss scale, kept across alignment calls
        self.calls = 0
        self.cache = None
        if settings.cache_teacher:
            self.cache = TeacherInputCache(fingerprint(teacher, manifest, self.data),
                                           int(settings.cache_memory_mb * 2**20), cache_dir)

    def run(self, steps: int, stage: int, progress: Callable[[dict], None] | None = None) -> dict:
        """`steps` alignment steps on batches drawn for `stage` (-1 = pre-alignment, r = after round r)."""
        if steps == 0:
            return {"steps": 0}
        start = time.perf_counter()
        set_trainable(self.student, self.manifest.emulator_layers)
        self.student.train()
        s = self.settings
        groups = round_batch_indices([len(it.input_ids) for it in self.data], stage + 1, steps, s.batch_size,
                                     self.seed)
        if self.cache is not None and self.manifest.bottom_adapter_size:
            self.cache.clear()  # E* passes through the bottom adapter, whose LoRA may have changed
        history = []
        with recomputed_activations(self.student, s.checkpoint_activations):
            self._steps(groups, stage, steps, history, progress)
        self.student.eval()
        for p in self.params:
            p.requires_grad_(False)
        return {
            "steps": steps, "loss_first": history[0][0], "loss_last": history[-1][0],
            "l2_last": history[-1][1], "kl_last": history[-1][2], "seconds": time.perf_counter() - start,
        }

    def _steps(self, groups: list[list[int]], stage: int, steps: int, history: list[tuple[float, float, float]],
               progress: Callable[[dict], None] | None) -> None:
        s = self.settings
        for step, group in enumerate(groups):
            batch = collate([self.data[i] for i in group], self.pad_id)
            cached = None if self.cache is None else self.cache.batch(self.teacher, self.manifest, self.data,
                                                                      group, self.pad_id)
            self.optimizer.zero_grad(set_to_none=True)
            terms = alignment_loss(self.student, self.teacher, self.manifest, batch, s.kl_weight, cached)
            self.scaler.scale(terms.total).backward()
            self.scaler.unscale_(self.optimizer)
            if s.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(self.params, s.max_grad_norm)
            self.scaler.step(self.optimizer)  # skipped when a float16 gradient overflowed
            self.scaler.update()
            history.append((float(terms.total.detach()), float(terms.l2), float(terms.kl)))
            if progress:
                progress({"stage": stage, "step": step + 1, "steps": steps, "loss": history[-1][0],
                          "l2": history[-1][1], "kl": history[-1][2]})


@contextmanager
def recomputed_activations(model: nn.Module, on: bool = True) -> Iterator[None]:
    """Activation checkpointing of the model's decoder layers (transformers' own, non-reentrant) while the
    block runs: each layer keeps only its input for the backward pass and recomputes the rest there, so a
    step holds one layer's activations instead of every layer's. Values and gradients are those of the plain
    step (the recomputation runs the same kernels on the same inputs, dropout with the saved RNG state).
    Switched off again on exit; models without support run as they are."""
    lm = unwrap_causal_lm(model)
    if not on or not getattr(lm, "supports_gradient_checkpointing", False):
        yield
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)  # the v4 name of the call, deprecated in v5
        if hasattr(lm, "activation_checkpointing_enable"):
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            if hasattr(lm, "activation_checkpointing_disable"):
                lm.activation_checkpointing_disable()
            else:
                lm.gradient_checkpointing_disable()
        if getattr(lm, "_require_grads_hooks", None) or getattr(lm, "_require_grads_hook", None) is not None:
            lm.disable_input_require_grads()  # the input hook the enable call left behind
