"""DP-SGD on the party's adapter LoRA with Opacus: per-sample clipping, Gaussian noise, Poisson sampling.

Each local step draws every one of the party's N examples independently with probability q = B/N, computes
per-sample gradients of the adapter LoRA (Opacus `GradSampleModule`, hooks mode: only LoRA `nn.Linear`
weights train, so no tied or buffered parameter is involved), clips each to norm C, sums them, adds
N(0, (sigma*C)^2) noise and divides by the expected batch size B (`DPOptimizer`, loss_reduction "mean").
A privacy accountant (RDP by default) kept for the party's whole life turns the (sigma, q, steps) history
into the epsilon spent for a fixed delta; that epsilon is a number the party may report, never data.

The proximal term (eps/2)||dW - dW_t||^2 is added to the gradient *after* clipping and noise. Its gradient
depends only on the current LoRA (itself the output of earlier private steps) and on the global LoRA received
from the owner, never on the party's examples, so adding it is post-processing of the Gaussian mechanism's
output and the accountant's bound still covers the whole run. Putting it inside the per-sample loss instead
would clip it together with the data gradient and distort both. AdamW's weight decay is post-processing too.

The model is wrapped for one round and unwrapped afterwards (hooks removed, Opacus attributes deleted),
because simulated parties share one model object with each other and the owner must never see stale hooks.
The model is never moved to another device while wrapped (opacus issue 820).

Randomness: the Poisson draws and the noise come from generators seeded by (secret seed, round, step), so a
restarted party that keeps its secret seed redoes a round exactly. The guarantee needs both the noise and
the draws to be unknown to whoever sees the updates, so that seed must stay on the party: by default it is
drawn from the OS; only the in-process simulation (no adversary) derives it from the run seed.
"""

from __future__ import annotations

import math
import secrets
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from errors import ConfigError
from learning.compressed_model import Manifest
from learning.forward import response_token_losses
from learning.lora import lora_state
from learning.settings import ACCOUNTANTS, DPSettings, LoraSettings, TrainSettings
from learning.settings import default_delta as default_delta  # re-exported: callers import it from here
from learning.training import (
    PartyTrainer,
    PartyUpdate,
    derive_seed,
    proximal_term,
)
from tasks.batching import poisson_round_batches
from tasks.prompts import TokenizedExample

# Per-round statistics that describe the privacy accounting only; everything else in a DP round's stats
# (losses, token counts) is computed from the private data and is not covered by the guarantee.
SHAREABLE_STATS = ("epsilon", "delta", "noise_multiplier", "sample_rate", "max_grad_norm", "accountant",
                   "dp_steps", "dp_steps_total", "accountant_history")
_OPACUS_ATTRS = ("grad_sample", "summed_grad", "_forward_counter", "_current_grad_sample", "_norm_sample")
_MODULE_ATTRS = ("activations", "max_batch_len")


def sample_rate_for(batch_size: int, n_examples: int) -> float:
    """Poisson sampling rate q = B/N (capped at 1: every example in every step)."""
    if n_examples < 1:
        raise ConfigError("DP training needs at least one example")
    return min(1.0, batch_size / n_examples)


class BudgetSpent(ConfigError):
    """The party's privacy budget (its target epsilon) does not allow another round."""


def noise_for_target(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                     accountant: str = "rdp") -> float:
    """The smallest noise multiplier (Opacus's binary search) that keeps `steps` steps within the budget."""
    from opacus.accountants.utils import get_noise_multiplier  # noqa: PLC0415 - opacus is slow to import

    try:
        with _quiet_accountant():
            return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                              sample_rate=sample_rate, steps=steps, accountant=accountant))
    except ValueError as exc:
        raise ConfigError(f"no noise multiplier reaches epsilon {target_epsilon} at delta {delta:g} in "
                          f"{steps} steps at sampling rate {sample_rate:.4g}: {exc}") from exc


@contextmanager
def _quiet_accountant() -> Iterator[None]:
    # The RDP bound warns when its best order is the largest one tried: the epsilon is then a valid but
    # loose upper bound, which is what a weak-noise run gets anyway; a warning every round is just noise.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        yield


