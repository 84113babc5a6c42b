"""Unsupervised steering vectors: θ ∈ R^d on the sphere ‖θ‖ = R, added to block s's output.

Batched orthogonality, and why it is the seed's semantics
---------------------------------------------------------
The seed trains vectors one at a time; vector k is optimised on {‖θ‖ = R} ∩ span(θ_0..θ_{k-1})^⊥ with the
earlier vectors frozen. Here a batch of n vectors is optimised together, and vector k is constrained to the
orthogonal complement of the earlier runs' vectors and of vectors 0..k-1 *of the current iterate*:
its gradient is projected onto that complement (and onto the sphere's tangent space), and after each step
Gram–Schmidt in batch order plus rescaling to R retracts the batch onto the constraint set. Vector k never
sees vectors after it, so vector 0 solves the unconstrained problem, vector 1 the problem orthogonal to
vector 0, and so on: at convergence every vector is a stationary point of exactly the problem the seed solves
for it, given the same predecessors. The only difference is that predecessors still move while vector k
trains, which the retraction keeps consistent at every step. Batches after the first see all vectors of the
earlier batches as fixed predecessors, exactly like the seed.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from melbo.engine.intervention import SteeringVectors, add_to_block_output
from melbo.engine.methods.base import GradientMethod, Params, check_orthogonal_fit
from melbo.engine.models import LoadedModel

if TYPE_CHECKING:
    from melbo.settings import DiscoverConfig


def orthonormalise(x: Tensor, basis: Tensor | None = None) -> Tensor:
    """Gram–Schmidt in row order: row k ⟂ basis rows and rows 0..k-1. Returns unit rows ([n, d])."""
    d = x.shape[1]
    q = (basis if basis is not None else x.new_zeros(0, d)).double()
    rows = []
    for v in x.double():
        for _ in range(2):  # twice is enough: re-orthogonalisation fixes the first pass's rounding
            v = v - q.T @ (q @ v)
        v = v / v.norm()
        rows.append(v)
        q = torch.cat([q, v[None]])
    return torch.stack(rows).to(x.dtype)


def _unit(previous: Params | None) -> Tensor | None:
    if previous is None or previous["vectors"].shape[0] == 0:
        return None
    return orthonormalise(previous["vectors"])


class SteeringVectorMethod(GradientMethod):
    name = "vectors"
    artifact_kind = SteeringVectors

    @classmethod
    def check(cls, cfg: "DiscoverConfig", lm: LoadedModel, earlier: int) -> None:
        check_orthogonal_fit(cfg, lm, earlier)

    def replay_upto(self, source: int) -> int:
        return source  # added to block s's output: blocks 0..s never see it

    def init(self, n: int, generator: torch.Generator, previous: Params | None) -> Params:
        x = torch.randn(n, self.s.width, generator=generator)  # Gaussian → uniform direction on the sphere
        theta = x / x.norm(dim=-1, keepdim=True) * self.s.radius
        params = {"vectors": theta.requires_grad_(True)}
        self.retract(params, previous)
        return params

    def param_groups(self, params: Params, lr: float) -> list[dict]:
        # A coordinate of a random θ on the sphere is about R/√d: step sizes are fractions of that.
        return [{"params": [params["vectors"]], "lr": lr * self.s.radius / math.sqrt(self.s.width)}]

    def perturb(self, lm: LoadedModel, params: Params, prompts: int) -> AbstractContextManager:
        delta = params["vectors"].repeat_interleave(prompts, dim=0).to(lm.device, lm.dtype)
        return add_to_block_output(lm, self.s.source, delta)

    def project_grad(self, params: Params, previous: Params | None) -> None:
        theta = params["vectors"]
        grad = theta.grad
        unit = theta.detach() / theta.detach().norm(dim=-1, keepdim=True)
        if self.s.orthogonal == "hard":
            prev = _unit(previous)
            n = unit.shape[0]
            basis = unit if prev is None else torch.cat([prev, unit])
            # Row k may not move along the earlier runs' vectors, its predecessors in the batch, or itself.
            allowed = torch.ones(n, basis.shape[0], dtype=torch.bool)
            allowed[:, basis.shape[0] - n :] = torch.tril(torch.ones(n, n, dtype=torch.bool))
            coef = (grad @ basis.T) * allowed
            grad -= coef @ basis
        else:
            grad -= (grad * unit).sum(-1, keepdim=True) * unit

    def retract(self, params: Params, previous: Params | None) -> None:
        theta = params["vectors"]
        with torch.no_grad():
            if self.s.orthogonal == "hard":
                theta.copy_(orthonormalise(theta, _unit(previous)) * self.s.radius)
            else:
                theta.copy_(theta / theta.norm(dim=-1, keepdim=True) * self.s.radius)

    def artifact(self, params: Params) -> SteeringVectors:
        return SteeringVectors(params["vectors"].detach().clone(), self.s.source)
