"""The run settings a party receives from the owner (WELCOME): everything it needs to train exactly as the
owner's run expects, typed and checked on arrival, so a malformed field is refused in one place."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from errors import ConfigError
from learning.settings import LoraSettings, TrainSettings
from tasks.prompts import TEMPLATES


@dataclass(frozen=True)
class PartyRunSettings:
    run_id: str
    seed: int
    rounds: int
    max_length: int
    template: str
    lora: LoraSettings
    train: TrainSettings
    secure_agg: bool

    def to_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "seed": self.seed, "rounds": self.rounds, "max_length": self.max_length,
                "template": self.template, "lora": self.lora.to_dict(), "train": self.train.to_dict(),
                "secure_agg": self.secure_agg}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PartyRunSettings:
        """Parse what the owner sent; anything missing, unknown or of the wrong type is a ConfigError."""
        if not isinstance(d, Mapping):
            raise ConfigError("run settings: expected an object")
        fields = {"run_id", "seed", "rounds", "max_length", "template", "lora", "train", "secure_agg"}
        if set(d) != fields:
            missing, unknown = sorted(fields - set(d)), sorted(set(d) - fields)
            raise ConfigError(f"run settings: missing {missing}, unknown {unknown}")
        for key in ("seed", "rounds", "max_length"):
            if isinstance(d[key], bool) or not isinstance(d[key], int) or d[key] < (0 if key == "seed" else 1):
                raise ConfigError(f"run settings: {key} must be a {'non-negative' if key == 'seed' else 'positive'} "
                                  f"integer, got {d[key]!r}")
        if not isinstance(d["run_id"], str) or not d["run_id"]:
            raise ConfigError("run settings: run_id must be a non-empty string")
        if d["template"] not in TEMPLATES:
            raise ConfigError(f"run settings: unknown template {d['template']!r}")
        if not isinstance(d["secure_agg"], bool):
            raise ConfigError("run settings: secure_agg must be true or false")
        if not isinstance(d["train"], Mapping):
            raise ConfigError("run settings: train must be an object")
        try:
            train = TrainSettings.from_dict(d["train"])
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"run settings: bad training settings: {exc}") from None
        return cls(run_id=d["run_id"], seed=d["seed"], rounds=d["rounds"], max_length=d["max_length"],
                   template=d["template"], lora=LoraSettings.from_dict(d["lora"]), train=train,
                   secure_agg=d["secure_agg"])
