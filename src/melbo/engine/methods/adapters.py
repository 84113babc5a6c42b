"""Unsupervised steering adapters: a rank-r LoRA on block s's MLP output weight.

W' = W + R · Ω_B Ω_Aᵀ, Ω_A ∈ R^{h×r}, Ω_B ∈ R^{d×r}, every column of Ω_A and Ω_B of unit norm. The adapter
acts inside block s, so only blocks 0..s-1 can be cached. Hard orthogonality between adapters is not defined
by the seed; use "soft" (penalise aligned target-layer changes) or "none".
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

import torch

from melbo.errors import MelboError
from melbo.engine.intervention import SteeringAdapters, add_lora
from melbo.engine.layers import find_mlp_out
from melbo.engine.methods.base import GradientMethod, Params, Setting
from melbo.engine.models import LoadedModel

if TYPE_CHECKING:
    from melbo.settings import DiscoverConfig


def _mlp_hidden_width(lm: LoadedModel, source: int) -> int:
    _, module = find_mlp_out(lm.blocks[source])
    weight = module.weight
    # nn.Linear stores [out, in]; GPT-2's Conv1D stores [in, out].
    return int(weight.shape[1] if weight.shape[0] == lm.width else weight.shape[0])


def _check_orthogonality(orthogonal: str) -> None:
    if orthogonal == "hard":
        raise MelboError("hard orthogonality is defined for steering vectors only: use --orthogonal soft or none")


class SteeringAdapterMethod(GradientMethod):
    name = "adapters"
    artifact_kind = SteeringAdapters

    def __init__(self, setting: Setting, hidden: int):
        _check_orthogonality(setting.orthogonal)
        super().__init__(setting)
        self.hidden = hidden

    @classmethod
    def check(cls, cfg: "DiscoverConfig", lm: LoadedModel, earlier: int) -> None:
        _check_orthogonality(cfg.orthogonal)

    @classmethod
    def create(cls, lm: LoadedModel, setting: Setting) -> "SteeringAdapterMethod":
        return cls(setting, _mlp_hidden_width(lm, setting.source))

    def init(self, n: int, generator: torch.Generator, previous: Params | None) -> Params:
        r = self.s.rank
        params = {
            "a": torch.randn(n, self.hidden, r, generator=generator).requires_grad_(True),
            "b": torch.randn(n, self.s.width, r, generator=generator).requires_grad_(True),
        }
        self.retract(params, previous)
        return params

    def param_groups(self, params: Params, lr: float) -> list[dict]:
        # Unit columns: a coordinate is about 1/√(column length).
        return [
            {"params": [params["a"]], "lr": lr / math.sqrt(self.hidden)},
            {"params": [params["b"]], "lr": lr / math.sqrt(self.s.width)},
        ]

    def perturb(self, lm: LoadedModel, params: Params, prompts: int) -> AbstractContextManager:
        a = params["a"].repeat_interleave(prompts, dim=0).to(lm.device, lm.dtype)
        b = params["b"].repeat_interleave(prompts, dim=0).to(lm.device, lm.dtype)
        return add_lora(lm, self.s.source, a, b, self.s.radius)

    def project_grad(self, params: Params, previous: Params | None) -> None:
        for x in (params["a"], params["b"]):
            unit = x.detach() / x.detach().norm(dim=1, keepdim=True)
            x.grad -= (x.grad * unit).sum(1, keepdim=True) * unit

    def retract(self, params: Params, previous: Params | None) -> None:
        with torch.no_grad():
            for x in (params["a"], params["b"]):
                x /= x.norm(dim=1, keepdim=True)

    def artifact(self, params: Params) -> SteeringAdapters:
        return SteeringAdapters(params["a"].detach().clone(), params["b"].detach().clone(), self.s.radius, self.s.source)
