"""Calibrated R (`radius="calibrate"`): the radius where the target layer's response stops being linear.

DCT's calibration. For m random unit directions v at block s, the change of block t's output Δ(r v) (over the
objective's positions) splits into its linear part r·Jv and the rest. The ratio

    ρ(r) = sqrt( mean_v ‖Δ(r v) − r Jv‖² / ‖r Jv‖² )

is ≈ 0 while the response is linear (every direction merely rescales: "nothing changes") and grows with r.
(Far out it falls again: the residual stream carries r·v itself to block t unchanged while the blocks' own
writes saturate, so the identity path's share of r·Jv returns. The first crossing is the one meant.) The
calibrated R solves ρ(R) = fraction (`settings.CALIBRATE_FRACTION`): the random directions are measurably out of
the linear regime but not yet dominated by the non-linear part.

Cost: Jv for all m directions by a central difference (`melbo.engine.methods.jacobian`, one pass of 2m rows), then a
bisection on log r, each step one forward pass of m rows (no gradients): seconds, not a sweep. The bracket is
relative to the source's residual norm, so the answer is scale-equivariant: a model whose residual stream is
10× larger gets a 10× larger R.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable
import torch
from torch import Tensor

from melbo.checks import check_finite, check_whole
from melbo.errors import MelboError
from melbo.engine.intervention import SteeringVectors, add_to_block_output
from melbo.engine.methods.jacobian import jvp
from melbo.engine.models import LoadedModel
from melbo.engine.objective import TargetProbe
from melbo.engine.prompts import PromptBatch
from melbo.settings import CALIBRATE_FRACTION, CALIBRATE_SAMPLES

SPEC = "calibrate"  # the radius spec that asks for it
START = 0.01  # × residual norm: the scan for a bracket starts here and moves by decades within EXTREMES
EXTREMES = (1e-4, 1e3)
TOLERANCE = 0.01  # stop when ρ is within 1% of the fraction, or the bracket's ends are
MAX_STEPS = 30  # of the false position; it converges in a handful
FD_EPS = 1e-3  # finite-difference step for Jv, × residual norm: far inside the linear regime


@dataclass(frozen=True)
class Calibration:
    """The calibrated radius and how it was found (recorded in the run's config as "radius_calibration")."""

    radius: float  # absolute R
    relative: float  # R / residual norm
    fraction: float  # the target ρ
    ratio: float  # ρ(R) reached
    samples: int  # random directions
    evaluations: int  # forward passes of the bisection
    seconds: float
    method: str = "DCT: nonlinear/linear response ratio of random directions at the target block"

    def record(self) -> dict:
        return asdict(self)


def is_calibrate(spec: object) -> bool:
    return isinstance(spec, str) and spec.strip().lower() == SPEC


def check_settings(fraction: float, samples: int) -> tuple[float, int]:
    """The calibration's own settings, type- and range-checked (one-line MelboError otherwise)."""
    fraction = check_finite("fraction", fraction)
    samples = check_whole("samples", samples)
    if not fraction > 0:
        raise MelboError(f"calibration fraction must be > 0, got {fraction}: use e.g. {CALIBRATE_FRACTION}")
    if samples < 1:
        raise MelboError(f"calibration samples must be ≥ 1, got {samples}: use e.g. {CALIBRATE_SAMPLES}")
    return fraction, samples


def _ratio(probe: TargetProbe, v: Tensor, linear: Tensor, r: float) -> float:
    """ρ(r) for unit directions v [m, d] whose linear responses (Jv, masked) are `linear` [m, P, T, d]."""
    prompts = len(probe.batch)
    rows = (v * r).repeat_interleave(prompts, dim=0).to(probe.lm.device, probe.lm.dtype)
    with torch.no_grad():
        z = probe(len(v), lambda: add_to_block_output(probe.lm, probe.source, rows)).float()
    mask = probe.batch.token_mask.to(z.device)[None, :, :, None]
    change = torch.where(mask, z - probe.z0.float(), torch.zeros((), device=z.device))
    nonlinear = (change - r * linear).flatten(1).pow(2).sum(-1)
    scale = (r * linear).flatten(1).pow(2).sum(-1).clamp_min(1e-30)
    return float((nonlinear / scale).mean().sqrt())


def calibrate_radius(
    lm: LoadedModel,
    batch: PromptBatch,
    source: int,
    target: int,
    norm: float,
    *,
    fraction: float = CALIBRATE_FRACTION,
    samples: int = CALIBRATE_SAMPLES,
    seed: int = 0,
) -> Calibration:
    """R with ρ(R) = fraction (module docstring); `norm` is the source's residual norm (objective.residual_norm)."""
    fraction, samples = check_settings(fraction, samples)
    if not (math.isfinite(norm) and norm > 0):
        raise MelboError(f"the residual norm at block {source} is {norm}: the model's activations are not finite")
    started = time.perf_counter()
    probe = TargetProbe(lm, batch, source, target, source, "fp32")  # finite differences: full precision
    x = torch.randn(samples, lm.width, generator=torch.Generator().manual_seed(seed))
    v = x / x.norm(dim=-1, keepdim=True)
    linear = jvp(probe, v, FD_EPS * norm)  # [m, P, T, d], masked
    if not torch.isfinite(linear).all() or not linear.abs().sum() > 0:
        raise MelboError(f"block {target} does not respond to block {source} here: pick other layers or prompts")
    evaluations = 0

    def rho(relative: float) -> float:
        nonlocal evaluations
        evaluations += 1
        value = _ratio(probe, v, linear, relative * norm)
        return value if math.isfinite(value) else math.inf  # overflow: far past any fraction

    lo = START
    f_lo = rho(lo)
    while f_lo >= fraction:
        if lo <= EXTREMES[0]:
            raise MelboError(f"the response is non-linear already at R = {lo:g}x (ratio ≥ {fraction}): "
                             "give --radius explicitly")
        lo /= 10
        f_lo = rho(lo)
    hi = lo * 10
    f_hi = rho(hi)
    while f_hi < fraction:  # upwards by decades: the first crossing (ρ falls again far out, see above)
        if hi >= EXTREMES[1]:
            raise MelboError(f"the response stays linear up to R = {hi:g}x (ratio < {fraction}): "
                             "give --radius explicitly")
        (lo, f_lo), hi = (hi, f_hi), hi * 10
        f_hi = rho(hi)
    relative, value = _solve(rho, fraction, lo, f_lo, hi, f_hi)
    return Calibration(radius=relative * norm, relative=relative, fraction=fraction, ratio=value,
                       samples=samples, evaluations=evaluations, seconds=time.perf_counter() - started)


def _solve(rho: Callable[[float], float], fraction: float, lo: float, f_lo: float, hi: float, f_hi: float) -> tuple[float, float]:
    """ρ(r) = fraction inside [lo, hi] (ρ(lo) < fraction ≤ ρ(hi)): false position on log r vs log ρ.

    Near the linear regime ρ grows like a power of r, a straight line in log–log, so interpolating there takes
    a few passes where bisection takes ten. Illinois rule: an end kept twice has its weight halved, so the
    bracket always shrinks from both sides; stop when ρ is within TOLERANCE of the fraction or the bracket is.
    """
    goal = math.log(fraction)
    g_lo, g_hi = math.log(max(f_lo, 1e-30)) - goal, min(math.log(f_hi) - goal, 50.0)  # overflow → a steep end
    side = 0
    r, value = hi, f_hi
    for _ in range(MAX_STEPS):
        if hi / lo <= 1 + TOLERANCE:
            break
        x_lo, x_hi = math.log(lo), math.log(hi)
        x = x_hi - g_hi * (x_hi - x_lo) / (g_hi - g_lo)
        r = math.exp(min(max(x, x_lo), x_hi))
        value = rho(r)
        g = math.log(max(value, 1e-30)) - goal
        if abs(g) <= math.log1p(TOLERANCE):
            break
        if g < 0:
            lo, g_lo = r, g
            g_hi = g_hi / 2 if side == -1 else g_hi
            side = -1
        else:
            hi, g_hi = r, g
            g_lo = g_lo / 2 if side == 1 else g_lo
            side = 1
    return r, value


def check_method(method_name: str, artifact_kind: type) -> None:
    """Calibration measures steering vectors at block s: refuse it for methods whose R means something else."""
    if artifact_kind is not SteeringVectors:
        raise MelboError(f"--radius calibrate measures steering vectors; method {method_name} needs an explicit "
                         "--radius")