class PrivacyLedger:
    """One party's privacy accountant over its whole life; its history is JSON, so a restart continues it."""

    def __init__(self, mechanism: str = "rdp", history: Sequence[Sequence[float]] = ()) -> None:
        from opacus.accountants import create_accountant  # noqa: PLC0415

        if mechanism not in ACCOUNTANTS:
            raise ConfigError(f"unknown DP accountant {mechanism!r} "
                              f"(expected one of {', '.join(ACCOUNTANTS)})")
        self.mechanism = mechanism
        self.accountant = create_accountant(mechanism=mechanism)
        for entry in history:
            if len(entry) != 3:
                raise ConfigError(f"DP accountant history entries are (noise, rate, steps), got {entry!r}")
            noise, rate, steps = float(entry[0]), float(entry[1]), int(entry[2])
            if noise < 0 or not 0 < rate <= 1 or steps < 0:
                raise ConfigError(f"invalid DP accountant history entry {entry!r}")
            self.accountant.history.append((noise, rate, steps))

    def step(self, noise_multiplier: float, sample_rate: float) -> None:
        self.accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)

    @property
    def steps(self) -> int:
        return sum(int(n) for _, _, n in self.accountant.history)

    @property
    def history(self) -> list[list[float]]:
        return [[float(s), float(q), int(n)] for s, q, n in self.accountant.history]

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far at this delta (0.0 before the first step; inf if a step had no noise)."""
        if not self.accountant.history:
            return 0.0
        if any(s == 0 and n > 0 for s, _, n in self.accountant.history):
            return math.inf
        with _quiet_accountant():
            return float(self.accountant.get_epsilon(delta=delta))

    def epsilon_after(self, delta: float, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """The epsilon this ledger would show after `steps` more steps (nothing is recorded)."""
        return PrivacyLedger(self.mechanism, [*self.history, [noise_multiplier, sample_rate, steps]]).epsilon(delta)

    def to_dict(self) -> dict[str, Any]:
        return {"mechanism": self.mechanism, "history": self.history}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PrivacyLedger:
        if not isinstance(d, Mapping) or not isinstance(d.get("history", []), list):
            raise ConfigError("DP accountant state: expected {'mechanism': ..., 'history': [...]}")
        return cls(d.get("mechanism", "rdp"), d.get("history", []))


# ------------------------------------------------------------------------------------ Opacus plumbing

def per_sample_ce(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each example's mean cross-entropy over its response tokens, shape [batch]."""
    out = response_token_losses(model, batch)
    n = batch["input_ids"].shape[0]
    token_loss = out.losses
    rows = out.positions[:, 0]
    total = torch.zeros(n, dtype=token_loss.dtype, device=token_loss.device).index_add(0, rows, token_loss)
    count = torch.bincount(rows, minlength=n).clamp(min=1).to(token_loss.dtype)
    return total / count


@contextmanager
def private_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, noise_multiplier: float,
                      max_grad_norm: float, expected_batch_size: int,
                      generator: torch.Generator | None = None) -> Iterator[Any]:
    """Wrap `model` with GradSampleModule (hooks) and `optimizer` with DPOptimizer for one round.

    Semantics: the loss must be the *mean over the batch actually drawn* of per-sample losses
    (loss_reduction "mean"): the hooks multiply the backprops by the drawn batch size, so each
    p.grad_sample[i] is the gradient of example i's own loss; DPOptimizer clips each to
    `max_grad_norm`, sums, adds N(0, (sigma*C)^2) and divides by `expected_batch_size` (not the drawn size,
    which would leak it). On exit every hook and Opacus attribute is removed from the model.
    Yields the DPOptimizer; call `pre_step()` then `original_optimizer.step()` to insert extra gradients.
    """
    from opacus import GradSampleModule  # noqa: PLC0415
    from opacus.optimizers import DPOptimizer  # noqa: PLC0415

    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True)
    try:
        dp_opt = DPOptimizer(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                             expected_batch_size=expected_batch_size, loss_reduction="mean",
                             generator=generator)
        with warnings.catch_warnings():
            # The first LoRA layer's input does not require grad; the hook still gets the output gradient,
            # which is all the per-sample Linear gradient needs.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            yield dp_opt
    finally:
        gsm._close()
        strip_opacus(model)


def strip_opacus(model: nn.Module) -> None:
    """Delete every attribute Opacus hangs on parameters and modules (hooks are removed by `_close`)."""
    for p in model.parameters():
        for attr in _OPACUS_ATTRS:
            if attr in p.__dict__:
                delattr(p, attr)
    for mod in model.modules():
        for attr in _MODULE_ATTRS:
            if attr in mod.__dict__:
                delattr(mod, attr)


def set_empty_grad_sample(params: Sequence[nn.Parameter]) -> None:
    """An empty Poisson draw: zero per-sample gradients, so the step releases noise only."""
    for p in params:
        p.grad_sample = p.detach().new_zeros((0, *p.shape))


