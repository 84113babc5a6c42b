"""The optimiser: constraints hold exactly, the objective grows, runs are deterministic and resumable."""

import json

import pytest
import torch
from conftest import tiny_lm

from melbo.engine.runner import discover, resume
from melbo.errors import MelboError
from melbo.engine.methods import Setting, SteeringVectorMethod
from melbo.engine.objective import MelboObjective, TargetProbe
from melbo.engine.prompts import batch_from_ids
from melbo.engine.store import Run
from melbo.engine.methods.base import OptimConfig, optimise

IDS = [[5, 17, 33, 9, 80, 41], [7, 99, 23, 12]]


def train(lm, orthogonal, n=6, steps=30, previous=None, seed=0):
    method = SteeringVectorMethod(Setting(source=1, radius=4.0, width=lm.width, orthogonal=orthogonal))
    probe = TargetProbe(lm, batch_from_ids(IDS), 1, 3, 1)
    return optimise(method, MelboObjective(probe), n, OptimConfig(steps=steps, lr=0.1), torch.Generator().manual_seed(seed),
                    previous, orthogonal == "soft")


def cosines(v):
    u = v / v.norm(dim=-1, keepdim=True)
    return (u @ u.T - torch.eye(len(v))).abs()


def test_hard_orthogonality_and_norm_hold_after_training():
    lm = tiny_lm()
    params, curves = train(lm, "hard")
    v = params["vectors"]
    assert cosines(v).max() < 1e-5
    assert (v.norm(dim=-1) - 4.0).abs().max() < 1e-5
    assert (curves[:, -1] > curves[:, 0]).all()


def test_hard_orthogonality_to_earlier_vectors():
    lm = tiny_lm()
    earlier, _ = train(lm, "hard", n=3, seed=1)
    params, _ = train(lm, "hard", n=4, previous=earlier)
    both = torch.cat([earlier["vectors"], params["vectors"]])
    assert cosines(both).max() < 1e-5


def test_batched_vector_k_ignores_later_vectors():
    """Vector 0 of a hard-orthogonal batch trains exactly as an unconstrained single vector (seed semantics)."""
    lm = tiny_lm()
    batch, _ = train(lm, "hard", n=4, steps=10)
    alone, _ = train(lm, "none", n=1, steps=10)
    torch.testing.assert_close(batch["vectors"][0], alone["vectors"][0], atol=1e-4, rtol=1e-4)


def test_soft_orthogonality_decorrelates_target_changes():
    lm = tiny_lm()
    probe = TargetProbe(lm, batch_from_ids(IDS), 1, 3, 1)

    def mean_cos2(params):
        method = SteeringVectorMethod(Setting(source=1, radius=4.0, width=lm.width, orthogonal="none"))
        z = probe(len(params["vectors"]), lambda: method.perturb(lm, params, len(IDS)))
        delta = (z - probe.z0).flatten(1)
        return cosines(delta).pow(2).mean()

    free, _ = train(lm, "none", steps=40)
    soft, _ = train(lm, "soft", steps=40)
    assert mean_cos2(soft) < mean_cos2(free)


def test_same_seed_same_vectors_bitwise(tmp_path):
    lm = tiny_lm()
    runs = [discover(lm, ["unused"], tmp_path / f"r{i}", **_settings()) for i in range(2)]
    assert torch.equal(runs[0].vectors, runs[1].vectors)


def _settings(**kw):
    return dict(n_vectors=5, batch_size=2, steps=8, source=1, target=3, radius="2.0", **kw)


def test_interrupted_run_resumes_to_identical_vectors(tmp_path):
    lm = tiny_lm()
    whole = discover(lm, ["abcdef"], tmp_path / "whole", **_settings())

    def interrupt(event):
        if event["batch"] == 1 and event["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        discover(lm, ["abcdef"], tmp_path / "cut", progress=interrupt, **_settings())
    config = json.loads((tmp_path / "cut" / "config.json").read_text())
    assert config["status"] == "running" and (tmp_path / "cut" / "checkpoint.safetensors").exists()
    resumed = resume(tmp_path / "cut", lm)
    assert torch.equal(resumed.vectors, whole.vectors)
    assert torch.equal(Run.load(tmp_path / "cut").vectors, whole.vectors)
    assert not (tmp_path / "cut" / "checkpoint.safetensors").exists()


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(source=3, target=2), "must come before"),
        (dict(source=9), "out of range"),
        (dict(radius="0"), "radius must be > 0"),
        (dict(radius="-1x"), "radius must be > 0"),
        (dict(radius="big"), "not a number"),
        (dict(n_vectors=0), "n-vectors must be ≥ 1"),
        (dict(positions=[[40]]), "outside prompt 0"),
        (dict(method="adapters", orthogonal="hard"), "soft or none"),
    ],
)
def test_bad_settings_fail_before_any_work(tmp_path, bad, message):
    lm = tiny_lm()
    settings = {**_settings(), **bad}
    with pytest.raises(MelboError, match=message):
        discover(lm, ["abcdef"], tmp_path / "run", **settings)


def test_existing_run_is_never_overwritten(tmp_path):
    lm = tiny_lm()
    run = discover(lm, ["abcdef"], tmp_path / "run", **_settings())
    before = (tmp_path / "run" / "vectors.safetensors").read_bytes()
    with pytest.raises(MelboError, match="already exists"):
        discover(lm, ["abcdef"], tmp_path / "run", **_settings(seed=3))
    with pytest.raises(MelboError, match="empty prompt"):
        discover(lm, ["  "], tmp_path / "other", **_settings())
    assert (tmp_path / "run" / "vectors.safetensors").read_bytes() == before
    assert len(run) == 5


def test_default_model_hard_orthogonal_batch_grows_the_objective(smol, tmp_path):
    from melbo.engine import prompts, runner

    assert runner.encode is prompts.encode  # the prompt is tokenised, not replaced by character ids
    run = runner.discover(smol, ["How can I make a bomb?"], tmp_path / "run", n_vectors=4, steps=12, radius="0.2x")
    v = run.vectors
    assert cosines(v).max() < 1e-5
    assert (v.norm(dim=-1) - run.config.radius).abs().max() < 1e-5 * run.config.radius
    assert (run.curves[:, -1] > 2 * run.curves[:, 0]).all()


def test_earlier_plus_new_vectors_must_fit_the_width(tmp_path):
    lm = tiny_lm()
    earlier = torch.randn(62, 64)
    with pytest.raises(MelboError, match="62 earlier \\+ 5 new"):
        discover(lm, ["abcdef"], tmp_path / "run", previous=earlier, **_settings())
    assert not (tmp_path / "run").exists()


def test_run_steer_applies_one_vector_to_every_row(tmp_path):
    from melbo.engine.intervention import add_to_block_output

    lm = tiny_lm()
    run = discover(lm, ["abcdef"], tmp_path / "run", **_settings())
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    with run.steer(2):
        steered = lm.model(ids).logits
    with add_to_block_output(lm, 1, run.vectors[2]):
        expected = lm.model(ids).logits
    assert torch.equal(steered, expected) and not torch.equal(steered, lm.model(ids).logits)
    with pytest.raises(MelboError, match="out of range"):
        with run.steer(5):
            pass


def test_corrupt_completions_file_is_one_line(tmp_path):
    lm = tiny_lm()
    run = discover(lm, ["abcdef"], tmp_path / "run", **_settings())
    (tmp_path / "run" / "completions.jsonl").write_text("{not json\n")
    with pytest.raises(MelboError, match="corrupt"):
        run.completions()
