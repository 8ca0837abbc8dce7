"""Plan a deployment from the model's config alone: layers, trainable parameters, traffic, FLOPs, memory.

`owner plan` answers, before anyone downloads a weight, what a run would cost: which layers form the
emulator and the adapter, how many LoRA parameters the parties train, how big the compressed download is,
how many bytes each round moves each way, how many FLOPs a party spends per token and how much memory the
party and the owner need. Every figure is a pure function of the config (a Llama-style decoder: q/k/v/o
attention and gate/up/down MLP projections, which covers Llama, Mistral, Qwen2/3 and Gemma 3).

Traffic per round, per party (LoRA tensors travel as float32; 1 MB = 10^6 bytes, as in the paper):
  - FedBiOT: down = adapter LoRA + emulator LoRA (the emulator is re-aligned every round); up = adapter LoRA.
  - Offsite-tuning / FedOT: down = up = adapter LoRA (the emulator is aligned once and ships with the model;
    the owner of this implementation still re-sends that unchanged emulator LoRA every round, which the
    plan reports beside the method's figure).
  - FedAvg on the full model: down = up = the LoRA of every layer.
The paper's Table 5 "MB/round" is down + up: for LLaMA-2-7B with LoRA r=8 on q_proj and v_proj (131,072
parameters a layer), FedBiOT with 2 adapter layers and 24 emulator layers moves (2 + 24) x 0.524 MB down and
2 x 0.524 MB up = 14.68 MB; Offsite-tuning/FedOT with 4 adapter layers moves 4 x 0.524 MB each way = 4.19 MB.

The FLOP count is the one `benchmarks/flops.py` makes on a live model (2 FLOPs per multiply-add; a frozen
layer below the lowest trainable one has no backward pass), taken from the config instead of the modules.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from errors import ConfigError, ModelError, first_line
from learning.compressed_model import FORMAT_VERSION, Manifest, decoder_layers_path
from owner.compress import kept_layer_indices
from owner.config import RunConfig
from owner.footprint import (
    COMPUTE_BYTES,
    Dims,
    loss_chunk_bytes,
    meta_model,
    owner_footprint,
    party_footprint,
    planned_device_map,
)
from owner.models import gguf_cache_dir, model_source
from tasks.hf_sources import hub_offline, hub_unreachable

MB = 1e6
WIRE_BYTES = 4  # LoRA tensors travel (and are trained) in float32
# Bytes per frozen decoder weight. int8 and nf4 quantise only the decoder-layer projections (as
# bitsandbytes does); embeddings, lm_head and norms stay bfloat16. nf4 includes QLoRA's double-quantised
# block scales (about 0.127 bits a weight).
SHIPPED_DTYPES = ("float32", "bfloat16")  # what the compressed model is written in (the owner's --dtype)
WEIGHT_BYTES = {"float32": 4.0, "bfloat16": 2.0, "int8": 1.0, "nf4": 0.5 + 0.127 / 8}
DTYPES = tuple(WEIGHT_BYTES)
ATTN_IN = ("q_proj", "k_proj", "v_proj")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size")
# Per-layer norm weights (of size hidden) beyond the two every Llama-style layer has.
_EXTRA_LAYER_NORMS = {"gemma2": 2, "gemma3_text": 2, "gemma3": 2}
# Architectures with per-head RMSNorm on queries and keys (weights of size head_dim).
_QK_NORM = frozenset({"qwen3", "gemma3_text", "gemma3", "olmo2"})
# Architectures whose q/k/v projections always carry a bias, whatever the config says.
_QKV_BIAS = frozenset({"qwen2"})


# ---------------------------------------------------------------------------------------- model shape

@dataclass(frozen=True)
class ModelShape:
    """The sizes of a Llama-style decoder that every planned figure is computed from."""

    name: str
    model_type: str
    n_layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    norms_per_layer: int = 2
    qk_norm: bool = False
    raw: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)  # the config dict itself

    def linears(self) -> dict[str, tuple[int, int]]:
        """(fan_in, fan_out) of every projection in one decoder layer."""
        q, kv, h, i = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.hidden, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def projection_params(self) -> int:
        """Weights and biases of one layer's projections (what int8/nf4 would quantise)."""
        lin = self.linears()
        total = sum(a * b for a, b in lin.values())
        if self.qkv_bias:
            total += sum(lin[k][1] for k in ATTN_IN)
        if self.o_bias:
            total += self.hidden
        if self.mlp_bias:
            total += 2 * self.intermediate + self.hidden
        return total

    def layer_norm_params(self) -> int:
        return self.norms_per_layer * self.hidden + (2 * self.head_dim if self.qk_norm else 0)

    def outer_params(self) -> int:
        """Embeddings, the final norm and an untied lm_head: shipped whole in every compressed model."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    def params(self, n_layers: int | None = None) -> int:
        layers = self.n_layers if n_layers is None else n_layers
        return self.outer_params() + layers * (self.projection_params() + self.layer_norm_params())

    def weight_bytes(self, n_layers: int, dtype: str) -> float:
        """Bytes of the frozen weights of a model of `n_layers` layers with `dtype` projections."""
        per = WEIGHT_BYTES[dtype]
        rest = WEIGHT_BYTES["bfloat16"] if dtype in ("int8", "nf4") else per
        return n_layers * self.projection_params() * per + (
            self.outer_params() + n_layers * self.layer_norm_params()) * rest


def _get(cfg: Mapping[str, Any], *keys: str, default: Any = None) -> Any:
    for key in keys:
        if cfg.get(key) is not None:
            return cfg[key]
    return default


def shape_from_config(cfg: Mapping[str, Any], name: str = "") -> ModelShape:
    """A ModelShape from a config.json dict (its `text_config` for a multimodal checkpoint)."""
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"{name or 'model config'}: expected a JSON object")
    if isinstance(cfg.get("text_config"), Mapping):
        cfg = {**cfg, **cfg["text_config"]}
    moe = [k for k in _MOE_KEYS if cfg.get(k)]
    if moe:
        raise ConfigError(f"{name or 'the model'} is a mixture-of-experts model ({moe[0]}); the planner counts "
                          "dense Llama-style decoders only")
    sizes = {"n_layers": ("num_hidden_layers", "n_layer"), "hidden": ("hidden_size", "n_embd"),
             "intermediate": ("intermediate_size",), "heads": ("num_attention_heads", "n_head"),
             "vocab": ("vocab_size",)}
    values = {}
    for field_name, keys in sizes.items():
        value = _get(cfg, *keys)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name or 'model config'}: needs a positive integer {keys[0]} (a Llama-style "
                              f"decoder config), got {value!r}")
        values[field_name] = value
    kv = _get(cfg, "num_key_value_heads", default=values["heads"])
    head_dim = _get(cfg, "head_dim", default=values["hidden"] // values["heads"])
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in (kv, head_dim)):
        raise ConfigError(f"{name or 'model config'}: num_key_value_heads and head_dim must be positive integers")
    model_type = str(cfg.get("model_type") or "unknown")
    causal_config(cfg, name)  # a decoder-only causal LM, or one error line
    attention_bias = bool(cfg.get("attention_bias", False))
    return ModelShape(
        name=name or str(cfg.get("_name_or_path") or model_type), model_type=model_type,
        kv_heads=kv, head_dim=head_dim, tied=bool(cfg.get("tie_word_embeddings", True)),
        qkv_bias=attention_bias or model_type in _QKV_BIAS, o_bias=attention_bias,
        mlp_bias=bool(cfg.get("mlp_bias", False)), norms_per_layer=2 + _EXTRA_LAYER_NORMS.get(model_type, 0),
        qk_norm=model_type in _QK_NORM, raw=dict(cfg), **values)


def causal_config(cfg: Mapping[str, Any], name: str = ""):
    """The transformers config of a decoder-only causal LM (the text config of a multimodal checkpoint); an
    encoder, an encoder-decoder or a model type transformers does not know is refused."""
    from transformers import AutoConfig  # noqa: PLC0415
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES  # noqa: PLC0415

    text = cfg["text_config"] if isinstance(cfg.get("text_config"), Mapping) else cfg
    model_type = text.get("model_type") or cfg.get("model_type")
    what = name or "the model"
    if cfg.get("is_encoder_decoder") or text.get("is_encoder_decoder"):
        raise ConfigError(f"{what} ({model_type}) is an encoder-decoder model: FedBiOT compresses decoder-only "
                          "causal language models")
    causal = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    if causal is None or not causal.endswith("ForCausalLM"):
        known = f" (transformers' language-model head for it is {causal})" if causal else ""
        raise ConfigError(f"{what} ({model_type}) is not a decoder-only causal language model{known}: FedBiOT "
                          "compresses decoders such as Llama, Mistral, Qwen or Gemma")
    try:
        return AutoConfig.for_model(model_type, **{k: v for k, v in text.items() if k != "model_type"})
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"{what}: cannot read its {model_type} config: {first_line(e)}") from None


# ------------------------------------------------------------------------------------- reading configs

def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"cannot read model config {path}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"model config {path}: expected a JSON object")
    return data


def _config_dict(config) -> dict:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return text.to_dict()


def _gguf_config(path: Path) -> dict:
    """The config in a GGUF file's metadata (the dequantised cache's config.json when there is one)."""
    cached = gguf_cache_dir(path) / "config.json"
    if cached.is_file():
        return _read_json(cached)
    from transformers import AutoConfig  # noqa: PLC0415

    try:
        return _config_dict(AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name))
    except ImportError:
        raise ModelError(f"reading the GGUF model {path.name} needs the gguf package: pip install 'fedbiot[owner]'"
                         ) from None
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelError(f"cannot read the config of GGUF file {path}: {first_line(e)}") from None


def read_model_config(spec: str | None) -> tuple[str, dict]:
    """(name, config dict) of `spec`: None = the embedded default, a directory with config.json, a config.json
    (or any other file) path, a .gguf file, or a hub id (fetched by AutoConfig: only the config, never weights)."""
    source = model_source(spec)
    if source.kind == "hub":
        return source.name, _hub_config(source.spec)
    if source.kind == "directory":
        return source.name, _read_json(source.path / "config.json")
    if source.kind == "file":
        return source.name, _read_json(source.path)
    return source.name, _gguf_config(source.path)


def _hub_config(repo_id: str) -> dict:
    from transformers import AutoConfig  # noqa: PLC0415

    # No network: the cache alone, at once, instead of half a minute of retries
    unreachable = None if hub_offline() else hub_unreachable()
    try:
        return _config_dict(AutoConfig.from_pretrained(repo_id, local_files_only=unreachable is not None))
    except Exception as e:  # huggingface_hub raises many types for network and lookup failures
        if unreachable is not None:
            raise ModelError(f"cannot read the config of {repo_id!r}: {unreachable}, and it is not in the Hugging "
                             "Face cache; pass a config.json or a checkpoint directory instead") from None
        if hub_offline():
            raise ModelError(f"cannot read the config of {repo_id!r}: offline (HF_HUB_OFFLINE) and it is not in "
                             "the Hugging Face cache; pass a config.json or a checkpoint directory instead"
                             ) from None
        raise ModelError(f"cannot read the config of {repo_id!r} from the Hugging Face hub: {first_line(e)}") from None


# ----------------------------------------------------------------------------------------- the plan

@dataclass
class Plan:
    """Every planned figure of one run; sizes in bytes, compute in FLOPs (the printer converts)."""

    model: str
    method: str
    n_layers: int
    params_full: int
    kept_layers: list[int]  # original indices, in compressed order
    adapter_layers: list[int]  # original indices
    emulator_layers: list[int]  # original indices
    targets: list[str]
    lora_per_layer: int
    trainable: int  # adapter LoRA parameters a party trains
    emulator_lora: int
    down_bytes: int  # per round, per party, as the method needs
    up_bytes: int
    resent_bytes: int  # the unchanged emulator LoRA this implementation re-sends each round (baselines)
    rounds: int
    batch_size: int
    max_length: int
    local_steps: int
    step_forward_flops: int
    step_backward_flops: int
    download_bytes: dict[str, float] = field(default_factory=dict)  # compressed model, by dtype
    party_memory: dict[str, float] = field(default_factory=dict)  # by dtype of the frozen weights
    owner_memory: dict[str, float | None] = field(default_factory=dict)  # None: the owner holds no such weights
    split_dtype: str = "bfloat16"  # the dtype of the per-device splits
    owner_split: dict | None = None  # owner.footprint.Footprint.to_dict() for --device-map
    party_split: dict | None = None  # the same for a party with --party-device-map

    @property
    def round_bytes(self) -> int:
        return self.down_bytes + self.up_bytes

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.max_length

    @property
    def flops_per_token(self) -> float:
        return (self.step_forward_flops + self.step_backward_flops) / self.tokens_per_step

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(round_bytes=self.round_bytes, flops_per_token=self.flops_per_token)
        return out


def lora_targets(shape: ModelShape, target_modules: tuple[str, ...] | None) -> list[str]:
    """The projections LoRA wraps: all of them by default, else those named (PEFT-style suffix names)."""
    if target_modules is None:
        return list(PROJECTIONS)
    chosen = []
    for target in target_modules:
        kind = target.rsplit(".", 1)[-1]
        if kind not in PROJECTIONS:
            raise ConfigError(f"--target-modules: {target!r} is no projection of a {shape.model_type} decoder layer "
                              f"(available: {', '.join(PROJECTIONS)})")
        if kind not in chosen:
            chosen.append(kind)
    return [k for k in PROJECTIONS if k in chosen]


def lora_params_per_layer(shape: ModelShape, r: int, targets: list[str]) -> int:
    lin = shape.linears()
    return sum(r * (lin[k][0] + lin[k][1]) for k in targets)


def party_step_flops(shape: ModelShape, n_layers: int, trainable: set[int], live_lora: set[int], r: int,
                     targets: list[str], batch_size: int, seq_len: int, n_logits: int,
                     prox: bool) -> dict[str, dict[str, int]]:
    """Matmul FLOPs of one party step by pass and kind, as `benchmarks.flops.step_flops` counts them.

    `trainable`: compressed indices whose LoRA trains; `live_lora`: those whose LoRA runs as separate
    matmuls (the trainable ones, and the emulator's when it cannot be folded into the weights).
    """
    tokens = batch_size * seq_len
    out: dict[str, dict[str, int]] = {"forward": {}, "backward": {}}

    def add(which: str, kind: str, flops: int) -> None:
        out[which][kind] = out[which].get(kind, 0) + int(flops)

    lin = shape.linears()
    grad_in = False
    for index in range(n_layers):
        train_here = index in trainable
        rank_here = r if index in live_lora or train_here else 0

        def linear(kind: str, in_rg: bool, train_here: bool = train_here, rank_here: int = rank_here) -> bool:
            fan_in, fan_out = lin[kind]
            rank = rank_here if kind in targets else 0
            add("forward", "linear", 2 * tokens * fan_in * fan_out)
            trains = train_here and rank > 0
            if rank:
                add("forward", "lora", 2 * tokens * rank * (fan_in + fan_out))
            if not (in_rg or trains):
                return False
            if in_rg:
                add("backward", "linear", 2 * tokens * fan_in * fan_out)
            if rank:
                add("backward", "lora", 2 * tokens * rank * fan_out)
                if trains:
                    add("backward", "lora", 2 * tokens * rank * (fan_in + fan_out))
                    if prox:
                        add("forward", "proximal", 6 * rank * rank * (fan_in + fan_out))
                        add("backward", "proximal", 6 * rank * rank * (fan_in + fan_out))
                if in_rg:
                    add("backward", "lora", 2 * tokens * rank * fan_in)
            return True

        attn_rg = any([linear(k, grad_in) for k in ATTN_IN])
        attention = 4 * batch_size * seq_len * seq_len * lin["q_proj"][1]
        add("forward", "attention", attention)
        if attn_rg:
            add("backward", "attention", 5 * attention // 2)
        o_rg = linear("o_proj", attn_rg)  # counted before the `or`: it runs whatever grad_in is
        mid_rg = grad_in or o_rg
        up_rg = any([linear(k, mid_rg) for k in ("gate_proj", "up_proj")])
        down_rg = linear("down_proj", up_rg)
        grad_in = mid_rg or down_rg
    head = 2 * n_logits * shape.hidden * shape.vocab
    add("forward", "lm_head", head)
    if grad_in:
        add("backward", "lm_head", head)
    return out


def _activation_bytes(shape: ModelShape, layers_with_grad: int, tokens: int, compute_bytes: int) -> float:
    """Tensors autograd keeps for a party's backward pass (`owner.footprint.Dims.layer_keeps` per token and
    layer), and one chunk of the cross-entropy over the vocabulary (`learning.vocab_loss`)."""
    dims = Dims(shape.hidden, shape.intermediate, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim,
                shape.vocab)
    return tokens * layers_with_grad * dims.layer_keeps() * compute_bytes + loss_chunk_bytes(dims, tokens, "party")


def make_plan(shape: ModelShape, config: RunConfig,
              party_placement: tuple[str | None, Mapping | None] | None = None) -> Plan:
    """Every figure of `config` on a model of `shape` (raises ConfigError/ModelError on a bad layout).

    The owner's memory is `owner.footprint.owner_footprint` on the model built on the meta device from the
    config, the function the owner itself reports at start-up: per device when `config.device_map` places it
    (the map transformers would make); `party_placement` = (device_map, max_memory) of a party adds its split."""
    n = shape.n_layers
    bottom, top = config.adapter_layout(n)
    kept = kept_layer_indices(n, top, config.drop_rate, bottom)
    n_c = len(kept)
    adapter_c = list(range(bottom)) + list(range(n_c - top, n_c))
    emulator_c = [i for i in range(n_c) if i not in set(adapter_c)]
    targets = lora_targets(shape, config.lora.target_modules)
    r = config.lora.r
    per_layer = lora_params_per_layer(shape, r, targets)
    trainable, emulator_lora = per_layer * len(adapter_c), per_layer * len(emulator_c)
    up = trainable * WIRE_BYTES
    down = up + (emulator_lora * WIRE_BYTES if config.realigns_each_round else 0)

    train = config.train
    tokens = train.batch_size * config.max_length
    flops = party_step_flops(shape, n_c, set(adapter_c), set(), r, targets, train.batch_size, config.max_length,
                             tokens, train.prox_eps > 0)
    lowest = min(adapter_c)
    download = {d: shape.weight_bytes(n_c, d) for d in DTYPES}
    party: dict[str, float] = {}
    owner: dict[str, float | None] = {}
    for dtype in DTYPES:
        compute = 4 if dtype == "float32" else 2
        # A float32 party folds the frozen emulator LoRA into its weights; other dtypes keep it as LoRA.
        unfolded = 0 if dtype == "float32" else emulator_lora * WIRE_BYTES
        # weights, gradient, two AdamW moments and the proximal term's reference copy, all float32
        adapter_state = trainable * WIRE_BYTES * 5
        party[dtype] = (download[dtype] + unfolded + adapter_state
                        + _activation_bytes(shape, n_c - lowest, tokens, compute))
    owner_split = party_split = None
    split_dtype = config.dtype if config.dtype in ("float32", "bfloat16", "float16") else "bfloat16"
    if shape.raw is not None:
        hf_config = causal_config(shape.raw, shape.name)
        # the public set's tokens at most (without a limit, the E* cache fills its bound)
        public_tokens = config.public_limit * config.max_length if config.public_limit else math.inf
        for dtype in ("float32", "bfloat16"):
            full_model = meta_model(hf_config, getattr(torch, dtype))
            manifest = Manifest(format_version=FORMAT_VERSION, base_model=shape.name, n_layers=n, adapter_size=top,
                                drop_rate=float(config.drop_rate), kept_layers=kept,
                                layers_path=decoder_layers_path(full_model), bottom_adapter_size=bottom)
            owner[dtype] = owner_footprint(full_model, {"": "device"}, manifest, config, public_tokens,
                                           COMPUTE_BYTES[dtype]).total
        full_model = meta_model(hf_config, getattr(torch, split_dtype))
        if config.device_map is not None:
            device_map = planned_device_map(full_model, config.device_map, config.max_memory, "device")
            owner_split = owner_footprint(full_model, device_map, manifest, config, public_tokens,
                                          COMPUTE_BYTES[split_dtype]).to_dict()
        if party_placement is not None and party_placement[0] is not None:
            from owner.compress import _cut_config  # noqa: PLC0415

            party_model = meta_model(_cut_config(hf_config, kept, n), getattr(torch, split_dtype))
            party_map = planned_device_map(party_model, party_placement[0], party_placement[1], "device")
            compressed_manifest = replace(manifest, layers_path=decoder_layers_path(party_model))
            party_split = party_footprint(party_model, party_map, compressed_manifest, config,
                                          COMPUTE_BYTES[split_dtype]).to_dict()
    owner.update({"int8": None, "nf4": None})
    return Plan(
        model=shape.name, method=config.method, n_layers=n, params_full=shape.params(),
        kept_layers=kept, adapter_layers=[kept[i] for i in adapter_c], emulator_layers=[kept[i] for i in emulator_c],
        targets=targets, lora_per_layer=per_layer, trainable=trainable, emulator_lora=emulator_lora,
        down_bytes=down, up_bytes=up, resent_bytes=0 if config.realigns_each_round else emulator_lora * WIRE_BYTES,
        rounds=config.rounds, batch_size=train.batch_size,
        max_length=config.max_length, local_steps=train.local_steps,
        step_forward_flops=sum(flops["forward"].values()), step_backward_flops=sum(flops["backward"].values()),
        download_bytes=download, party_memory=party, owner_memory=owner, split_dtype=split_dtype,
        owner_split=owner_split, party_split=party_split)


# ------------------------------------------------------------------------------------------- printing

def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8' (original layer indices)."""
    if not indices:
        return "none"
    parts, start, prev = [], indices[0], indices[0]
    for i in indices[1:] + [None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(f"{start}-{prev}" if prev > start else f"{start}")
        if i is not None:
            start = prev = i
    return ", ".join(parts)


def _mb(n: float) -> str:
    return f"{n / MB:,.2f} MB"


def _size(n: float) -> str:
    return f"{n / 1e9:,.2f} GB" if n >= 1e9 else _mb(n)


def format_split(who: str, split: Mapping[str, Any], dtype: str) -> list[str]:
    """A node's memory per device (`owner.footprint.Footprint.to_dict()`) as table lines."""
    parts = ("weights", "student", "lora", "cache", "activations")
    heads = {"weights": "weights", "student": "own copies", "lora": "LoRA+AdamW", "cache": "E* cache",
             "activations": "activations"}
    if who == "party":
        parts = ("weights", "lora", "activations")
    lines = [f"{who} per device ({dtype}){'' if who == 'party' or split['shares'] else ', without sharing'}:",
             f"{'device':<8}  " + "  ".join(f"{heads[k]:>11}" for k in parts) + f"  {'total':>11}"]
    for device, use in split["devices"].items():
        cells = "  ".join(f"{_size(use[k]):>11}" for k in parts)
        lines.append(f"{device:<8}  {cells}  {_size(use['total']):>11}")
    for where, size in split["offloaded"].items():
        if size:
            lines.append(f"offloaded to {where}: {_size(size)} (read every forward that needs it)")
    if who == "party" and any(split["offloaded"].values()):
        lines.append("a party refuses this placement: every layer of its model carries LoRA, which cannot be "
                     "offloaded (give --party-max-memory more room or another device)")
    return lines


def format_plan(plan: Plan) -> str:
    """The plan as an aligned text table (what `owner plan` prints)."""
    rows = [
        ("model", f"{plan.model}: {plan.n_layers} layers, {plan.params_full / 1e6:,.1f} M parameters"),
        ("method", plan.method),
        ("adapter layers", f"{len(plan.adapter_layers)} ({_ranges(plan.adapter_layers)})"),
        ("emulator layers", f"{len(plan.emulator_layers)} ({_ranges(plan.emulator_layers)})"),
        ("LoRA", f"on {', '.join(plan.targets)}: {plan.lora_per_layer:,} parameters a layer"),
        ("trainable parameters", f"{plan.trainable / 1e6:.3f} M (adapter LoRA)"),
        ("emulator LoRA", f"{plan.emulator_lora / 1e6:.3f} M"),
        ("per round, down", f"{_mb(plan.down_bytes)} " + ("(adapter + emulator LoRA)" if plan.method == "fedbiot" else
                            "(adapter LoRA" + (f"; the owner also re-sends the unchanged emulator LoRA: "
                                               f"+{_mb(plan.resent_bytes)})" if plan.resent_bytes else ")"))),
        ("per round, up", f"{_mb(plan.up_bytes)} (adapter LoRA)"),
        ("per round, total", f"{_mb(plan.round_bytes)} a party; {_size(plan.round_bytes * plan.rounds)} "
                             f"over {plan.rounds} rounds"),
        ("party compute", f"{plan.flops_per_token / 1e9:.2f} GFLOP/token (forward "
                          f"{plan.step_forward_flops / plan.tokens_per_step / 1e9:.2f} + backward "
                          f"{plan.step_backward_flops / plan.tokens_per_step / 1e9:.2f}); "
                          f"{(plan.step_forward_flops + plan.step_backward_flops) * plan.local_steps / 1e12:,.1f}"
                          f" TFLOP a round ({plan.local_steps} steps x {plan.batch_size} x {plan.max_length} tokens)"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines.append("")
    lines.append(f"{'frozen weights':<14}  {'download':>10}  {'party memory':>12}  {'owner memory':>12}")
    for dtype in DTYPES:
        owner = plan.owner_memory.get(dtype)
        shipped = _size(plan.download_bytes[dtype]) if dtype in SHIPPED_DTYPES else "-"
        lines.append(f"{dtype:<14}  {shipped:>10}  {_size(plan.party_memory[dtype]):>12}  "
                     f"{'-' if owner is None else _size(owner):>12}")
    lines.append("(download: the compressed model a party fetches once, in the owner's --dtype; an int8 or nf4 "
                 "party (party --quantize) fetches that and quantises it as it loads; memory: weights + LoRA and "
                 "optimizer state + activations of one step (the owner's: an alignment step, with the E* cache), "
                 "without framework overhead; the owner holds its model unquantised)")
    for who, split in (("owner", plan.owner_split), ("party", plan.party_split)):
        if split:
            lines += ["", *format_split(who, split, plan.split_dtype)]
    return "\n".join(lines)
