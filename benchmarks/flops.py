"""Matmul FLOPs of one party training step, counted analytically and checked against torch's FLOP counter.

The analytic count follows the data flow of a Llama-style decoder layer (q/k/v/o attention projections,
gate/up/down MLP) to decide which gradients autograd really computes: frozen base weights get no weight
gradient; an input gradient is computed only where something below still requires grad, so a FedBiOT
party's backward pass stops at its adapter while a FedOT party's (trainable first layers) runs all the way
down. Counted, as torch's `FlopCounterMode` counts: every matmul (2 FLOPs per multiply-add), attention as
QK^T and PV over the padded length (its backward as 2.5x: four gradient matmuls plus the recomputed
scores, as the flash kernels do), the vocabulary projection only at the projected positions, LoRA's two
skinny matmuls, and the proximal term's r x r Gram matrices. Element-wise work (norms, rotary, softmax,
optimizer) is not counted by either.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from peft.tuners.lora import LoraLayer
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from learning.compressed_model import decoder_layers, unwrap_model

ATTN_IN = ("q_proj", "k_proj", "v_proj")
ATTN_OUT = ("o_proj",)
MLP_IN = ("gate_proj", "up_proj")
MLP_OUT = ("down_proj",)
_KNOWN = ATTN_IN + ATTN_OUT + MLP_IN + MLP_OUT


@dataclass
class StepFlops:
    """FLOPs of one training step, split by pass and by kind of work."""

    forward: dict[str, int] = field(default_factory=dict)
    backward: dict[str, int] = field(default_factory=dict)

    def add(self, which: str, kind: str, flops: int) -> None:
        part = self.forward if which == "forward" else self.backward
        part[kind] = part.get(kind, 0) + int(flops)

    @property
    def total(self) -> int:
        return sum(self.forward.values()) + sum(self.backward.values())

    @property
    def forward_total(self) -> int:
        return sum(self.forward.values())

    @property
    def backward_total(self) -> int:
        return sum(self.backward.values())

    def to_dict(self) -> dict:
        return {"forward": dict(self.forward), "backward": dict(self.backward), "total": self.total}


@dataclass(frozen=True)
class _Linear:
    kind: str  # the last name component, one of _KNOWN
    fan_in: int
    fan_out: int
    lora_rank: int  # 0 = no LoRA


def _layer_linears(layer: nn.Module) -> list[_Linear]:
    out = []
    for name, mod in layer.named_modules():
        kind = name.rsplit(".", 1)[-1]
        if isinstance(mod, LoraLayer):
            base = mod.get_base_layer()
            # switched off (a frozen LoRA folded into the weights): the layer costs its base Linear only
            ranks = [] if mod.disable_adapters else [mod.r[a] for a in mod.active_adapters if a in mod.lora_A]
            out.append(_Linear(kind, base.in_features, base.out_features, ranks[0] if ranks else 0))
        elif isinstance(mod, nn.Linear) and ".lora_" not in name and "base_layer" not in name:
            out.append(_Linear(kind, mod.in_features, mod.out_features, 0))
    unknown = sorted({lin.kind for lin in out} - set(_KNOWN))
    if unknown:
        raise ValueError(f"analytic FLOP count supports Llama-style layers ({', '.join(_KNOWN)}); "
                         f"found {', '.join(unknown)}")
    return out


def step_flops(model: nn.Module, trainable_layers: Sequence[int], batch_size: int, seq_len: int,
               n_logits: int, prox: bool = True) -> StepFlops:
    """Analytic matmul FLOPs of one step: forward over `batch_size` x `seq_len` positions, the vocabulary
    projection at `n_logits` positions, backward into the LoRA of `trainable_layers` (plus the proximal
    term on them when `prox`)."""
    plain = unwrap_model(model)
    trainable = set(trainable_layers)
    tokens = batch_size * seq_len
    flops = StepFlops()
    grad_in = False  # does the hidden state entering this layer require grad?
    for index, layer in enumerate(decoder_layers(plain)):
        linears = _layer_linears(layer)
        train_here = index in trainable
        by_kind = {lin.kind: lin for lin in linears}

        def linear(lin: _Linear, in_rg: bool, train_here: bool = train_here) -> bool:
            """Count one projection; returns whether its output requires grad."""
            flops.add("forward", "linear", 2 * tokens * lin.fan_in * lin.fan_out)
            trains = train_here and lin.lora_rank > 0
            if lin.lora_rank:
                flops.add("forward", "lora", 2 * tokens * lin.lora_rank * (lin.fan_in + lin.fan_out))
            out_rg = in_rg or trains
            if not out_rg:
                return False
            if in_rg:
                flops.add("backward", "linear", 2 * tokens * lin.fan_in * lin.fan_out)
            if lin.lora_rank:
                r = lin.lora_rank
                flops.add("backward", "lora", 2 * tokens * r * lin.fan_out)  # grad of the rank-r activation
                if trains:
                    flops.add("backward", "lora", 2 * tokens * r * (lin.fan_in + lin.fan_out))  # dA, dB
                    if prox:
                        flops.add("forward", "proximal", 6 * r * r * (lin.fan_in + lin.fan_out))
                        flops.add("backward", "proximal", 6 * r * r * (lin.fan_in + lin.fan_out))
                if in_rg:
                    flops.add("backward", "lora", 2 * tokens * r * lin.fan_in)
            return True

        qkv_rg = [linear(by_kind[k], grad_in) for k in ATTN_IN if k in by_kind]
        attn_rg = any(qkv_rg)
        width = by_kind["q_proj"].fan_out
        attention = 4 * batch_size * seq_len * seq_len * width  # QK^T and PV, every query head
        flops.add("forward", "attention", attention)
        if attn_rg:  # dQ, dK, dV, dP and the recomputed scores: 2.5x the forward matmuls
            flops.add("backward", "attention", 5 * attention // 2)
        o_rg = linear(by_kind["o_proj"], attn_rg)
        mid_rg = grad_in or o_rg
        up_rg = any([linear(by_kind[k], mid_rg) for k in MLP_IN if k in by_kind])
        down_rg = linear(by_kind["down_proj"], up_rg)
        grad_in = mid_rg or down_rg
    head = plain.get_output_embeddings()
    head_flops = 2 * n_logits * head.in_features * head.out_features
    flops.add("forward", "lm_head", head_flops)
    if grad_in:
        flops.add("backward", "lm_head", head_flops)
    return flops


# ------------------------------------------------------------------------------------ torch's counter

def _sdpa_cpu(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _sdpa_cpu_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


def _cpu_attention_mapping() -> dict:
    """FLOP formulas for the CPU attention kernels, which torch's counter does not register (yet)."""
    ops = torch.ops.aten
    mapping = {}
    if hasattr(ops, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[ops._scaled_dot_product_flash_attention_for_cpu] = _sdpa_cpu
    if hasattr(ops, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        mapping[ops._scaled_dot_product_flash_attention_for_cpu_backward] = _sdpa_cpu_backward
    return mapping


def counted_flops(fn: Callable[[], object]) -> tuple[int, dict[str, int]]:
    """Run `fn` under torch's FlopCounterMode; (total FLOPs, FLOPs per aten op)."""
    counter = FlopCounterMode(display=False, custom_mapping=_cpu_attention_mapping())
    with counter:
        fn()
    per_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return counter.get_total_flops(), per_op


# -------------------------------------------------------------------------------------- matmul peak

def matmul_rate(shapes: Sequence[tuple[int, int, int]], seconds: float = 0.5,
                dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Achieved FLOP/s of C = A @ B per (m, k, n) shape, best of repeated timings, at the current threads."""
    out = {}
    for m, k, n in shapes:
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        a @ b  # warm-up: allocation and kernel choice
        best, spent = float("inf"), 0.0
        while spent < seconds:
            start = time.perf_counter()
            a @ b
            took = time.perf_counter() - start
            best, spent = min(best, took), spent + took
        out[f"{m}x{k}x{n}"] = 2.0 * m * k * n / best
    return out
