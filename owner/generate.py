"""Generate with an exported adapter using only transformers + peft, as any user of the result would.

    python -m owner.generate --adapter runs/x/adapfu --prompt "What is 12 * 7?" [--device auto] [--dtype auto]

The base is the one adapter_config.json names, loaded as `owner --model` loads a model (a hub id, a checkpoint
directory, a .gguf file); an adapter trained on the embedded default model gets the embedded weights it was
trained on when they are installed (its card says so), and `--base` names another. It loads on `--device` in
`--dtype` (auto: a CUDA GPU when present, bfloat16 where it computes it natively; `learning.hardware`). The
prompt is put in the format the adapter was trained in (its card's `fedbiot.template`; else the tokenizer's chat
template when it has one), with the tokenizer saved beside the adapter.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from errors import ConfigError, ModelError, first_line
from learning.hardware import DEVICES, DTYPES, Hardware, resolve_hardware
from tasks.prompts import pad_id_of


def adapter_base(adapter: Path) -> str:
    """The base model adapter_config.json names."""
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


def base_spec(adapter: Path, base: str | None = None) -> str | None:
    """What to load as the adapter's base, as `owner --model` takes it (None: the embedded default): `base` when
    given; the embedded weights for an adapter trained on them, when installed; an AdapEmu's compressed model
    beside it when the path it names is not there (the run directory was moved); else the name it gives."""
    from owner.model_card import EMBEDDED_WEIGHTS, card_metadata  # noqa: PLC0415
    from owner.models import default_gguf_path  # noqa: PLC0415

    named = adapter_base(adapter)
    if base:
        return base
    meta = card_metadata(adapter / "README.md")
    if meta.get("base_weights") == EMBEDDED_WEIGHTS:
        try:
            default_gguf_path()
            return None
        except ModelError:
            pass  # not installed here: the hub model it names
    sibling = adapter.parent / "compressed"
    if meta.get("kind") == "adapemu" and not Path(named).exists() and (sibling / "fedbiot.json").is_file():
        return str(sibling)
    return named


def load_adapter(adapter: Path, base: str | None = None, hardware: Hardware | None = None):
    """(PeftModel in eval mode, tokenizer, prompt template) of an exported adapter on its base, the base on
    `hardware`'s device and in its dtype (default: float32 on the CPU)."""
    from peft import PeftModel  # noqa: PLC0415
    from transformers import AutoTokenizer  # noqa: PLC0415

    from owner.model_card import card_metadata  # noqa: PLC0415
    from owner.models import Placement, load_model  # noqa: PLC0415

    hardware = hardware or Hardware(torch.device("cpu"), torch.float32)
    spec = base_spec(adapter, base)
    loaded = load_model(spec, dtype=hardware.dtype, placement=Placement(device_map={"": str(hardware.device)}))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(adapter)) if (adapter / "tokenizer_config.json").is_file() \
            else loaded.tokenizer
        model = PeftModel.from_pretrained(loaded.model, str(adapter)).eval()
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelError(f"cannot load adapter {adapter} on {spec or 'the embedded model'}: {first_line(e)}"
                         ) from None
    return model, tokenizer, card_metadata(adapter / "README.md").get("template", "auto")


def generate(adapter: Path, prompt: str, max_new_tokens: int = 128, base: str | None = None,
             hardware: Hardware | None = None) -> str:
    """Greedy answer of base model + adapter to `prompt`, in the prompt format the adapter was trained in."""
    from tasks.prompts import format_prompt, resolve_template  # noqa: PLC0415

    model, tokenizer, template = load_adapter(Path(adapter), base, hardware)
    if template not in ("chat", "plain"):
        template = resolve_template(tokenizer, "auto")
    text = format_prompt(prompt, tokenizer, template)
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=template == "plain").to(model.device)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad_id_of(tokenizer))
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def main(argv: Sequence[str] | None = None) -> int:
    from console.terminal import OneLineErrors  # noqa: PLC0415

    parser = OneLineErrors(
        prog="python -m owner.generate",
        description="Generate with an exported FedBiOT adapter (AdapFu/AdapEmu).")
    parser.add_argument("--adapter", type=Path, required=True, help="exported adapter directory")
    parser.add_argument("--prompt", required=True, help="the user prompt")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--base", help="load the adapter on this model instead of the one it names (a hub id, "
                                       "checkpoint directory or .gguf file)")
    parser.add_argument("--device", default="auto", help=f"{DEVICES} (auto: a CUDA GPU when present)")
    parser.add_argument("--dtype", default="auto", choices=("auto", *DTYPES),
                        help="the base model's precision (auto: bfloat16 where the device computes it natively)")
    parser.add_argument("--verbose", action="store_true", help="let libraries print their bars and warnings")
    from console.terminal import run_cli  # noqa: PLC0415

    def run(args_list: list[str]) -> int:
        args = parser.parse_args(args_list)
        if not args.verbose:
            from console.terminal import quiet_libraries  # noqa: PLC0415

            quiet_libraries()
        if args.max_new_tokens < 1:
            raise ConfigError("--max-new-tokens must be >= 1")
        print(generate(args.adapter, args.prompt, args.max_new_tokens, args.base,
                       resolve_hardware(args.device, args.dtype)))
        return 0

    return run_cli(run, list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
