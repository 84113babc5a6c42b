"""The method registry: a method defined here, registered with one line, runs end to end like the built-in ones."""

from __future__ import annotations

from typing import Optional

import pytest
import torch
from conftest import run_cli
from tiny_models import save_tiny_model

import melbo
from melbo.errors import MelboError
from melbo.engine.intervention import SteeringVectors
from melbo.engine.methods import METHODS, Fit, Params, Setting, method_class, register_method
from melbo.engine.methods.base import check_orthogonal_fit
from melbo.engine.objective import TargetProbe
from melbo.engine.store import Run


class RandomDirections:
    """A toy method: n random directions of norm R, measured (not trained) by their change at the target."""

    name = "toy-random"
    artifact_kind = SteeringVectors
    supports_contrast = False
    batched = True

    def __init__(self, setting: Setting):
        self.s = setting
        self.steps = 1

    @classmethod
    def check(cls, cfg, lm, earlier: int) -> None:
        check_orthogonal_fit(cfg, lm, earlier)

    @classmethod
    def create(cls, lm, setting: Setting) -> "RandomDirections":
        return cls(setting)

    def replay_upto(self, source: int) -> int:
        return source

    def objective(self, lm, batch, target: int, cfg, reference) -> TargetProbe:
        return TargetProbe(lm, batch, self.s.source, target, self.replay_upto(self.s.source))

    def fit(self, probe: TargetProbe, n: int, previous: Optional[Params], generator, on_step=None) -> Fit:
        x = torch.randn(n, self.s.width, generator=generator)
        vectors = x / x.norm(dim=-1, keepdim=True) * self.s.radius
        change = probe(n, lambda: SteeringVectors(vectors, self.s.source).apply(probe.lm, range(n))) - probe.z0
        value = change.norm(dim=-1).sum((1, 2))
        if on_step:
            on_step(0, value)
        return Fit({"vectors": vectors}, torch.stack([value, value], 1), {"toy": True})

    def artifact(self, params: Params) -> SteeringVectors:
        return SteeringVectors(params["vectors"], self.s.source)


@pytest.fixture
def toy():
    register_method(RandomDirections)
    yield RandomDirections
    del METHODS[RandomDirections.name]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def test_a_registered_method_runs_end_to_end(toy, model_dir, tmp_path):
    lm = melbo.load_model(str(model_dir))
    events = []
    run = melbo.discover(lm, ["Hello there"], tmp_path / "run", method=toy.name, n_vectors=3, batch_size=2,
                         radius="2.0", max_new_tokens=4, progress=events.append)
    assert run.vectors.shape == (3, lm.width)
    assert torch.allclose(run.vectors.norm(dim=-1), torch.full((3,), 2.0))
    assert run.curves.shape == (3, 2) and run.config.record["toy"] is True
    assert [e["batch"] for e in events] == [0, 1] and events[0]["batches"] == 2
    again = Run.load(run.path, model=lm)
    assert torch.equal(again.vectors, run.vectors)
    rows = melbo.generate(lm, again.perturbations, ["Hi"], sampling=melbo.engine.generation.Sampling(max_new_tokens=3))
    assert len(rows) == 4  # unsteered + 3


def test_a_registered_method_is_a_cli_choice(toy, model_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    code, stdout, stderr = run_cli(["discover", "Hello there", "--model", str(model_dir), "--method", toy.name,
                                    "-n", "2", "--radius", "1.0", "--max-new-tokens", "3", "--random", "0",
                                    "--out", str(out)], capsys)
    assert code == 0, stderr
    assert Run.load(out).config.method == toy.name and (out / "report.html").is_file()


def test_methods_that_refuse_contrast_say_which_accept_it(toy, model_dir, tmp_path):
    lm = melbo.load_model(str(model_dir))
    with pytest.raises(MelboError, match="use --method vectors or adapters"):
        melbo.discover(lm, ["Hi"], tmp_path / "x", method=toy.name, reference=lm)


def test_every_method_is_registered_and_unknown_names_list_them():
    assert {"vectors", "adapters", "jacobian"} <= set(METHODS)
    with pytest.raises(MelboError, match="vectors, adapters, jacobian"):
        method_class("no-such-method")
