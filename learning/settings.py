"""The settings of a run's learning, as plain dataclasses: LoRA (`LoraSettings`), a party's local training
(`TrainSettings`) and DP-SGD (`DPSettings`). They live apart from the code that uses them (`learning.lora`,
`learning.training`, `learning.dp`, which import torch, peft and opacus) so that the command-line options,
whose defaults are these fields', parse and report an error without loading any of that.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from errors import ConfigError


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyperparameters (paper: r=8, alpha=16). target_modules=None: every Linear in a decoder layer."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float) or self.alpha <= 0:
            raise ConfigError(f"LoRA alpha must be positive, got {self.alpha!r}")
        if not isinstance(self.dropout, int | float) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if self.target_modules is not None:
            if isinstance(self.target_modules, str) or not all(
                    isinstance(t, str) and t for t in self.target_modules) or not self.target_modules:
                raise ConfigError("LoRA target_modules must be a non-empty list of module names")
            object.__setattr__(self, "target_modules", tuple(self.target_modules))

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def to_dict(self) -> dict[str, Any]:
        return {"r": self.r, "alpha": self.alpha, "dropout": self.dropout,
                "target_modules": None if self.target_modules is None else list(self.target_modules)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LoraSettings:
        if not isinstance(d, Mapping):
            raise ConfigError("LoRA settings: expected an object")
        unknown = set(d) - {"r", "alpha", "dropout", "target_modules"}
        if unknown:
            raise ConfigError(f"LoRA settings: unknown fields {sorted(unknown)}")
        targets = d.get("target_modules")
        if targets is not None and (isinstance(targets, str) or not isinstance(targets, list | tuple)):
            raise ConfigError("LoRA settings: target_modules must be a list of names or null")
        return cls(r=d.get("r", 8), alpha=d.get("alpha", 16), dropout=d.get("dropout", 0.0),
                   target_modules=None if targets is None else tuple(targets))


@dataclass(frozen=True)
class TrainSettings:
    """A party's local optimisation settings (paper: K=30 steps of batch 10, AdamW betas (0.9, 0.95))."""

    local_steps: int = 8
    batch_size: int = 4
    lr: float = 8e-3  # FedBiOT's best on validation at beta 0.2 over 1e-3 .. 1.6e-2 (docs/results/accuracy-gsm8k.md)
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    prox_eps: float = 0.0  # eps 0 beat 0.01 on GSM8K at beta 0.2, paired over 5 seeds (docs/results.md)
    max_grad_norm: float | None = 1.0

    def __post_init__(self) -> None:
        if self.local_steps < 1 or self.batch_size < 1:
            raise ConfigError("local steps and batch size must be at least 1")
        if self.lr <= 0 or self.prox_eps < 0:
            raise ConfigError("learning rate must be > 0 and the proximal weight >= 0")

    def to_dict(self) -> dict:
        """JSON types only (betas as a list): the settings travel to networked parties."""
        return {**asdict(self), "betas": list(self.betas)}

    @classmethod
    def from_dict(cls, data: Mapping) -> TrainSettings:
        data = dict(data)
        data["betas"] = tuple(data.get("betas", (0.9, 0.95)))
        return cls(**data)


ACCOUNTANTS = ("rdp", "prv")
DEFAULT_DELTA_CAP = 1e-5


def default_delta(n_examples: int) -> float:
    """min(1e-5, N^-1.1): the usual 1e-5, but always below 1/N so that leaking one record is never 'cheap'."""
    return min(DEFAULT_DELTA_CAP, float(n_examples) ** -1.1)


@dataclass(frozen=True)
class DPSettings:
    """A party's DP-SGD settings: exactly one of a noise multiplier or a target epsilon for the whole run.

    delta=None means `default_delta(N)` for a party with N examples.
    """

    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float | None = None
    max_grad_norm: float = 1.0
    accountant: str = "rdp"

    def __post_init__(self) -> None:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ConfigError("DP needs exactly one of a noise multiplier (--dp-noise) or a target epsilon "
                              "(--dp-epsilon)")
        if self.noise_multiplier is not None and not (_finite(self.noise_multiplier) and
                                                      self.noise_multiplier >= 0):
            raise ConfigError(f"the DP noise multiplier must be >= 0, got {self.noise_multiplier!r}")
        if self.target_epsilon is not None and not (_finite(self.target_epsilon) and self.target_epsilon > 0):
            raise ConfigError(f"the DP target epsilon must be > 0, got {self.target_epsilon!r}")
        if self.delta is not None and not (_finite(self.delta) and 0 < self.delta < 1):
            raise ConfigError(f"the DP delta must be in (0, 1), got {self.delta!r}")
        if not (_finite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ConfigError(f"the DP clipping norm must be > 0, got {self.max_grad_norm!r}")
        if self.accountant not in ACCOUNTANTS:
            raise ConfigError(f"the DP accountant must be one of {', '.join(ACCOUNTANTS)}, "
                              f"not {self.accountant!r}")

    def resolve_delta(self, n_examples: int) -> float:
        return self.delta if self.delta is not None else default_delta(n_examples)

    def to_dict(self) -> dict[str, Any]:
        return {"noise_multiplier": self.noise_multiplier, "target_epsilon": self.target_epsilon,
                "delta": self.delta, "max_grad_norm": self.max_grad_norm, "accountant": self.accountant}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DPSettings:
        if not isinstance(d, Mapping):
            raise ConfigError("DP settings: expected an object")
        unknown = set(d) - {"noise_multiplier", "target_epsilon", "delta", "max_grad_norm", "accountant"}
        if unknown:
            raise ConfigError(f"DP settings: unknown fields {sorted(unknown)}")
        return cls(**d)


def _finite(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)
