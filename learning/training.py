"""Local adapter training on a party (paper Eq. 6, 9, 10).

Each round a party receives the global adapter and emulator LoRA, trains only the adapter LoRA for K steps of
batch B on its private data, and returns the adapter LoRA. The objective is cross-entropy on response tokens
plus (eps/2) * sum ||dW - dW_t||^2 over adapter modules, where dW = scale * B @ A is the full-size LoRA delta
and dW_t the one received this round. The proximal term is computed from r x r Gram matrices, so it never
materialises a d x d matrix and its gradient is exact.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from errors import ConfigError
from learning.compressed_model import Manifest
from learning.forward import loss_scaler, response_token_losses
from learning.lora import load_lora_state, lora_state, set_trainable
from learning.seeds import derive_seed
from learning.settings import LoraSettings, TrainSettings
from tasks.batching import round_batches
from tasks.prompts import TokenizedExample

_LORA_PARAM = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")


@dataclass
class PartyUpdate:
    """What a party returns after a round: its adapter LoRA, its data size (the FedAvg weight), statistics."""

    name: str
    adapter_state: dict[str, torch.Tensor]
    n_examples: int
    stats: dict = field(default_factory=dict)


def live_lora_pairs(model: nn.Module, layer_names: Sequence[str]) -> dict[str, tuple[nn.Parameter, nn.Parameter]]:
    """Map each LoRA-wrapped module (canonical name) in the given layers to its live (A, B) parameters."""
    found: dict[str, dict[str, nn.Parameter]] = {}
    for name, param in model.named_parameters():
        name = name.replace("_module.", "").replace("base_model.model.", "", 1)
        match = _LORA_PARAM.match(name)
        if match and any(match["module"].startswith(prefix + ".") for prefix in layer_names):
            found.setdefault(match["module"], {})[match["which"]] = param
    return {m: (p["A"], p["B"]) for m, p in sorted(found.items())}


def proximal_term(
    pairs: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    reference: Mapping[str, torch.Tensor],
    scale: float,
) -> torch.Tensor:
    """sum over modules of ||scale*(B A - B_t A_t)||_F^2, via r x r Gram matrices.

    ||BA - B_t A_t||^2 = <B^T B, A A^T> - 2 <B^T B_t, A A_t^T> + <B_t^T B_t, A_t A_t^T>.
    """
    total: torch.Tensor | None = None
    for module, (a, b) in pairs.items():
        a_t = reference[f"{module}.lora_A.weight"].to(a.device, a.dtype)
        b_t = reference[f"{module}.lora_B.weight"].to(b.device, b.dtype)
        value = (
            ((b.T @ b) * (a @ a.T)).sum()
            - 2 * ((b.T @ b_t) * (a @ a_t.T)).sum()
            + ((b_t.T @ b_t) * (a_t @ a_t.T)).sum()
        )
        total = value if total is None else total + value
    if total is None:
        raise ConfigError("no LoRA modules found for the proximal term")
    return (scale**2) * total


def layer_prefixes(layers_path: str, layers: Sequence[int]) -> list[str]:
    return [f"{layers_path}.{i}" for i in layers]


class PartyTrainer:
    """Trains the adapter LoRA of a compressed model on one party's data, one round at a time.

    The model may be shared by several simulated parties: every round starts by loading the global LoRA.
    Randomness (batch order, LoRA dropout): in process it follows the run seed, so a run repeats exactly; a
    networked party (`own_randomness`) draws a new secret from the OS every round, so the owner can neither
    predict it nor make a rerun repeat it: two runs from the same state never yield the same update.
    """

    def __init__(
        self,
        name: str,
        model: nn.Module,
        manifest: Manifest,
        data: Sequence[TokenizedExample],
        pad_id: int,
        lora: LoraSettings,
        settings: TrainSettings,
        seed: int,
        layers_path: str = "model.layers",
        own_randomness: bool = False,
    ) -> None:
        if not data:
            raise ConfigError(f"party {name} has no training examples")
        self.name = name
        self.model = model
        self.manifest = manifest
        self.data = list(data)
        self.pad_id = pad_id
        self.lora = lora
        self.settings = settings
        self.seed = derive_seed(seed, "party", name)
        self.own_randomness = own_randomness
        self.adapter_prefixes = layer_prefixes(layers_path, manifest.adapter_layers)
        self.step_hook: Callable[[torch.Tensor], None] | None = None
        self.fold_emulator = True  # the emulator LoRA is frozen here: fold it into the weights (load_lora_state)
        self.scaler = loss_scaler(model)  # float16 weights: the loss scale, kept across rounds

    @property
    def n_examples(self) -> int:
        return len(self.data)

    def make_optimizer(self, params: Sequence[nn.Parameter]) -> torch.optim.Optimizer:
        s = self.settings
        return torch.optim.AdamW(params, lr=s.lr, betas=s.betas, weight_decay=s.weight_decay)

    def load_global(self, adapter_state: Mapping[str, torch.Tensor], emulator_state: Mapping[str, torch.Tensor]
                    ) -> tuple[list[nn.Parameter], dict[str, tuple[nn.Parameter, nn.Parameter]]]:
        """Start of a round: load the global LoRA (the frozen emulator's folded into the weights), make only
        the adapter LoRA trainable; returns its parameters and the (A, B) pairs the proximal term reads."""
        load_lora_state(self.model, emulator_state, self.manifest.emulator_layers, fold=self.fold_emulator)
        load_lora_state(self.model, adapter_state, self.manifest.adapter_layers)
        params = set_trainable(self.model, self.manifest.adapter_layers)
        return params, live_lora_pairs(self.model, self.adapter_prefixes)

    def loss(self, batch: dict[str, torch.Tensor], reference: Mapping[str, torch.Tensor],
             pairs: Mapping[str, tuple[nn.Parameter, nn.Parameter]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(total loss, cross-entropy part) for one batch."""
        ce = response_token_losses(self.model, batch).losses.mean()
        if self.settings.prox_eps == 0:
            return ce, ce
        prox = proximal_term(pairs, reference, self.lora.scale)
        return ce + 0.5 * self.settings.prox_eps * prox, ce

    def train_round(
        self,
        round_idx: int,
        adapter_state: Mapping[str, torch.Tensor],
        emulator_state: Mapping[str, torch.Tensor],
        progress: Callable[[dict], None] | None = None,
    ) -> PartyUpdate:
        """Load the global LoRA, run K local steps on the adapter LoRA, return the new adapter LoRA."""
        start = time.perf_counter()
        params, pairs = self.load_global(adapter_state, emulator_state)
        optimizer = self.make_optimizer(params)
        s = self.settings
        seed = self.seed
        if self.own_randomness:
            seed = secrets.randbits(63)
            torch.manual_seed(derive_seed(seed, "dropout"))  # a party process: its global generator is its own
        batches = round_batches(self.data, round_idx, s.local_steps, s.batch_size, seed, self.pad_id)
        self.model.train()
        losses: list[float] = []
        tokens = 0
        for step, batch in enumerate(batches):
            optimizer.zero_grad(set_to_none=True)
            total, ce = self.loss(batch, adapter_state, pairs)
            self.scaler.scale(total).backward()
            self.scaler.unscale_(optimizer)  # clipping and the step see the true gradient
            if s.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
            self.scaler.step(optimizer)  # skipped when a float16 gradient overflowed
            self.scaler.update()
            losses.append(float(ce.detach()))
            tokens += int(batch["attention_mask"].sum())
            if progress:
                progress({"party": self.name, "round": round_idx, "step": step + 1,
                          "steps": len(batches), "loss": losses[-1]})
        self.model.eval()
        for p in params:
            p.requires_grad_(False)
        seconds = time.perf_counter() - start
        stats = {
            "loss_first": losses[0], "loss_last": losses[-1], "loss_mean": sum(losses) / len(losses),
            "steps": len(losses), "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
        }
        return PartyUpdate(self.name, lora_state(self.model, self.manifest.adapter_layers),
                           self.n_examples, stats)
