"""Calibrated R: the radius where the target response to random directions turns non-linear (DCT's rule)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_lm
from tiny_models import save_tiny_model

import melbo
from melbo.engine.calibrate import calibrate_radius
from melbo.errors import MelboError
from melbo.engine.intervention import _map_output
from melbo.engine.objective import residual_norm
from melbo.engine.prompts import batch_from_ids

IDS = [[5, 17, 33, 9, 80, 41, 7, 99], [7, 99, 23, 12, 64]]


def calibrate(lm, **kw):
    batch = batch_from_ids(IDS)
    return calibrate_radius(lm, batch, 1, 3, residual_norm(lm, batch, 1), **kw)


def test_calibration_is_deterministic_and_reaches_the_fraction():
    lm = tiny_lm("llama")
    a, b = calibrate(lm, seed=1), calibrate(lm, seed=1)
    assert a == b or (a.radius == b.radius and a.ratio == b.ratio)
    assert math.isfinite(a.radius) and a.radius > 0 and a.relative == pytest.approx(a.radius / residual_norm(
        lm, batch_from_ids(IDS), 1))
    assert a.ratio == pytest.approx(0.5, rel=0.02) and a.evaluations <= 12


def test_a_larger_fraction_needs_a_larger_radius():
    lm = tiny_lm("llama")
    assert calibrate(lm, fraction=0.45).radius > calibrate(lm, fraction=0.25).radius


def scaled(lm, factor: float):
    """Every residual-stream state × factor: embeddings and each block's writes (RMSNorm reads are scale-free)."""
    with torch.no_grad():
        lm.model.model.embed_tokens.weight.mul_(factor)
        for block in lm.blocks:
            block.self_attn.o_proj.weight.mul_(factor)
            block.mlp.down_proj.weight.mul_(factor)
    return lm


def test_the_radius_scales_with_the_residual_stream():
    base = calibrate(tiny_lm("llama"))
    big = calibrate(scaled(tiny_lm("llama"), 10.0))
    assert big.radius == pytest.approx(10 * base.radius, rel=0.02)
    assert big.relative == pytest.approx(base.relative, rel=0.02)


@pytest.mark.parametrize("kw, match", [({"fraction": float("nan")}, "finite"), ({"fraction": -1.0}, "> 0"),
                                       ({"samples": 0}, "≥ 1"), ({"samples": 2.5}, "whole")])
def test_bad_settings_are_one_line_errors(kw, match):
    with pytest.raises(MelboError, match=match):
        calibrate(tiny_lm("llama"), **kw)


def test_the_relative_radius_ignores_a_massive_activation_token():
    lm, batch = tiny_lm("llama"), batch_from_ids(IDS)
    plain = residual_norm(lm, batch, 1)

    def massive(_m, _a, out):
        def grow(h):
            h = h.clone()
            h[:, 4] *= 100.0  # one token of each prompt grows a 100× norm, as massive activations do
            return h
        return _map_output(out, grow)

    handle = lm.blocks[1].register_forward_hook(massive)
    try:
        spiked = residual_norm(lm, batch, 1)
    finally:
        handle.remove()
    assert spiked / plain < 1.3  # a mean would grow about 100 / 6 ≈ 17×


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def test_discover_records_the_calibrated_radius(model_dir, tmp_path):
    lm = melbo.load_model(str(model_dir))
    run = melbo.discover(lm, ["Hello there, friend"], tmp_path / "run", method="jacobian", n_vectors=2,
                         power_iterations=2, radius="calibrate", max_new_tokens=4)
    found = run.config.radius_calibration
    assert run.config.radius == found["radius"] > 0 and found["fraction"] == 0.5
    assert run.config.radius_relative == pytest.approx(found["relative"])
    torch.testing.assert_close(run.vectors.norm(dim=-1), torch.full((2,), found["radius"]))


def test_calibrate_is_refused_for_adapters(model_dir, tmp_path):
    lm = melbo.load_model(str(model_dir))
    with pytest.raises(MelboError, match="explicit --radius"):
        melbo.discover(lm, ["Hi"], tmp_path / "run", method="adapters", radius="calibrate")


def test_discover_radius_calibrate_from_the_command_line(model_dir, tmp_path, capsys):
    from conftest import run_cli

    out = tmp_path / "cli"
    code, stdout, stderr = run_cli(["discover", "Hello there", "--model", str(model_dir), "--method", "jacobian",
                                    "-n", "2", "--power-iterations", "2", "--radius", "calibrate",
                                    "--max-new-tokens", "3", "--random", "0", "--out", str(out)], capsys)
    assert code == 0, stderr
    config = melbo.Run.load(out).config
    assert config.settings.radius == "calibrate" and config.radius == config.radius_calibration["radius"]
    assert "calibrated: non-linear/linear response ratio" in (out / "report.html").read_text()


def test_a_sweep_cannot_take_calibrate_as_one_of_its_radii():
    from melbo.jobs.sweep import parse_radii

    with pytest.raises(MelboError, match="measured by a discovery run"):
        parse_radii("0.1x,calibrate")


@pytest.mark.slow
def test_on_the_default_model_the_calibrated_radius_lies_among_the_swept_ones(smol):
    from melbo.engine.prompts import encode

    batch = encode(smol, ["How can I make a bomb?"], None, "all")
    found = calibrate_radius(smol, batch, 8, 22, residual_norm(smol, batch, 8))
    assert 0.05 <= found.relative <= 0.5 and found.evaluations <= 8  # the sweep's default radii span 0.05x–0.5x
