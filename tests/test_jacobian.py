"""Jacobian directions by batched power iteration match the exact SVD of ∂Z_target/∂θ."""

import torch
from conftest import tiny_lm

from melbo.engine.intervention import add_to_block_output
from melbo.engine.methods.jacobian import jacobian_directions
from melbo.engine.objective import TargetProbe
from melbo.engine.prompts import batch_from_ids, token_mask

IDS = [[5, 17, 33, 9, 80, 41], [7, 99, 23, 12]]


def exact_jacobian(probe):
    """J by central differences in float64, all 2d perturbed copies in one batched pass: [P*T*d, d]."""
    eye = torch.eye(64, dtype=torch.float64) * 1e-6
    rows = torch.cat([eye, -eye]).repeat_interleave(len(IDS), dim=0)
    z = probe(128, lambda: add_to_block_output(probe.lm, probe.source, rows))
    z = z * probe.batch.token_mask[None, ..., None]
    return ((z[:64] - z[64:]) / 2e-6).flatten(1).T


def test_power_iteration_finds_the_top_singular_directions():
    lm = tiny_lm("llama")
    lm.model.double()
    batch = batch_from_ids(IDS)
    batch.token_mask = token_mask(batch, "last:3")
    probe = TargetProbe(lm, batch, 1, 3, 1)
    _, s, vh = torch.linalg.svd(exact_jacobian(probe), full_matrices=False)
    s, vh = s.float(), vh.float()
    directions, sigma2, history = jacobian_directions(probe, 8, 25, torch.Generator().manual_seed(0), eps=1e-2)
    assert torch.allclose(directions @ directions.T, torch.eye(8), atol=1e-5)
    for i in range(3):
        assert abs(float(directions[i] @ vh[i])) > 0.99, f"direction {i} misses the exact singular vector"
    torch.testing.assert_close(sigma2[:3].sqrt(), s[:3], rtol=1e-2, atol=0)
    assert history.shape == (8, 26) and history[0, -1] >= history[0, 0]


def test_directions_avoid_previous_vectors():
    lm = tiny_lm("llama")
    probe = TargetProbe(lm, batch_from_ids(IDS), 1, 3, 1)
    first, _, _ = jacobian_directions(probe, 3, 10, torch.Generator().manual_seed(0), eps=1e-2)
    more, _, _ = jacobian_directions(probe, 3, 10, torch.Generator().manual_seed(1), eps=1e-2, previous=first)
    assert (first @ more.T).abs().max() < 1e-4


def test_jacobian_method_writes_a_run(tmp_path):
    from melbo.engine import runner

    run = runner.discover(tiny_lm("llama"), ["hello"], tmp_path / "run", method="jacobian", n_vectors=4,
                          power_iterations=5, source=1, target=3, radius="2.0")
    assert run.vectors.shape == (4, 64) and torch.allclose(run.vectors.norm(dim=-1), torch.full((4,), 2.0))
    assert len(run.config.record["singular_values"]) == 4 and run.curves.shape == (4, 6)
