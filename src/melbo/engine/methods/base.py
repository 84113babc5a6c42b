"""The interface every discovery method implements, and the base of the gradient-trained ones.

A method is registered by name (`melbo.engine.methods.register_method`) and the run driver (`melbo.engine.runner`) knows
nothing else about it: it validates the settings through `check`, builds what the method trains against with
`objective`, and calls `fit` once per batch (once in all when the method is not `batched`), checkpointing the
returned parameters; `artifact(params)` turns the concatenated parameters into the stored result, whose class
(`artifact_kind`) owns the file format.

Gradient methods (`GradientMethod`: steering vectors, steering adapters) own their parameters' manifold (norm
and orthogonality constraints) and how the parameters enter the model; the optimiser (`optimise`, below) owns the
AMSGrad loop. One step of it, for a batch of n perturbations (shapes: N = n, P prompts, T tokens, d width):

    F, ΔZ = objective(n, perturb)             [N], [N, P, T, d]  (e.g. `MelboObjective`: prefix replayed,
                                                                  stopped at the target; or a contrastive one)
    loss = -Σ F  (+ soft-orthogonality penalty on ΔZ)   rows are independent, so Σ gives each row its own gradient
    grad ← projected onto the tangent space; AMSGrad step; retract onto the constraint set.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ClassVar, Optional, Protocol

import torch
from torch import Tensor

from melbo.engine.contrastive import ContrastiveObjective
from melbo.errors import MelboError
from melbo.engine.intervention import Perturbations
from melbo.engine.models import LoadedModel
from melbo.engine.objective import MelboObjective, Objective, TargetProbe
from melbo.engine.prompts import PromptBatch
from melbo.settings import DEFAULTS

if TYPE_CHECKING:
    from melbo.settings import DiscoverConfig

Params = dict[str, Tensor]
StepCallback = Callable[[int, Tensor], None]  # (step, objective per perturbation [n])


@dataclass(frozen=True)
class Setting:
    """What a method needs to know about the problem (all already validated and resolved)."""

    source: int
    radius: float
    width: int
    rank: int = 1
    orthogonal: str = "hard"  # "hard" | "soft" | "none"
    steps: int = DEFAULTS.steps
    lr: float = DEFAULTS.lr
    soft_weight: float = DEFAULTS.soft_weight
    power_iterations: int = DEFAULTS.power_iterations
    residual_norm: float = 1.0  # median residual norm at the source: the scale of finite differences

    @classmethod
    def of(cls, cfg: "DiscoverConfig", source: int, radius: float, width: int, residual_norm: float) -> "Setting":
        return cls(source=source, radius=radius, width=width, rank=cfg.rank, orthogonal=cfg.orthogonal,
                   steps=cfg.steps, lr=cfg.lr, soft_weight=cfg.soft_weight, power_iterations=cfg.power_iterations,
                   residual_norm=residual_norm)


@dataclass
class Fit:
    """One `fit` call's result: parameters (checkpointed, concatenated over batches) and their curves."""

    params: Params
    curves: Tensor  # [n, steps + 1]: the quantity each step maximised
    record: dict  # facts for the run's config.json (e.g. singular values)


class Method(Protocol):
    """A discovery method, as the run driver sees it."""

    name: ClassVar[str]
    artifact_kind: ClassVar[type]  # SteeringVectors or SteeringAdapters: the result's type and file format
    supports_contrast: ClassVar[bool]  # may it train against a ContrastiveObjective?
    batched: ClassVar[bool]  # False: all n perturbations in one fit (no checkpoint between)
    steps: int  # steps of one fit, for progress

    @classmethod
    def check(cls, cfg: "DiscoverConfig", lm: LoadedModel, earlier: int) -> None:
        """Refuse settings this method cannot train (MelboError); `earlier` vectors come from --orthogonal-to."""

    @classmethod
    def create(cls, lm: LoadedModel, setting: Setting) -> "Method": ...

    def replay_upto(self, source: int) -> int:
        """Last block whose output does not depend on the parameters (its output can be cached)."""

    def objective(self, lm: LoadedModel, batch: PromptBatch, target: int, cfg: "DiscoverConfig",
                  reference: Optional[LoadedModel]) -> Objective | TargetProbe:
        """What `fit` maximises (or probes)."""

    def fit(self, objective, n: int, previous: Optional[Params], generator: torch.Generator,
            on_step: Optional[StepCallback] = None) -> Fit:
        """n new perturbations, orthogonal where the method says so to `previous` ({"vectors": [m, d]})."""

    def artifact(self, params: Params) -> Perturbations:
        """The trained parameters as a stored, appliable artefact."""


