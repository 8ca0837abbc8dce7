"""Generate with an exported adapter using only transformers + peft, as any user of the result would.

    python -m owner.generate --adapter runs/x/adapfu --prompt "What is 12 * 7?" [--device auto] [--dtype auto]

The base model loads on `--device` in `--dtype` (auto: a CUDA GPU when present, bfloat16 where it computes it
natively; `learning.hardware`), the adapter's LoRA beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from errors import FedbiotError, ModelError, first_line
from learning.hardware import DEVICES, DTYPES, Hardware, resolve_hardware
from tasks.prompts import pad_id_of


def _base_of(adapter: Path) -> str:
    config_path = adapter / "adapter_config.json"
    if not adapter.is_dir():
        raise ModelError(f"adapter directory {adapter} does not exist")
    if not config_path.is_file():
        raise ModelError(f"{adapter} is not an adapter directory (no adapter_config.json)")
    try:
        base = json.loads(config_path.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, json.JSONDecodeError, AttributeError) as e:
        raise ModelError(f"cannot read {config_path}: {e}") from None
    if not isinstance(base, str) or not base:
        raise ModelError(f"{config_path} names no base_model_name_or_path")
    return base


def generate(adapter: Path, prompt: str, max_new_tokens: int = 128, hardware: Hardware | None = None) -> str:
    """Greedy answer of base model + adapter to `prompt` (chat template applied when there is one), the base
    model on `hardware`'s device and in its dtype (default: float32 on the CPU)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hardware = hardware or Hardware(torch.device("cpu"), torch.float32)
    base = _base_of(adapter)
    try:
        tokenizer = AutoTokenizer.from_pretrained(base)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=hardware.dtype, device_map={"": str(hardware.device)})
        model = PeftModel.from_pretrained(model, str(adapter)).eval()
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelError(f"cannot load base {base} with adapter {adapter}: {first_line(e)}") from None
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    else:
        inputs = tokenizer(prompt, return_tensors="pt")
    pad = pad_id_of(tokenizer)
    inputs = inputs.to(hardware.device)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m owner.generate",
        description="Generate with an exported FedBiOT adapter (AdapFu/AdapEmu).")
    parser.add_argument("--adapter", type=Path, required=True, help="exported adapter directory")
    parser.add_argument("--prompt", required=True, help="the user prompt")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--device", default="auto", help=f"{DEVICES} (auto: a CUDA GPU when present)")
    parser.add_argument("--dtype", default="auto", choices=("auto", *DTYPES),
                        help="the base model's precision (auto: bfloat16 where the device computes it natively)")
    parser.add_argument("--verbose", action="store_true", help="let libraries print their bars and warnings")
    args = parser.parse_args(argv)
    if not args.verbose:
        from console.terminal import quiet_libraries  # noqa: PLC0415

        quiet_libraries()
    if args.max_new_tokens < 1:
        print("error: --max-new-tokens must be >= 1", file=sys.stderr)
        return 2
    try:
        print(generate(args.adapter, args.prompt, args.max_new_tokens, resolve_hardware(args.device, args.dtype)))
    except FedbiotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
