"""Building a party: the compressed checkpoint loaded as a party receives it, LoRA attached with the run's
seed, data tokenised, and the trainer the party chose (plain or DP-SGD). The networked party, the
in-process run and the benchmarks build parties here and nowhere else."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from errors import ConfigError
from learning.compressed_model import Manifest, load_compressed
from learning.hardware import Hardware
from learning.lora import LoraSettings, initial_lora, lora_state_spec
from learning.training import PartyTrainer, TrainSettings
from tasks.datasets import Example
from tasks.prompts import TokenizedExample, pad_id_of, tokenize_examples

QUANTIZE = ("int8", "nf4")


def quantization_config(quantize: str | None, hardware: Hardware):
    """transformers' BitsAndBytesConfig for a party's frozen weights, or None (no quantisation)."""
    if quantize is None:
        return None
    if quantize not in QUANTIZE:
        raise ConfigError(f"unknown --quantize {quantize!r}: expected {' or '.join(QUANTIZE)}")
    try:
        import bitsandbytes  # noqa: F401, PLC0415 - an optional extra
    except ImportError:
        raise ConfigError(f"--quantize {quantize} needs bitsandbytes: pip install 'fedbiot[quantize]'") from None
    from transformers import BitsAndBytesConfig  # noqa: PLC0415

    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=hardware.dtype)


@dataclass
class PartyModel:
    """A compressed model as a party trains it: LoRA on every emulator and adapter layer, all frozen."""

    model: PeftModel
    tokenizer: Any
    manifest: Manifest
    pad_id: int
    load_s: float = 0.0

    @classmethod
    def load(cls, model_dir: str | Path, lora: LoraSettings, seed: int, hardware: Hardware | None = None,
             quantize: str | None = None, device_map: str | Mapping | None = None,
             max_memory: Mapping | None = None) -> PartyModel:
        """Load the checkpoint the owner shipped (frozen weights on the given device and dtype, or
        quantised: `int8` / `nf4`; spread over this machine's devices by `device_map` / `max_memory`, as
        `party --device-map` asks) and attach the run's initial LoRA (`initial_lora`: every party and the owner
        draw the same initial A matrices). LoRA parameters are float32 whatever the frozen weights are."""
        start = time.perf_counter()
        hardware = hardware or Hardware(torch.device("cpu"), torch.float32)
        model, tokenizer, manifest = load_compressed(model_dir, hardware.dtype, hardware.device,
                                                     quantization_config(quantize, hardware), device_map,
                                                     max_memory)
        peft_model = initial_lora(model, manifest, lora, seed)
        return cls(peft_model, tokenizer, manifest, pad_id_of(tokenizer), time.perf_counter() - start)

    def tokenize(self, examples: Sequence[Example], max_length: int, template: str, what: str = ""
                 ) -> list[TokenizedExample]:
        return tokenize_examples(examples, self.tokenizer, max_length, template, what=what, use="training")

    def part_specs(self) -> tuple[dict, dict]:
        """Names -> (shape, dtype) of the adapter and of the emulator LoRA state a round carries."""
        return (lora_state_spec(self.model, self.manifest.adapter_layers),
                lora_state_spec(self.model, self.manifest.emulator_layers))

    def trainer(self, name: str, data: Sequence[TokenizedExample], lora: LoraSettings, train: TrainSettings,
                seed: int, *, dp=None, rounds: int = 0, ledger=None, secret_seed: int | None = None,
                dp_state: dict | None = None, own_randomness: bool = False, run_from: int = 0,
                budget: float | None = None) -> PartyTrainer:
        """A plain trainer, or a DP-SGD one when `dp` (DPSettings) is given; `ledger` / `dp_state` resume its
        privacy accountant, `secret_seed` fixes its noise (only the in-process run may: see learning.dp);
        `own_randomness`: batch order, dropout and DP draws from a new OS secret every round (a networked
        party); `run_from` / `budget`: where this run starts in a restored accountant's history, and the most
        epsilon the whole history may reach (`learning.dp.DPPartyTrainer`)."""
        if dp is None:
            return PartyTrainer(name, self.model, self.manifest, data, self.pad_id, lora, train, seed,
                                own_randomness=own_randomness)
        from learning.dp import DPPartyTrainer  # noqa: PLC0415 - opacus only when DP is on

        trainer = DPPartyTrainer(name, self.model, self.manifest, data, self.pad_id, lora, train, seed, dp=dp,
                                 rounds=rounds, ledger=ledger, secret_seed=secret_seed, fresh_noise=own_randomness,
                                 run_from=run_from, budget=budget)
        if dp_state is not None:
            trainer.load_state_dict(dp_state)
        return trainer
