"""Exponential Deep Causal Transcoding (DCT): k input/output factor pairs of the source→target map, all at once.

DCT models the change of the target layer caused by a steering vector θ at block s as a sum of factors

    Δ(θ) ≈ Σ_ℓ α_ℓ σ(⟨v_ℓ, θ⟩ / R) u_ℓ,    σ(x) = eˣ − 1,

where Δ(θ) [d] is the change of block t's output averaged over the objective's positions and over the prompts,
v_ℓ are unit input directions at block s and u_ℓ unit output directions at block t. The exponential makes a
factor respond super-linearly at the scale R, which is where MELBO's behaviours live (the Goldilocks radius).

Fit, all k factors in parallel (rows of V, U: [k, d]), `iterations` times:

    V ← QR(V)                       orthonormal rows, also orthogonal to earlier runs' vectors
    Δ_k = Δ(R v_k)                  one batched forward at θ = R·V, graph kept          [k, d]
    U ← Δ / ‖Δ‖                     output direction: where the factor's change points
    V ← ∇_θ⟨Δ(θ), u_k⟩ at R v_k     one backward through the same pass (a vjp per factor), normalised

(The reference updates U from the previous pass; using the current pass's Δ needs no separate U start and
costs nothing: the iteration is a normalised gradient step on ‖Δ(R v)‖, a power iteration of the non-linear
map.) The start comes from the Jacobian J = ∂Z_target/∂θ at 0 (`melbo.engine.methods.jacobian`): V = QR(Jᵀg) for
Gaussian output changes g, one vjp (the reference's "rand_backward"), i.e. random directions weighted by J's
singular values, half a power step that the DCT passes continue at radius R. Starting from the top Jacobian
directions instead (`init_iterations` ≥ 1 power iterations, by finite differences, so in fp32) was measured
slower and worse (`benchmarks/dct_rate.py --compare-start`, SmolLM2, 32 factors, 2 passes: the MELBO objective
7× the same-R random mean instead of 93×, 107 instead of 388 directions per CPU-minute): the linear optimum is a
poorer start for the response at R than a spread of directions weighted by it.
Everything but that alternative start is exact at any precision, so the passes run at the run's --precision.

Rank: after a last QR, one forward gives a_i = ⟨Δ(R v_i), u_i⟩. Under the model,
a_i = Σ_ℓ K_iℓ α_ℓ with K_iℓ = ⟨u_i, u_ℓ⟩ σ(⟨v_i, v_ℓ⟩), so α = K⁻¹a and a factor's score is α². Here V is
orthonormal, so σ(0) = 0 makes K diagonal and α_i = a_i / (e − 1): the rank is the factor's own response at R.
The general solve is the reference's, which ranks nearly (not exactly) orthogonal factors.
The stored vectors are R·v in descending score; the run's config records α and the scores in that order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor

from melbo.engine.intervention import add_to_block_output
from melbo.engine.methods.base import Fit, Params, StepCallback
from melbo.engine.methods.jacobian import JacobianMethod, jacobian_directions, vjp
from melbo.engine.models import LoadedModel
from melbo.engine.objective import TargetProbe
from melbo.engine.prompts import PromptBatch

if TYPE_CHECKING:
    from melbo.settings import DiscoverConfig

INIT_POWER_ITERATIONS = 0  # 0: start from one vjp of random output changes (docstring: measured better)
CHUNK_TOKENS = 2048  # tokens per batched pass: bounds the memory a backward through blocks s+1..t keeps
FD_EPS = 0.01  # finite-difference step of the Jacobian start, as a fraction of the source residual norm


def sigma(x: Tensor) -> Tensor:
    """DCT's exponential non-linearity σ(x) = eˣ − 1 (σ(0) = 0, σ'(0) = 1)."""
    return torch.expm1(x)


def mean_change(probe: TargetProbe, z: Tensor) -> Tensor:
    """Δ per perturbation: target change [k, P, T, d] → mean over each prompt's positions, then prompts → [k, d]."""
    mask = probe.batch.token_mask.to(z.device)  # [P, T]
    change = torch.where(mask[None, :, :, None], z.float() - probe.z0.float(), torch.zeros((), device=z.device))
    per_prompt = change.sum(2) / mask.sum(1).clamp_min(1)[None, :, None]  # [k, P, d]
    return per_prompt.mean(1)


def response(probe: TargetProbe, theta: Tensor, with_pullback: bool) -> tuple[Tensor, Optional[Tensor]]:
    """Δ(θ_k) for rows θ ([k, d]); with `with_pullback` also ∇_θ⟨Δ(θ_k), û_k⟩ with û_k = Δ(θ_k)/‖Δ(θ_k)‖.

    Chunked so that one pass holds at most CHUNK_TOKENS tokens.
    """
    prompts = len(probe.batch)
    deltas, pulls = [], []
    for rows in theta.split(_chunk(probe)):
        point = rows.detach().clone().requires_grad_(with_pullback)
        delta_rows = lambda: add_to_block_output(probe.lm, probe.source,  # noqa: E731
                                                 point.to(probe.lm.device).repeat_interleave(prompts, dim=0))
        with torch.set_grad_enabled(with_pullback):
            delta = mean_change(probe, probe(len(rows), delta_rows))
        if with_pullback:
            u = delta.detach() / delta.detach().norm(dim=-1, keepdim=True).clamp_min(1e-30)
            (delta * u).sum().backward()
            pulls.append(point.grad.detach().cpu())
        deltas.append(delta.detach().cpu())
    return torch.cat(deltas), (torch.cat(pulls) if with_pullback else None)


