"""Batched text generation for the evaluations: left padding, length-sorted batches, stop strings.

Evaluation prompts (8-shot GSM8K, HumanEval function headers) make a model run on past the answer into
a new question or a new function, so every sequence stops as soon as one of the evaluation's stop
strings appears in its *new* text, the batch stops once every sequence has, and the returned text is
cut at the first stop string. Sorting prompts by token length keeps padding (wasted compute) small.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Sequence

import torch
from tqdm import tqdm
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from errors import ConfigError
from tasks.prompts import pad_id_of


def truncate_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """`text` up to (not including) the earliest occurrence of any stop string."""
    cut = len(text)
    for stop in stop_strings:
        if stop:
            at = text.find(stop)
            if 0 <= at < cut:
                cut = at
    return text[:cut]


class StopOnStrings(StoppingCriteria):
    """Marks a sequence finished once a stop string appears in the text generated after the prompt.

    The whole new text is decoded at each step (not only the last token), so a stop string split over
    several tokens, or produced by a token that also carries other characters, is still caught.
    """

    def __init__(self, tokenizer, prompt_length: int, stop_strings: Sequence[str]):
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length
        self.stop_strings = [s for s in stop_strings if s]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length:], skip_special_tokens=True)
        done = [any(stop in text for stop in self.stop_strings) for text in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _model_device(model) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


def _encode(tokenizer, prompt: str) -> list[int]:
    """Token ids of a prompt; the tokenizer's special tokens (BOS) are added unless the prompt already
    starts with the BOS text, as prompts rendered by a chat template do."""
    bos = getattr(tokenizer, "bos_token", None)
    add_special = not (bos and prompt.startswith(bos))
    return tokenizer(prompt, add_special_tokens=add_special)["input_ids"]


def _generation_config(model, tokenizer, *, max_new_tokens: int, greedy: bool, temperature: float,
                       top_p: float, pad_token_id: int) -> GenerationConfig:
    """The model's own generation config (keeps its EOS ids) with the evaluation's decoding settings."""
    base = getattr(model, "generation_config", None)
    config = copy.deepcopy(base) if base is not None else GenerationConfig()
    config.max_new_tokens = max_new_tokens
    config.max_length = None
    config.pad_token_id = pad_token_id
    if config.eos_token_id is None and tokenizer.eos_token_id is not None:
        config.eos_token_id = tokenizer.eos_token_id
    if greedy:
        config.do_sample = False
        config.temperature = None
        config.top_p = None
        config.top_k = None
    else:
        config.do_sample = True
        config.temperature = temperature
        config.top_p = top_p
        config.top_k = None
    config.num_return_sequences = 1
    return config


def generate_batched(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int,
    stop_strings: Sequence[str] = (),
    greedy: bool = True,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
    progress: bool = True,
    desc: str = "generate",
) -> list[str]:
    """Generate a continuation for every prompt, in the prompts' order, each cut at its first stop string.

    Runs on the model's device. Sampling (``greedy=False``) draws from a generator seeded by `seed`
    inside a forked RNG state, so the caller's global RNG is untouched and runs repeat exactly.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if not greedy and temperature <= 0:
        raise ConfigError(f"sampling needs a temperature > 0, got {temperature}")
    if not prompts:
        return []

    pad_id = pad_id_of(tokenizer)
    device = _model_device(model)
    config = _generation_config(model, tokenizer, max_new_tokens=max_new_tokens, greedy=greedy,
                                temperature=temperature, top_p=top_p, pad_token_id=pad_id)

    encoded = [_encode(tokenizer, p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]), reverse=True)
    results: list[str] = [""] * len(prompts)

    rng_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices, enabled=seed is not None), torch.inference_mode(), \
            tqdm(total=len(prompts), desc=desc, unit="seq", file=sys.stderr, disable=not progress,
                 dynamic_ncols=True) as bar:
        if seed is not None:
            torch.manual_seed(seed)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            width = max(len(encoded[i]) for i in idx)
            input_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):  # left padding: the last prompt token is the last column
                ids = encoded[i]
                input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
                attention[row, width - len(ids):] = 1
            criteria = StoppingCriteriaList()
            if stop_strings:
                criteria.append(StopOnStrings(tokenizer, width, stop_strings))
            out = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention.to(device),
                generation_config=config,
                stopping_criteria=criteria,
            )
            texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
            for i, text in zip(idx, texts, strict=True):
                results[i] = truncate_at_stop(text, stop_strings)
            bar.update(len(idx))
    return results
