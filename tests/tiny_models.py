"""Tiny randomly initialised decoder models and a byte-level tokenizer, so unit tests stay fast.

Every architecture the project supports has a factory here; each model is saved to a directory that
`AutoModelForCausalLM.from_pretrained` loads, exactly like a real checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<s>", "</s>"]
VOCAB_SIZE = 272  # 256 bytes + specials, rounded up

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def byte_tokenizer(chat_template: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with no merges: every UTF-8 byte is one token."""
    byte_map = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_map))}
    for s in SPECIALS:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


_COMMON = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    pad_token_id=SPECIALS.index("<pad>") + 256,
    bos_token_id=SPECIALS.index("<s>") + 256,
    eos_token_id=SPECIALS.index("</s>") + 256,
)

ARCHITECTURES: dict[str, dict] = {
    "llama": dict(model_type="llama", tie_word_embeddings=True),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=False),
    "qwen3": dict(model_type="qwen3", head_dim=8, tie_word_embeddings=True),
    "mistral": dict(model_type="mistral", head_dim=8, tie_word_embeddings=False),
    "gemma3_text": dict(
        model_type="gemma3_text", head_dim=8, sliding_window=16, query_pre_attn_scalar=8,
        tie_word_embeddings=True,
    ),
}


def tiny_config(arch: str = "llama", n_layers: int = 8, **overrides):
    spec = dict(ARCHITECTURES[arch])
    model_type = spec.pop("model_type")
    kwargs = {**_COMMON, **spec, "num_hidden_layers": n_layers, **overrides}
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(arch: str = "llama", n_layers: int = 8, seed: int = 0, **overrides):
    """A randomly initialised causal LM in fp32, eval mode."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, n_layers, **overrides))
    return model.float().eval()


def save_tiny(path: Path, arch: str = "llama", n_layers: int = 8, seed: int = 0,
              chat_template: bool = False) -> Path:
    """Write a tiny model + tokenizer checkpoint directory and return it."""
    path = Path(path)
    tiny_model(arch, n_layers, seed).save_pretrained(path)
    byte_tokenizer(chat_template).save_pretrained(path)
    return path
