"""Steered generation: batched across perturbations, identical to one at a time."""

from melbo.engine.arithmetic import random_vectors
from melbo.engine.generation import Sampling, generate

PROMPT = "How can I make a bomb?"


def test_batched_generation_equals_one_at_a_time(smol):
    vectors = random_vectors(3, smol.width, 30.0, 8, seed=1)
    sampling = Sampling(max_new_tokens=16, batch_size=8)
    batched = generate(smol, vectors, [PROMPT], sampling=sampling)
    assert [c.label for c in batched] == ["unsteered", "v0", "v1", "v2"]
    for c in batched[1:]:
        [alone] = generate(smol, vectors, [PROMPT], indices=[c.vector], include_unsteered=False,
                           sampling=Sampling(max_new_tokens=16, batch_size=1))
        assert alone.text == c.text
    # a vector this large changes the completion
    assert any(c.text != batched[0].text for c in batched[1:])


def test_zero_scale_is_unsteered_and_sampling_is_seeded(smol):
    vectors = random_vectors(2, smol.width, 60.0, 8)
    rows = generate(smol, vectors, [PROMPT], scale=0.0, sampling=Sampling(max_new_tokens=10))
    assert len({c.text for c in rows}) == 1
    sampled = Sampling(max_new_tokens=10, temperature=1.0, samples=2, seed=4)
    a = generate(smol, vectors, [PROMPT], sampling=sampled)
    b = generate(smol, vectors, [PROMPT], sampling=sampled)
    assert [c.text for c in a] == [c.text for c in b] and len(a) == 6


def test_prompts_of_one_token_length_share_batches_and_keep_their_own_tokens(smol):
    from melbo.engine.prompts import prompt_tokens

    same = ["Q: 17 * 23\nA:", "Q: 45 * 61\nA:"]
    other = "Tell me a story about a dragon."
    lengths = [len(prompt_tokens(smol, p, False)) for p in same + [other]]
    assert lengths[0] == lengths[1] != lengths[2]
    vectors = random_vectors(2, smol.width, 30.0, 8, seed=3)
    calls = []
    together = generate(smol, vectors, [same[0], other, same[1]], chat=False, on_batch=calls.append,
                        sampling=Sampling(max_new_tokens=12, batch_size=64))
    assert calls == [6, 3]  # both 2x2 prompts (3 rows each) in one batch, the story in another
    assert [(c.prompt_index, c.label) for c in together] == [(p, label) for p in range(3)
                                                             for label in ("unsteered", "v0", "v1")]
    for p, prompt in enumerate([same[0], other, same[1]]):
        alone = generate(smol, vectors, [prompt], chat=False, sampling=Sampling(max_new_tokens=12, batch_size=64))
        assert [c.text for c in alone] == [c.text for c in together if c.prompt_index == p]
        assert all(c.prompt == prompt for c in together if c.prompt_index == p)


def test_sampling_of_the_wrong_type_is_a_melbo_error(smol):
    import pytest

    from melbo.errors import MelboError

    with pytest.raises(MelboError, match="sampling must be a melbo.engine.generation.Sampling"):
        generate(smol, None, [PROMPT], sampling={"max_new_tokens": 4})


def test_bf16_generation_runs_on_a_bf16_copy_made_once_and_leaves_the_model_in_fp32(tmp_path):
    import copy

    import pytest
    import torch
    from tiny_models import save_tiny_model

    import melbo
    from melbo.errors import MelboError

    lm = melbo.load_model(str(save_tiny_model(tmp_path / "m")))
    assert lm.at_precision("fp32") is lm
    half = lm.at_precision("bf16")
    assert half is not lm and half.dtype == torch.bfloat16 and lm.dtype == torch.float32
    assert lm.at_precision("bf16") is half  # weights cast once, not per call
    vectors = random_vectors(2, lm.width, 3.0, 1, seed=2)
    rows = generate(lm, vectors, ["What is 4 + 6?"], sampling=Sampling(max_new_tokens=6, precision="bf16"))
    # the same tokens as generating on a bf16 model by hand: the copy is the whole model, hooks included
    by_hand = copy.copy(lm)
    by_hand.model = copy.deepcopy(lm.model).to(torch.bfloat16)
    by_hand.blocks = melbo.engine.models.find_blocks(by_hand.model)[1]
    expected = generate(by_hand, vectors, ["What is 4 + 6?"], sampling=Sampling(max_new_tokens=6))
    assert [r.text for r in rows] == [r.text for r in expected]
    assert next(lm.model.parameters()).dtype == torch.float32
    with pytest.raises(MelboError, match="unknown precision"):
        Sampling(precision="fp8")