def has_opacus_hooks(model: nn.Module) -> bool:
    """True if any module still carries Opacus's hook list or per-sample attributes."""
    if any(attr in p.__dict__ for p in model.parameters() for attr in _OPACUS_ATTRS):
        return True
    return any("autograd_grad_sample_hooks" in mod.__dict__ or any(a in mod.__dict__ for a in _MODULE_ATTRS)
               for mod in model.modules())


# ------------------------------------------------------------------------------------------ trainer

class DPPartyTrainer(PartyTrainer):
    """`PartyTrainer` with DP-SGD: Poisson batches of expected size B, clipped + noised adapter gradients.

    `rounds` is the number of rounds the party expects to train (a target epsilon is spent over
    rounds * local_steps steps). `ledger` continues a restored accountant; `run_from` is where this run starts
    in its history (a networked party's accountant spans every run on the same data: the target epsilon is
    this run's, `budget` caps the whole history); `secret_seed` (None: from the OS) seeds the Poisson draws and
    the noise and must not be shared; `fresh_noise` draws a new one from the OS every round (a networked
    party: a round run again releases new noise, and the accountant counts it).
    Each round's stats carry `epsilon` (spent so far, all rounds), `delta` and the accounting numbers;
    `shareable_stats` picks those out.
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
        dp: DPSettings,
        rounds: int,
        ledger: PrivacyLedger | None = None,
        secret_seed: int | None = None,
        layers_path: str = "model.layers",
        fresh_noise: bool = False,
        run_from: int = 0,
        budget: float | None = None,
    ) -> None:
        super().__init__(name, model, manifest, data, pad_id, lora, settings, seed, layers_path,
                         own_randomness=fresh_noise)
        if rounds < 1:
            raise ConfigError("DP training needs the number of rounds (at least 1)")
        self.dp = dp
        self.rounds = rounds
        self.delta = dp.resolve_delta(self.n_examples)
        self.sample_rate = sample_rate_for(settings.batch_size, self.n_examples)
        self.ledger = ledger if ledger is not None else PrivacyLedger(dp.accountant)
        if self.ledger.mechanism != dp.accountant:
            raise ConfigError(f"restored DP accountant is {self.ledger.mechanism!r}, settings ask for "
                              f"{dp.accountant!r}")
        self.run_from, self.budget = run_from, budget
        self.secret_seed = secrets.randbits(63) if secret_seed is None else int(secret_seed)
        self.fresh_noise = fresh_noise  # a new OS secret every round: no rerun can replay a draw or its noise
        if dp.noise_multiplier is not None:
            self.noise_multiplier = float(dp.noise_multiplier)
        else:
            self.noise_multiplier = noise_for_target(dp.target_epsilon, self.delta, self.sample_rate,
                                                     rounds * settings.local_steps, dp.accountant)

    @property
    def epsilon(self) -> float:
        return self.ledger.epsilon(self.delta)

    def state_dict(self) -> dict[str, Any]:
        """What a party persists to continue after a restart (keep it local: it holds the secret seed)."""
        return {"ledger": self.ledger.to_dict(), "secret_seed": self.secret_seed}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        ledger = PrivacyLedger.from_dict(state["ledger"])
        if ledger.mechanism != self.dp.accountant:
            raise ConfigError(f"restored DP accountant is {ledger.mechanism!r}, settings ask for "
                              f"{self.dp.accountant!r}")
        self.ledger, self.secret_seed = ledger, int(state["secret_seed"])

    def check_budget(self, steps: int) -> None:
        """Refuse a round that would spend more than this run's target epsilon (the noise was sized for the
        rounds planned at the start; a retried round or a run extended on resume would otherwise overspend), or
        more than the party's budget over every run on its data."""
        step = (self.noise_multiplier, self.sample_rate, steps)
        if self.budget is not None:
            after = self.ledger.epsilon_after(self.delta, *step)
            if after > self.budget * (1 + 1e-9):
                raise BudgetSpent(f"{self.name}: another round would bring the epsilon spent on this data, over "
                                  f"every run, from {self.epsilon:.3f} to {after:.3f}, past the budget "
                                  f"{self.budget:g} (delta {self.delta:.2g}); this party trains no more")
        if self.dp.target_epsilon is None:
            return
        run = PrivacyLedger(self.ledger.mechanism, self.ledger.history[self.run_from:])
        after = run.epsilon_after(self.delta, *step)
        if after > self.dp.target_epsilon * (1 + 1e-9):
            raise BudgetSpent(f"{self.name}: another round would bring this run's epsilon from "
                              f"{run.epsilon(self.delta):.3f} to {after:.3f}, past the target "
                              f"{self.dp.target_epsilon:g} (delta {self.delta:.2g}); this party trains no more")

    def privacy_report(self) -> dict[str, Any]:
        return {"epsilon": self.epsilon, "delta": self.delta, "noise_multiplier": self.noise_multiplier,
                "sample_rate": self.sample_rate, "max_grad_norm": self.dp.max_grad_norm,
                "accountant": self.ledger.mechanism, "dp_steps_total": self.ledger.steps}

    @staticmethod
    def shareable_stats(stats: Mapping[str, Any]) -> dict[str, Any]:
        """The accounting numbers of a round's stats: what a networked party may send to the owner."""
        return {k: stats[k] for k in SHAREABLE_STATS if k in stats}

    def _generator(self, device: torch.device, *labels: object) -> torch.Generator:
        seed = derive_seed(self.secret_seed, self.name, *labels)
        return torch.Generator(device=device).manual_seed(seed)

    def train_round(
        self,
        round_idx: int,
        adapter_state: Mapping[str, torch.Tensor],
        emulator_state: Mapping[str, torch.Tensor],
        progress: Callable[[dict], None] | None = None,
    ) -> PartyUpdate:
        """Load the global LoRA, run K DP-SGD steps on the adapter LoRA, return it with the epsilon spent."""
        start = time.perf_counter()
        s, dp = self.settings, self.dp
        self.check_budget(s.local_steps)
        if self.fresh_noise:
            self.secret_seed = secrets.randbits(63)
        params, pairs = self.load_global(adapter_state, emulator_state)
        batches = poisson_round_batches(self.data, round_idx, s.local_steps, self.sample_rate,
                                        derive_seed(self.secret_seed, self.name, "poisson"), self.pad_id)
        losses: list[float] = []
        tokens = drawn = 0
        self.model.train()
        try:
            noise_gen = self._generator(params[0].device, "noise", round_idx)  # noise is drawn on p's device
            with private_optimizer(self.model, self.make_optimizer(params), self.noise_multiplier,
                                   dp.max_grad_norm, s.batch_size, noise_gen) as opt:
                for step, batch in enumerate(batches):
                    opt.zero_grad(set_to_none=True)
                    if batch is None:
                        set_empty_grad_sample(params)
                    else:
                        per_sample = per_sample_ce(self.model, batch)
                        per_sample.mean().backward()
                        losses.append(float(per_sample.detach().mean()))
                        tokens += int(batch["attention_mask"].sum())
                        drawn += int(batch["input_ids"].shape[0])
                    opt.pre_step()  # clip per sample, sum, add noise, divide by B: the private gradient
                    if s.prox_eps:
                        self._add_proximal_gradient(params, pairs, adapter_state)
                    opt.original_optimizer.step()
                    self.ledger.step(self.noise_multiplier, self.sample_rate)
                    if progress and batch is not None:
                        progress({"party": self.name, "round": round_idx, "step": step + 1,
                                  "steps": len(batches), "loss": losses[-1]})
        finally:
            self.model.eval()
            for p in params:
                p.grad = None
                p.requires_grad_(False)
        seconds = time.perf_counter() - start
        nan = float("nan")
        stats = {
            "loss_first": losses[0] if losses else nan, "loss_last": losses[-1] if losses else nan,
            "loss_mean": sum(losses) / len(losses) if losses else nan,
            "steps": len(batches), "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "examples_drawn": drawn, "empty_steps": sum(b is None for b in batches),
            "dp_steps": len(batches), **self.privacy_report(), "accountant_history": self.ledger.history,
        }
        return PartyUpdate(self.name, lora_state(self.model, self.manifest.adapter_layers),
                           self.n_examples, stats)

    def _add_proximal_gradient(self, params: Sequence[nn.Parameter],
                               pairs: Mapping[str, tuple[nn.Parameter, nn.Parameter]],
                               reference: Mapping[str, torch.Tensor]) -> None:
        """p.grad += grad of (eps/2)||dW - dW_t||^2: data-independent, so added after privatisation."""
        prox = 0.5 * self.settings.prox_eps * proximal_term(pairs, reference, self.lora.scale)
        grads = torch.autograd.grad(prox, list(params), allow_unused=True)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                if g is not None:
                    p.grad.add_(g)
