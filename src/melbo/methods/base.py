"""The interface every gradient-trained discovery method implements (steering vectors, steering adapters).

A method owns its parameters' manifold (norm and orthogonality constraints) and how its parameters enter the
model; the optimiser (`melbo.train`) owns the objective and the AMSGrad loop. A new method is one new file.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from melbo.intervention import Perturbations
from melbo.models import LoadedModel

Params = dict[str, Tensor]


@dataclass(frozen=True)
class Setting:
    """What a method needs to know about the problem (all already validated)."""

    source: int
    radius: float
    width: int
    rank: int = 1
    orthogonal: str = "hard"  # "hard" | "soft" | "none"


class Method(Protocol):
    name: str

    def replay_upto(self, source: int) -> int:
        """Last block whose output does not depend on the parameters (its output can be cached)."""

    def init(self, n: int, generator: torch.Generator, previous: Params | None) -> Params:
        """n random starting points on the constraint manifold."""

    def param_groups(self, params: Params, lr: float) -> list[dict]:
        """Optimiser parameter groups; `lr` is relative to each parameter's typical coordinate size."""

    def perturb(self, lm: LoadedModel, params: Params, prompts: int) -> AbstractContextManager:
        """Apply params[k] to batch rows k * prompts ... (k + 1) * prompts - 1."""

    def project_grad(self, params: Params, previous: Params | None) -> None:
        """Project gradients onto the tangent space of the constraint set (in place)."""

    def retract(self, params: Params, previous: Params | None) -> None:
        """Map parameters back onto the constraint set after a step (in place)."""

    def artifact(self, params: Params) -> Perturbations:
        """The trained parameters as a stored, appliable artefact."""
