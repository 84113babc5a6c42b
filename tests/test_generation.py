"""Steered generation: batched across perturbations, identical to one at a time."""

import torch

from melbo.arithmetic import random_vectors
from melbo.generation import Sampling, generate

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
