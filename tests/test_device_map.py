"""Big-model placement on CPU: a tiny model whose accelerate device map keeps some blocks on "cpu" and offloads
the rest (embeddings and LM head too) to disk, where their weights sit on "meta" until a hook loads them.

The same code paths as `--device auto` across GPUs (accelerate's hooks, instance-level forwards, tensors that
must follow the block's device): prefix replay, stop-at-target, batched steering, adapters and generation give
the same results as the plainly loaded model.
"""

import pytest
import torch
from tiny_models import save_tiny_model

import melbo
from melbo.jobs.layermap import compute_pair, encode_for, make_settings
from melbo.engine.layers import find_blocks
from melbo.engine.models import LoadedModel

PROMPTS = ["The cat sat on", "Tell me a story"]
DEVICE_MAP = {"model.embed_tokens": "disk", "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "cpu",
              "model.layers.3": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "disk"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("dm")
    path = str(save_tiny_model(folder / "model"))
    plain = melbo.load_model(path)
    model = AutoModelForCausalLM.from_pretrained(path, device_map=DEVICE_MAP, offload_folder=str(folder / "off"))
    model.eval().requires_grad_(False)
    blocks_path, blocks = find_blocks(model)
    mapped = LoadedModel(model, plain.tokenizer, blocks, blocks_path, plain.model_id, plain.spec)
    return plain, mapped


def test_offloaded_weights_really_are_elsewhere(models):
    _, mapped = models
    assert mapped.model.get_input_embeddings().weight.device.type == "meta"
    assert mapped.blocks[1].mlp.down_proj.weight.device.type == "meta"
    assert mapped.device == torch.device("cpu")  # the hook's execution device, not "meta"


def test_map_pairs_replay_and_stop_as_on_the_plain_model(models):
    plain, mapped = models
    settings = make_settings(plain, PROMPTS, "1", "3", 2, 3, 0, None, "all")
    expected = compute_pair(plain, encode_for(plain, settings), 1, 3, settings)
    got = compute_pair(mapped, encode_for(mapped, settings), 1, 3, settings)
    torch.testing.assert_close(got.directions, expected.directions)
    torch.testing.assert_close(got.singular_values, expected.singular_values)
    for block in mapped.blocks:  # the replayed prefix gave back accelerate's own forwards
        assert "forward" in block.__dict__


@pytest.mark.parametrize("method", ["vectors", "adapters"])
def test_batched_training_and_steered_generation_match(models, tmp_path, method):
    plain, mapped = models
    kw = dict(method=method, n_vectors=2, steps=3, source=1, target=3, radius="0.5x", chat=False, precision="fp32",
              orthogonal="hard" if method == "vectors" else "soft")
    runs = [melbo.discover(lm, PROMPTS, tmp_path / name, **kw) for name, lm in (("plain", plain), ("mapped", mapped))]
    first, second = (r.perturbations for r in runs)
    for name in ("vectors",) if method == "vectors" else ("a", "b"):
        torch.testing.assert_close(getattr(second, name), getattr(first, name))
    texts = [[c.text for c in melbo.generate(lm, run.perturbations, PROMPTS[:1])] for lm, run in
             zip((plain, mapped), runs)]
    assert texts[0] == texts[1] and len(texts[0]) == 3  # unsteered + 2 steered rows, batched


def test_load_model_device_auto(models, tmp_path):
    plain, _ = models
    auto = melbo.load_model(plain.spec, device="auto")
    assert auto.model_id == plain.model_id  # no GPU here: "auto" places every block on the CPU
    settings = make_settings(plain, PROMPTS, "0", "2", 2, 2, 0, None, "all")
    torch.testing.assert_close(compute_pair(auto, encode_for(auto, settings), 0, 2, settings).directions,
                               compute_pair(plain, encode_for(plain, settings), 0, 2, settings).directions)
