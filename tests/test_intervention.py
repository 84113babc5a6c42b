"""The artefacts say what they support; callers ask them (random baseline, arithmetic, export formats)."""

from types import SimpleNamespace

import pytest
import torch

from melbo.engine.arithmetic import perturbation_set, random_vectors
from melbo.errors import MelboError
from melbo.engine.intervention import SteeringAdapters, SteeringVectors
from melbo.server.app import EXPORTS, _exports_for
from melbo.server.live import LiveRequest, _columns

VECTORS = SteeringVectors(torch.randn(3, 8, generator=torch.Generator().manual_seed(0)), layer=1)
ADAPTERS = SteeringAdapters(torch.randn(3, 5, 2), torch.randn(3, 8, 2), radius=2.0, layer=1)


def a_run(perturbations, radius: float = 2.0):
    return SimpleNamespace(perturbations=perturbations, path="RUN", config=SimpleNamespace(radius=radius))


def test_vectors_and_adapters_declare_their_capabilities():
    assert VECTORS.supports_random_baseline and VECTORS.supports_arithmetic
    assert not ADAPTERS.supports_random_baseline and not ADAPTERS.supports_arithmetic
    assert "gguf" in VECTORS.export_formats and "peft" not in VECTORS.export_formats
    assert "peft" in ADAPTERS.export_formats and "gguf" not in ADAPTERS.export_formats
    for kind in (SteeringVectors, SteeringAdapters):
        assert set(kind.export_formats) <= set(EXPORTS)  # every format the web app can serve


def test_the_web_app_offers_the_artefacts_own_formats():
    assert list(_exports_for(a_run(VECTORS))) == list(VECTORS.export_formats)
    assert list(_exports_for(a_run(ADAPTERS))) == list(ADAPTERS.export_formats)
    assert _exports_for(a_run(None)) == {} and _exports_for(None) == {}


def test_expressions_and_random_baselines_need_vectors():
    chosen, labels = perturbation_set(a_run(VECTORS), [0], ["v1 - v2"], random=2)
    assert labels == ["v0", "v1 - v2", "random0", "random1"] and len(chosen) == 4
    assert torch.allclose(chosen.vectors[2:].norm(dim=-1), torch.full((2,), 2.0))
    selected, labels = perturbation_set(a_run(ADAPTERS), [2, 0], [], random=0)
    assert labels == ["v2", "v0"] and torch.equal(selected.a, ADAPTERS.a[[2, 0]])
    for exprs, random in ((["v0 + v1"], 0), ([], 1)):
        with pytest.raises(MelboError, match="this run holds steering adapters"):
            perturbation_set(a_run(ADAPTERS), None, exprs, random)


def test_the_live_random_column_is_the_libraries_random_vector_of_the_first_norm():
    request = LiveRequest("hi", (2, 0), scale=1.0, max_new_tokens=4, random=True, seed=5)
    stacked, names = _columns(a_run(VECTORS), request)
    assert names == ["v2", "v0", "random (‖v2‖)"]
    expected = random_vectors(1, 8, float(VECTORS.vectors[2].norm()), 1, seed=5).vectors[0]
    assert torch.allclose(stacked.vectors[2], expected)
    with pytest.raises(MelboError, match="holds steering adapters: untick 'random'"):
        _columns(a_run(ADAPTERS), request)