def solve_alpha(a: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """α from K α = a, K_iℓ = ⟨u_i, u_ℓ⟩ σ(⟨v_i, v_ℓ⟩) (u, v: unit rows [k, d]; a: [k]).

    Least squares, in float64: two factors that converged to the same direction make K singular, and
    the minimum-norm solution then splits their weight instead of failing.
    """
    u64, v64 = u.double(), v.double()
    kernel = (u64 @ u64.T) * sigma(v64 @ v64.T)
    return torch.linalg.lstsq(kernel, a.double()[:, None], driver="gelsd").solution[:, 0].float()


def start(probe: TargetProbe, k: int, generator: torch.Generator, previous: Optional[Tensor],
          iterations: int) -> Tensor:
    """Starting input directions [k, d]: Jacobian directions.

    iterations ≥ 1: the top-k directions of JᵀJ after that many power iterations (finite differences: fp32).
    iterations = 0: Jᵀg for Gaussian output changes g, one vjp: random directions weighted by J's singular
    values, half a power step, exact at any precision; the DCT passes continue the iteration at radius R.
    """
    if iterations > 0:
        eps = FD_EPS * probe.residual_norm()
        return jacobian_directions(probe, k, iterations, generator, eps, previous)[0]
    shape = (k, *probe.z0.shape)
    g = torch.randn(shape, generator=generator) * probe.batch.token_mask[None, :, :, None]
    return torch.cat([vjp(probe, part.to(probe.z0.device)) for part in g.split(_chunk(probe))])


def _chunk(probe: TargetProbe) -> int:
    """Perturbations per batched pass: at most CHUNK_TOKENS tokens."""
    return max(1, CHUNK_TOKENS // (len(probe.batch) * probe.batch.input_ids.shape[1]))


@dataclass
class Factors:
    """A fitted DCT, factors in rank order."""

    v: Tensor  # [k, d] unit input directions at block s (orthonormal rows)
    u: Tensor  # [k, d] unit output directions at block t
    alpha: Tensor  # [k]
    score: Tensor  # [k] α², descending
    history: Tensor  # [k, iterations + 1]: ⟨Δ(R v_k), u_k⟩ after each pass


def fit_factors(
    probe: TargetProbe,
    k: int,
    radius: float,
    iterations: int,
    generator: torch.Generator,
    previous: Optional[Tensor] = None,
    on_step: Optional[StepCallback] = None,
    init_iterations: int = INIT_POWER_ITERATIONS,
) -> Factors:
    """k DCT factors at radius R (orthogonal to `previous` rows, if given), ranked by α² (module docstring)."""
    basis = None
    if previous is not None and len(previous):
        basis = torch.linalg.qr(previous.double().T).Q.T.float()  # [m, d]

    def orthonormal(x: Tensor) -> Tensor:
        if basis is not None:
            x = x - (x @ basis.T) @ basis
        q = torch.linalg.qr(x.T).Q.T
        if basis is not None:  # once more: QR of nearly deflated rows can pick up the basis again by rounding
            q = torch.linalg.qr((q - (q @ basis.T) @ basis).T).Q.T
        return q

    v = start(probe, k, generator, previous, init_iterations)
    history = torch.zeros(k, iterations + 1)
    for step in range(iterations):
        v = orthonormal(v)
        delta, pull = response(probe, radius * v, with_pullback=True)
        history[:, step] = delta.norm(dim=-1)  # = ⟨Δ_k, u_k⟩ with u_k = Δ_k / ‖Δ_k‖
        if on_step:
            on_step(step, history[:, step])
        u = delta / delta.norm(dim=-1, keepdim=True).clamp_min(1e-30)
        v = pull / pull.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    v = orthonormal(v)
    delta, _ = response(probe, radius * v, with_pullback=False)
    if iterations == 0:
        u = delta / delta.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    a = (delta * u).sum(-1)
    history[:, iterations] = a
    if on_step:
        on_step(iterations, a)
    alpha = solve_alpha(a, u, v)
    score = alpha.pow(2)
    order = torch.sort(score, descending=True, stable=True).indices
    return Factors(v[order], u[order], alpha[order], score[order], history[order])


class DCTMethod(JacobianMethod):
    """Exponential DCT at radius R: one fit for all k factors (they are orthogonalised together).

    It shares the Jacobian method's shape (vectors added to block s's output, one unbatched fit, `--power-iterations`
    as its passes, no reference model) and differs in its probe's precision and in the fit.
    """

    name = "dct"

    def objective(self, lm: LoadedModel, batch: PromptBatch, target: int, cfg: "DiscoverConfig",
                  reference: Optional[LoadedModel]) -> TargetProbe:
        # Forward and vjp passes only (no finite differences): bf16 is exact enough, and 2.5× faster on AMX.
        return TargetProbe(lm, batch, self.s.source, target, self.replay_upto(self.s.source), cfg.precision)

    def fit(self, objective: TargetProbe, n: int, previous: Optional[Params], generator: torch.Generator,
            on_step: Optional[StepCallback] = None) -> Fit:
        earlier = previous["vectors"] if previous is not None else None
        f = fit_factors(objective, n, self.s.radius, self.s.power_iterations, generator, earlier, on_step)
        record = {"dct": {"alpha": f.alpha.tolist(), "score": f.score.tolist(), "nonlinearity": "exp(x) - 1",
                          "iterations": self.s.power_iterations,
                          "init": "jacobian vjp of random output changes" if INIT_POWER_ITERATIONS == 0 else
                          f"top jacobian directions, {INIT_POWER_ITERATIONS} power iterations"}}
        return Fit({"vectors": f.v * self.s.radius}, f.history, record)
