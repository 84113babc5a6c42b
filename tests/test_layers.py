import pytest
import torch
from conftest import tiny_lm
from tiny_models import ARCHITECTURES, tiny_model

from melbo.errors import MelboError
from melbo.engine.intervention import add_to_block_output
from melbo.engine.layers import find_blocks, find_mlp_out

EXPECTED_PATHS = {"gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers"}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_blocks_found_for_every_architecture(arch):
    lm = tiny_lm(arch)
    assert lm.blocks_path == EXPECTED_PATHS.get(arch, "model.layers")
    assert lm.depth == 4 and lm.width == 64
    path, module = find_mlp_out(lm.blocks[0])
    assert path in ("mlp.down_proj", "mlp.c_proj", "mlp.dense_4h_to_h")


def block_outputs(lm, ids):
    """Every block's output as the next block sees it (hooks registered last see earlier hooks' edits)."""
    seen = []
    handles = [b.register_forward_hook(lambda m, a, o: seen.append(o[0] if isinstance(o, tuple) else o))
               for b in lm.blocks]
    try:
        lm.model(ids)
    finally:
        for h in handles:
            h.remove()
    return seen


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_vector_at_block_s_changes_exactly_the_states_after_s(arch):
    lm = tiny_lm(arch)
    ids = torch.randint(3, 256, (2, 7), generator=torch.Generator().manual_seed(1))
    clean = block_outputs(lm, ids)
    s = 1
    theta = torch.randn(64, generator=torch.Generator().manual_seed(2))
    with add_to_block_output(lm, s, theta):
        steered = block_outputs(lm, ids)
    for k in range(s):
        assert torch.equal(clean[k], steered[k]), f"block {k} before the source changed"
    torch.testing.assert_close(steered[s] - clean[s], theta.expand_as(clean[s]), atol=1e-5, rtol=0)
    for k in range(s + 1, lm.depth):
        assert (steered[k] - clean[k]).abs().max() > 1e-4, f"block {k} after the source did not change"
    # the hook is gone after the context
    assert all(torch.equal(a, b) for a, b in zip(block_outputs(lm, ids), clean))


def test_negative_layer_indices_count_from_the_end():
    lm = tiny_lm()
    assert lm.layer(-1) == 3 and lm.layer(-4) == 0 and lm.layer(2) == 2
    with pytest.raises(MelboError, match="out of range.*0..3"):
        lm.layer(4)
    with pytest.raises(MelboError, match="out of range"):
        lm.layer(-5)


def test_unknown_architecture_names_the_override():
    model = tiny_model("llama")
    model.model.blocks_elsewhere = model.model.layers
    del model.model.layers
    with pytest.raises(MelboError, match="--blocks-path"):
        find_blocks(model)
    path, blocks = find_blocks(model, "model.blocks_elsewhere")
    assert path == "model.blocks_elsewhere" and len(blocks) == 4
