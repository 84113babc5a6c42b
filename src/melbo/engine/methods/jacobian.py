"""Jacobian directions: the top right-singular vectors of J = ∂Z_target/∂θ at θ = 0, by block power iteration.

For small θ, Z(θ) − Z(0) ≈ Jθ, so the MELBO objective with p = 2, q = 1 is ≈ θᵀJᵀJθ: its leading
eigenvectors are the directions that change the target layer most to first order ("power steering").
All k directions are iterated in parallel, as one batch:

    U = J V        central difference (Z(εV) − Z(−εV)) / 2ε, the 2k rows in one forward pass   [k, P·T·d]
    W = Jᵀ U       one backward pass through the same batched forward at θ = 0 (exact vjp)     [k, d]
    V ← QR(W)      orthonormalise; after the last product, a Rayleigh–Ritz step rotates V to the
                   eigenvectors of the k×k matrix V JᵀJ Vᵀ and gives σ² for each direction.

Cost: about three batched passes per iteration, against hundreds of optimiser steps for learned vectors.
These directions are linear-regime perturbations; learned vectors at the Goldilocks R reach non-linear ones.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

import torch
from torch import Tensor

from melbo.engine.intervention import SteeringVectors, add_to_block_output
from melbo.engine.methods.base import Fit, Params, Setting, StepCallback, check_orthogonal_fit
from melbo.engine.models import LoadedModel
from melbo.engine.objective import TargetProbe
from melbo.engine.prompts import PromptBatch

if TYPE_CHECKING:
    from melbo.settings import DiscoverConfig


def jvp(probe: TargetProbe, v: Tensor, eps: float) -> Tensor:
    """J v for each row of v ([k, d]) by a central difference, restricted to the objective's positions."""
    k, prompts = v.shape[0], len(probe.batch)
    delta = torch.cat([v, -v]) * eps
    rows = delta.repeat_interleave(prompts, dim=0).to(probe.lm.device, probe.lm.dtype)
    with torch.no_grad():
        z = probe(2 * k, lambda: add_to_block_output(probe.lm, probe.source, rows)).float()
    u = (z[:k] - z[k:]) / (2 * eps)  # [k, P, T, d]
    return u * probe.batch.token_mask.to(u.device)[None, :, :, None]


def vjp(probe: TargetProbe, u: Tensor) -> Tensor:
    """Jᵀ u for each row of u ([k, P, T, d]): gradient of ⟨Z(θ_k), u_k⟩ w.r.t. θ_k at θ_k = 0."""
    k, prompts = u.shape[0], len(probe.batch)
    theta = torch.zeros(k, probe.lm.width, device=probe.lm.device, requires_grad=True)
    rows = lambda: add_to_block_output(probe.lm, probe.source, theta.repeat_interleave(prompts, dim=0))  # noqa: E731
    z = probe(k, rows).float()
    (z * u).sum().backward()
    return theta.grad.detach().cpu()


def jacobian_directions(
    probe: TargetProbe,
    k: int,
    iterations: int,
    generator: torch.Generator,
    eps: float,
    previous: Optional[Tensor] = None,
    on_step: Optional[Callable[[int, Tensor], None]] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k right singular vectors of J (orthogonal to `previous`, if given).

    Returns (unit directions [k, d], σ² per direction [k], Rayleigh quotients per iteration [k, iterations + 1]).
    """
    d = probe.lm.width
    basis = None
    if previous is not None and len(previous):
        basis = torch.linalg.qr(previous.double().T).Q.T.float()  # [m, d]

    def deflate(x: Tensor) -> Tensor:
        return x if basis is None else x - (x @ basis.T) @ basis

    v = torch.linalg.qr(deflate(torch.randn(k, d, generator=generator)).T).Q.T  # [k, d], orthonormal rows
    history = torch.zeros(k, iterations + 1)
    for step in range(iterations + 1):
        w = deflate(vjp(probe, jvp(probe, v, eps)))  # JᵀJ v
        history[:, step] = (w * v).sum(-1)  # Rayleigh quotients
        if on_step:
            on_step(step, history[:, step])
        if step == iterations:
            break
        v = torch.linalg.qr(w.T).Q.T
    # Rayleigh–Ritz: diagonalise the projected operator, order by σ².
    small = v @ w.T
    values, vectors = torch.linalg.eigh((small + small.T) / 2)
    order = values.argsort(descending=True)
    directions = vectors[:, order].T @ v
    return directions / directions.norm(dim=-1, keepdim=True), values[order], history


class JacobianMethod:
    """Top-k Jacobian directions at radius R: one fit for all k (power iteration needs them together)."""

    name = "jacobian"
    artifact_kind = SteeringVectors
    supports_contrast = False  # a reference model has no place in J's power iteration
    batched = False

    def __init__(self, setting: Setting):
        self.s = setting
        self.steps = setting.power_iterations

    @classmethod
    def check(cls, cfg: "DiscoverConfig", lm: LoadedModel, earlier: int) -> None:
        check_orthogonal_fit(cfg, lm, earlier)

    @classmethod
    def create(cls, lm: LoadedModel, setting: Setting) -> "JacobianMethod":
        return cls(setting)

    def replay_upto(self, source: int) -> int:
        return source

    def objective(self, lm: LoadedModel, batch: PromptBatch, target: int, cfg: "DiscoverConfig",
                  reference: Optional[LoadedModel]) -> TargetProbe:
        # Finite differences need full precision, whatever --precision says.
        return TargetProbe(lm, batch, self.s.source, target, self.replay_upto(self.s.source), "fp32")

    def fit(self, objective: TargetProbe, n: int, previous: Optional[Params], generator: torch.Generator,
            on_step: Optional[StepCallback] = None) -> Fit:
        eps = 0.01 * self.s.residual_norm
        earlier = previous["vectors"] if previous is not None else None
        directions, sigma2, history = jacobian_directions(objective, n, self.s.power_iterations, generator, eps,
                                                          earlier, on_step)
        record = {"singular_values": sigma2.clamp_min(0).sqrt().tolist(), "finite_difference_eps": eps}
        return Fit({"vectors": directions * self.s.radius}, history, record)

    def artifact(self, params: Params) -> SteeringVectors:
        return SteeringVectors(params["vectors"].clone(), self.s.source)