class GradientMethod:
    """Shared by methods trained by `optimise` (below): subclasses define the manifold and the hook."""

    name: ClassVar[str]
    artifact_kind: ClassVar[type]
    supports_contrast: ClassVar[bool] = True
    batched: ClassVar[bool] = True

    def __init__(self, setting: Setting):
        self.s = setting
        self.steps = setting.steps

    @classmethod
    def check(cls, cfg: "DiscoverConfig", lm: LoadedModel, earlier: int) -> None:
        pass

    @classmethod
    def create(cls, lm: LoadedModel, setting: Setting) -> "GradientMethod":
        return cls(setting)

    def replay_upto(self, source: int) -> int:
        return source - 1  # safe for any method acting inside block s; vectors act on its output and override

    def objective(self, lm: LoadedModel, batch: PromptBatch, target: int, cfg: "DiscoverConfig",
                  reference: Optional[LoadedModel]) -> Objective:
        """The seed's MELBO objective, or a contrastive one when the run has a reference model."""
        replay = self.replay_upto(self.s.source)
        if cfg.contrast is not None:
            return ContrastiveObjective(lm, reference, batch, self.s.source, target, replay, cfg.contrast, cfg.p,
                                        cfg.q, cfg.contrast_weight, cfg.precision, cfg.compile)
        probe = TargetProbe(lm, batch, self.s.source, target, replay, cfg.precision, cfg.compile)
        return MelboObjective(probe, cfg.p, cfg.q)

    def fit(self, objective: Objective, n: int, previous: Optional[Params], generator: torch.Generator,
            on_step: Optional[StepCallback] = None) -> Fit:
        config = OptimConfig(steps=self.s.steps, lr=self.s.lr, soft_weight=self.s.soft_weight)
        params, curves = optimise(self, objective, n, config, generator, previous, self.s.orthogonal == "soft",
                                  on_step)
        return Fit(params, curves, {})

    # ---- what optimise needs (subclasses)
    def init(self, n: int, generator: torch.Generator, previous: Params | None) -> Params:
        """n random starting points on the constraint manifold."""
        raise NotImplementedError

    def param_groups(self, params: Params, lr: float) -> list[dict]:
        """Optimiser parameter groups; `lr` is relative to each parameter's typical coordinate size."""
        raise NotImplementedError

    def perturb(self, lm: LoadedModel, params: Params, prompts: int) -> AbstractContextManager:
        """Apply params[k] to batch rows k * prompts ... (k + 1) * prompts - 1."""
        raise NotImplementedError

    def project_grad(self, params: Params, previous: Params | None) -> None:
        """Project gradients onto the tangent space of the constraint set (in place)."""
        raise NotImplementedError

    def retract(self, params: Params, previous: Params | None) -> None:
        """Map parameters back onto the constraint set after a step (in place)."""
        raise NotImplementedError

    def artifact(self, params: Params) -> Perturbations:
        raise NotImplementedError


def check_orthogonal_fit(cfg: "DiscoverConfig", lm: LoadedModel, earlier: int) -> None:
    """Methods that return orthogonal vectors: the earlier and the new ones must fit in the model's width."""
    if earlier + cfg.n_vectors > lm.width:
        what = f"{earlier} earlier + {cfg.n_vectors} new" if earlier else f"{cfg.n_vectors}"
        raise MelboError(f"{what} orthogonal vectors do not fit in width {lm.width}: ask for fewer")


# ------------------------------------------------------------------------------------------------ the optimiser
@dataclass(frozen=True)
class OptimConfig:
    steps: int = DEFAULTS.steps
    lr: float = DEFAULTS.lr  # relative: a fraction of a parameter's typical coordinate size per step
    betas: tuple[float, float] = (0.9, 0.98)  # the seed's
    soft_weight: float = DEFAULTS.soft_weight  # only with orthogonal="soft"


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
