"""Tiny, randomly initialised causal LMs built in-code (no downloads).

Each architecture gets a ~4-layer, hidden-size-64 model with a 256-token
vocabulary, suitable for fast unit tests that feed raw ``input_ids``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import transformers

ARCHITECTURES: tuple[str, ...] = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma2",
    "gemma3",
    "phi3",
    "gpt2",
    "gpt_neox",
    "olmo",
)

VOCAB_SIZE = 256
HIDDEN_SIZE = 64
NUM_LAYERS = 4
NUM_HEADS = 4
NUM_KV_HEADS = 2
HEAD_DIM = HIDDEN_SIZE // NUM_HEADS  # 16
INTERMEDIATE_SIZE = 128
MAX_POSITIONS = 512

# Special token ids kept inside the tiny vocabulary (defaults of several
# configs point at ids >= 256, which would break embedding lookups/generate).
_TOKEN_IDS: dict[str, int] = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}

_COMMON: dict[str, Any] = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": HIDDEN_SIZE,
    "num_hidden_layers": NUM_LAYERS,
    "num_attention_heads": NUM_HEADS,
    "intermediate_size": INTERMEDIATE_SIZE,
    "max_position_embeddings": MAX_POSITIONS,
    "tie_word_embeddings": False,
    **_TOKEN_IDS,
}


def _llama() -> transformers.PretrainedConfig:
    return transformers.LlamaConfig(**_COMMON, num_key_value_heads=NUM_KV_HEADS)


def _mistral() -> transformers.PretrainedConfig:
    return transformers.MistralConfig(
        **_COMMON, num_key_value_heads=NUM_KV_HEADS, sliding_window=None
    )


def _qwen2() -> transformers.PretrainedConfig:
    return transformers.Qwen2Config(
        **_COMMON, num_key_value_heads=NUM_KV_HEADS, use_sliding_window=False
    )


def _qwen3() -> transformers.PretrainedConfig:
    return transformers.Qwen3Config(
        **_COMMON,
        num_key_value_heads=NUM_KV_HEADS,
        head_dim=HEAD_DIM,
        use_sliding_window=False,
    )


def _gemma2() -> transformers.PretrainedConfig:
    return transformers.Gemma2Config(
        **_COMMON,
        num_key_value_heads=NUM_KV_HEADS,
        head_dim=HEAD_DIM,
        query_pre_attn_scalar=HEAD_DIM,
        sliding_window=128,
    )


def _gemma3() -> transformers.PretrainedConfig:
    # The default 5:1 sliding/full pattern would make all 4 layers sliding;
    # alternate explicitly so both attention types are exercised.
    return transformers.Gemma3TextConfig(
        **_COMMON,
        num_key_value_heads=NUM_KV_HEADS,
        head_dim=HEAD_DIM,
        query_pre_attn_scalar=HEAD_DIM,
        sliding_window=128,
        layer_types=["sliding_attention", "full_attention"] * (NUM_LAYERS // 2),
    )


def _phi3() -> transformers.PretrainedConfig:
    return transformers.Phi3Config(
        **_COMMON,
        num_key_value_heads=NUM_KV_HEADS,
        original_max_position_embeddings=MAX_POSITIONS,
    )


def _gpt2() -> transformers.PretrainedConfig:
    return transformers.GPT2Config(
        vocab_size=VOCAB_SIZE,
        n_embd=HIDDEN_SIZE,
        n_layer=NUM_LAYERS,
        n_head=NUM_HEADS,
        n_inner=INTERMEDIATE_SIZE,
        n_positions=MAX_POSITIONS,
        tie_word_embeddings=False,
        **_TOKEN_IDS,
    )


def _gpt_neox() -> transformers.PretrainedConfig:
    return transformers.GPTNeoXConfig(**_COMMON)


def _olmo() -> transformers.PretrainedConfig:
    return transformers.OlmoConfig(**_COMMON, num_key_value_heads=NUM_KV_HEADS)


_CONFIGS: dict[str, Callable[[], transformers.PretrainedConfig]] = {
    "llama": _llama,
    "mistral": _mistral,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "gemma2": _gemma2,
    "gemma3": _gemma3,
    "phi3": _phi3,
    "gpt2": _gpt2,
    "gpt_neox": _gpt_neox,
    "olmo": _olmo,
}

_MODEL_CLASSES: dict[str, str] = {"gemma3": "Gemma3ForCausalLM"}

# Gemma2 (attention logit soft-capping) refuses SDPA in transformers 5.x;
# everything else, Gemma3 included, uses SDPA.
_ATTN_IMPL: dict[str, str] = {"gemma2": "eager"}


def tiny_config(arch: str) -> transformers.PretrainedConfig:
    """Return the tiny config for ``arch`` (one of :data:`ARCHITECTURES`)."""
    try:
        factory = _CONFIGS[arch]
    except KeyError:
        raise ValueError(
            f"unknown architecture {arch!r}; expected one of {ARCHITECTURES}"
        ) from None
    config = factory()
    config._attn_implementation = _ATTN_IMPL.get(arch, "sdpa")
    return config


def tiny_model(arch: str, seed: int = 0) -> transformers.PreTrainedModel:
    """Build a tiny random causal LM for ``arch``: float32, eval mode, CPU."""
    config = tiny_config(arch)
    cls_name = _MODEL_CLASSES.get(arch)
    torch.manual_seed(seed)
    if cls_name is None:
        model = transformers.AutoModelForCausalLM.from_config(
            config,
            attn_implementation=config._attn_implementation,
            dtype=torch.float32,
        )
    else:
        cls = getattr(transformers, cls_name)
        model = cls._from_config(
            config,
            attn_implementation=config._attn_implementation,
            dtype=torch.float32,
        )
    model = model.to(torch.float32)
    model.eval()
    return model


def byte_tokenizer():
    """A tokenizer with one token per byte: ids 0..255 fit the tiny models' vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={s: i for i, s in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=alphabet[0], eos_token=alphabet[2])
    fast.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"  # so that chat works
    return fast


def save_tiny_model(path, arch: str = "llama", seed: int = 0):
    """A tiny random model with a byte tokenizer, saved where `melbo.load_model(path)` loads it in a second."""
    tiny_model(arch, seed).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path
