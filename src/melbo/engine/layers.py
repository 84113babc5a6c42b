"""Find the decoder blocks of any causal LM, and the parts of a block melbo touches.

Known layouts cover llama, mistral, qwen2/3, gemma2/3, phi3, olmo (`model.layers`), gpt2 (`transformer.h`) and
gpt-neox (`gpt_neox.layers`). Anything else can name its block list with a dotted path (`--blocks-path`).
"""

from __future__ import annotations

from torch import nn

from melbo.errors import MelboError

BLOCK_PATHS = (
    "model.layers",  # llama, mistral, qwen2, qwen3, gemma2, gemma3, phi3, olmo
    "transformer.h",  # gpt2, gpt-j
    "gpt_neox.layers",  # gpt-neox, pythia
    "model.decoder.layers",  # opt
    "transformer.blocks",  # mpt
    "model.language_model.layers",  # multimodal wrappers (gemma3 conditional generation)
)

# The module whose output is the MLP's contribution; steering adapters perturb its weight.
MLP_OUT_PATHS = ("mlp.down_proj", "mlp.c_proj", "mlp.dense_4h_to_h", "mlp.fc2", "feed_forward.w2")


def get_path(root: nn.Module, dotted: str) -> nn.Module | None:
    node = root
    for part in dotted.split("."):
        node = getattr(node, part, None)
        if node is None:
            return None
    return node


def find_blocks(model: nn.Module, override: str | None = None) -> tuple[str, nn.ModuleList]:
    """Return (dotted path, ModuleList) of the decoder blocks."""
    candidates = (override,) if override else BLOCK_PATHS
    for path in candidates:
        blocks = get_path(model, path)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return path, blocks
    kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    if override:
        raise MelboError(f"--blocks-path {override!r} is not a list of blocks in this {kind} model: check the path")
    raise MelboError(
        f"cannot find the decoder blocks of architecture {kind!r}: pass --blocks-path "
        "(the dotted path of its block list, e.g. model.layers)"
    )


def find_mlp_out(block: nn.Module) -> tuple[str, nn.Module]:
    """Return (dotted path inside the block, module) of the MLP output projection."""
    for path in MLP_OUT_PATHS:
        module = get_path(block, path)
        if module is not None:
            return path, module
    raise MelboError(
        f"cannot find the MLP output projection in {type(block).__name__}: steering adapters support blocks with "
        f"one of {', '.join(MLP_OUT_PATHS)}; use steering vectors instead"
    )
