"""The optimiser: AMSGrad with projected gradients on a method's constraint manifold, n perturbations at once.

One step, for a batch of n perturbations (shapes: N = n, P prompts, T tokens, d width):
    F, ΔZ = objective(n, perturb)             [N], [N, P, T, d]  (e.g. `MelboObjective`: prefix replayed,
                                                                  stopped at the target; or a contrastive one)
    loss = -Σ F  (+ soft-orthogonality penalty on ΔZ)   rows are independent, so Σ gives each row its own gradient
    grad ← projected onto the tangent space; AMSGrad step; retract onto the constraint set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from melbo.methods.base import GradientMethod, Params, StepCallback
from melbo.objective import Objective


@dataclass(frozen=True)
class OptimConfig:
    steps: int = 300
    lr: float = 0.05  # relative: a fraction of a parameter's typical coordinate size per step
    betas: tuple[float, float] = (0.9, 0.98)  # the seed's
    soft_weight: float = 1.0  # only with orthogonal="soft"


def soft_orthogonality_penalty(change: Tensor, token_mask: Tensor, objective: Tensor) -> Tensor:
    """Penalty on aligned target-layer changes ΔZ between perturbations of one batch (comment thread).

    Σ_{i≠j} cos²(ΔZ_i, ΔZ_j) / (n − 1), with ΔZ flattened over prompts, positions and width, scaled by the
    batch's mean objective (detached) so that `soft_weight` is dimensionless: weight 1 makes two fully aligned
    perturbations cost as much as a mean objective.
    """
    n = change.shape[0]
    if n < 2:
        return change.new_zeros(())
    delta = torch.where(token_mask[None, :, :, None], change, torch.zeros((), dtype=change.dtype)).flatten(1)
    unit = delta / delta.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    cos2 = (unit @ unit.T).pow(2)
    off_diagonal = cos2.sum() - cos2.diagonal().sum()
    return objective.detach().abs().mean() * off_diagonal / (n - 1)


def optimise(
    method: GradientMethod,
    objective: Objective,
    n: int,
    config: OptimConfig,
    generator: torch.Generator,
    previous: Optional[Params] = None,
    soft: bool = False,
    on_step: Optional[StepCallback] = None,
) -> tuple[Params, Tensor]:
    """Train n perturbations together. Returns (params, objective curves [n, steps + 1])."""
    params = method.init(n, generator, previous)
    optimiser = torch.optim.AdamW(
        method.param_groups(params, config.lr), betas=config.betas, weight_decay=0.0, amsgrad=True
    )
    prompts = len(objective.batch)
    curves = torch.zeros(n, config.steps + 1)
    for step in range(config.steps + 1):
        measured = objective(n, lambda lm: method.perturb(lm, params, prompts))
        curves[:, step] = measured.value.detach().cpu()
        if on_step:
            on_step(step, curves[:, step])
        if step == config.steps:  # the last pass only measures the final parameters
            break
        loss = -measured.value.sum()
        if soft:
            mask = objective.batch.token_mask.to(measured.change.device)
            loss = loss + config.soft_weight * soft_orthogonality_penalty(measured.change, mask, measured.value)
        optimiser.zero_grad(set_to_none=False)
        loss.backward()
        with torch.no_grad():
            method.project_grad(params, previous)
            optimiser.step()
            method.retract(params, previous)
    for x in params.values():
        x.requires_grad_(False)
    return params, curves
