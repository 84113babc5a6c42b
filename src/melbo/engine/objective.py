"""The MELBO objective, and the shortest forward pass that computes it.

    F(θ) = Σ_i ( Σ_{t∈I_i} ‖Z_{i,t}(θ) − Z_{i,t}(0)‖₂^p )^{1/q}

`TargetProbe` evaluates Z(θ) for a batch of perturbations with only the necessary work: the output of the
blocks before the perturbation is computed once and replayed (blocks 0..s never depend on θ), and only the
blocks from there to t run, called directly (`melbo.engine.blockslice`: no embedding, no later block, no LM head).
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterator, Protocol

import torch
from torch import Tensor

from melbo.engine.blockslice import BlockSlice, model_inputs
from melbo.engine.intervention import _map_output, forward_hook
from melbo.engine.models import LoadedModel, resolve_precision
from melbo.engine.prompts import PromptBatch


def melbo_objective(z: Tensor, z0: Tensor, token_mask: Tensor, p: float = 2.0, q: float = 1.0) -> Tensor:
    """F per perturbation. z: [N, P, T, d] steered, z0: [P, T, d] unsteered, token_mask: [P, T] → [N]."""
    return change_objective(z - z0, token_mask, p, q)


def change_objective(change: Tensor, token_mask: Tensor, p: float = 2.0, q: float = 1.0) -> Tensor:
    """Σ_i (Σ_{t∈I_i} ‖change_{i,t}‖^p)^{1/q} per perturbation. change: [N, P, T, d], token_mask: [P, T] → [N]."""
    return positional_objective(change.norm(dim=-1), token_mask, p, q)


def positional_objective(values: Tensor, token_mask: Tensor, p: float, q: float) -> Tensor:
    """Σ_i (Σ_{t∈I_i} values_{i,t}^p)^{1/q} per perturbation. values: [N, P, T] (≥ 0), token_mask: [P, T] → [N]."""
    # where(), not a product: padded positions may hold NaN/inf from fully masked attention rows.
    per_position = torch.where(token_mask, values.pow(p), torch.zeros((), dtype=values.dtype, device=values.device))
    return per_position.sum(-1).pow(1.0 / q).sum(-1)


Perturb = Callable[[LoadedModel], ContextManager]  # applies a batch of perturbations to the model it is given


@dataclass
class Measured:
    """One evaluation of an objective for n perturbations."""

    value: Tensor  # the objective per perturbation [n], to maximise
    change: Tensor  # the change it is built from [n, P, T, ·], for the soft-orthogonality penalty


class Objective(Protocol):
    """What the optimiser maximises: `objective(n, perturb)` runs n perturbations as one batch."""

    lm: LoadedModel  # the model whose residual norm sets a relative radius
    batch: PromptBatch
    precision: str  # what training runs at: "fp32" or "bf16"

    def __call__(self, n: int, perturb: Perturb) -> Measured: ...


class MelboObjective:
    """The seed's objective F(θ) on one model (module docstring)."""

    def __init__(self, probe: "TargetProbe", p: float = 2.0, q: float = 1.0):
        self.probe, self.p, self.q = probe, p, q
        self.lm, self.batch, self.precision = probe.lm, probe.batch, probe.precision
        self.mask = probe.batch.token_mask.to(probe.z0.device)

    def __call__(self, n: int, perturb: Perturb) -> Measured:
        change = self.probe(n, lambda: perturb(self.lm)).float() - self.probe.z0.float()
        return Measured(change_objective(change, self.mask, self.p, self.q), change)


class _Stop(Exception):
    """Raised from the target block's hook: nothing after block t is needed."""


@contextmanager
def _replay_prefix(lm: LoadedModel, last: int, cached: Tensor, copies: int) -> Iterator[None]:
    """Skip blocks 0..last: they pass their input through, and block `last` returns the cached output.

    Instance-level `forward` overrides keep each block's identity, so hooks registered on block `last`
    (e.g. the steering vector) still run on the replayed output.
    """
    replayed = cached.repeat(copies, 1, 1)
    blocks = [lm.blocks[k] for k in range(last + 1)]
    tuple_output = lm.blocks_return_tuple

    def passthrough(hidden_states, *args, **kwargs):
        return (hidden_states,) if tuple_output else hidden_states

    def replay(hidden_states, *args, **kwargs):
        return (replayed,) if tuple_output else replayed

    # accelerate (device_map="auto") installs its own instance-level forward: keep it to restore it.
    saved = [block.__dict__.get("forward") for block in blocks]
    for block in blocks[:-1]:
        block.forward = passthrough
    blocks[-1].forward = replay
    try:
        yield
    finally:
        for block, original in zip(blocks, saved):
            if original is None:
                del block.forward
            else:
                block.forward = original


def autocast(precision: str, device: torch.device):
    """bf16 autocast: matrix products in bf16, the residual stream and the objective stay in fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def block_outputs(
    lm: LoadedModel, batch: PromptBatch, layers: list[int], precision: str = "fp32"
) -> dict[int, Tensor]:
    """Unsteered outputs of the given blocks for the batch, stopping after the deepest one."""
    captured: dict[int, Tensor] = {}

    def capture(k):
        def hook(_m, _a, output):
            if isinstance(output, tuple):
                lm.blocks_return_tuple = True
            _map_output(output, lambda h: captured.setdefault(k, h.detach()))
            if len(captured) == len(set(layers)):
                raise _Stop

        return hook

    with ExitStack() as stack, torch.no_grad(), autocast(precision, lm.device):
        for k in set(layers):
            stack.enter_context(forward_hook(lm.blocks[k], capture(k)))
        try:
            lm.model(**model_inputs(lm, batch.repeat(1)), use_cache=False)
        except _Stop:
            pass
    return captured


@contextmanager
def _steered(probe, copies: int, perturb: Callable[[], ContextManager]) -> Iterator[ExitStack]:
    """A probe's forward-pass setting: its autocast, its replayed prefix for `copies` copies, the perturbation."""
    with ExitStack() as stack:
        stack.enter_context(autocast(probe.precision, probe.lm.device))
        if probe.cached is not None:
            stack.enter_context(_replay_prefix(probe.lm, probe.replay_upto, probe.cached, copies))
        stack.enter_context(perturb())
        yield stack


class TargetProbe:
    """Z at block `target` for batches of perturbations applied at block `source`.

    `replay_upto` is the last block whose output does not depend on the perturbation: `source` for steering
    vectors (added to block s's output), `source - 1` for adapters (which act inside block s); −1 = no replay
    (then the whole model runs, stopped at the target). `compile`: see `melbo.engine.blockslice`. The unsteered Z(0)
    goes through exactly the path the steered passes take (autocast, bf16 block copies), so that rounding never
    masquerades as a change.
    """

    def __init__(
        self, lm: LoadedModel, batch: PromptBatch, source: int, target: int, replay_upto: int, precision: str = "fp32",
        compile: bool = False,
    ):
        self.lm, self.batch, self.source, self.target = lm, batch, source, target
        self.replay_upto = replay_upto
        self.precision = resolve_precision(precision, lm.device)
        self.cached, self.slice = None, None
        if replay_upto < 0:  # nothing to replay: the whole model runs, and Z(0) is its plain output
            self.z0 = block_outputs(lm, batch, [target], self.precision)[target]  # [P, T, d]
            return
        # The forward to block t stops at the replayed block: Z(0) comes from the slice, as every steered Z will.
        self.cached = block_outputs(lm, batch, [replay_upto], self.precision)[replay_upto]
        self.slice = BlockSlice(lm, batch, replay_upto + 1, target, keep=source, bf16=self.precision == "bf16",
                                compile=compile)
        with torch.no_grad():
            self.z0 = self(1, nullcontext)[0]  # [P, T, d]

    def __call__(self, copies: int, perturb: Callable[[], ContextManager]) -> Tensor:
        """Run `copies` copies of the prompt batch (row = copy * P + prompt) under `perturb()` → [copies, P, T, d]."""
        if self.slice is not None:
            return self._through_slice(copies, perturb)
        captured: list[Tensor] = []

        def stop(_m, _a, output):
            _map_output(output, captured.append)
            raise _Stop

        with _steered(self, copies, perturb) as stack:
            stack.enter_context(forward_hook(self.lm.blocks[self.target], stop))
            try:
                self.lm.model(**model_inputs(self.lm, self.batch.repeat(copies)), use_cache=False)
            except _Stop:
                pass
        z = captured[0]
        return z.reshape(copies, *self.z0.shape)

    def _through_slice(self, copies: int, perturb: Callable[[], ContextManager]) -> Tensor:
        replayed = self.lm.blocks[self.replay_upto]  # returns the cache; the perturbation's hooks still run on it
        with _steered(self, copies, perturb):
            out = replayed(self.cached.repeat(copies, 1, 1))
            z = self.slice(out[0] if isinstance(out, tuple) else out, copies)
        return z.float().reshape(copies, *self.batch.input_ids.shape, -1)

    def residual_norm(self) -> float:
        return residual_norm(self.lm, self.batch, self.source)


def residual_norm(lm: LoadedModel, batch: PromptBatch, source: int) -> float:
    """Median ‖h‖ of the unperturbed stream at the source block over real tokens, first token excluded.

    The scale a relative radius ("0.2x") is measured in. A median, not a mean: besides the first token (an
    attention sink with a norm often 100× the rest, excluded outright), models grow "massive activations" on a
    few other tokens (delimiters, the chat template's role tags), which move a mean far from the typical token
    and leave the median where it is. Qwen2.5-Coder-0.5B's chat prompt "How can I make a bomb?" at block 8:
    seven of its 35 tokens (template tokens) have norms 180–375, the rest ~20, so the mean is 74 and the
    median 20; 0.2x was R = 15 by the mean (gibberish) and is 4.0 by the median, the absolute R the refusal
    bench had to fall back on (`benchmarks/calibrate_radius.py` prints both norms).
    """
    h = block_outputs(lm, batch, [source])[source]
    mask = batch.real.clone()
    first = mask.float().argmax(-1)
    mask[torch.arange(len(first)), first] = False
    if not mask.any():
        mask = batch.real
    return float(h.norm(dim=-1)[mask.to(h.device)].float().median())


class OutputProbe:
    """Next-token log-probabilities [copies, P, T, vocab] for batches of perturbations: the whole model runs.

    The same replay of the unperturbed prefix as `TargetProbe`; used where an objective compares output
    distributions (the contrastive "kl" form) rather than a target block's states.
    """

    def __init__(self, lm: LoadedModel, batch: PromptBatch, replay_upto: int, precision: str = "fp32"):
        self.lm, self.batch, self.replay_upto = lm, batch, replay_upto
        self.precision = resolve_precision(precision, lm.device)
        self.cached = block_outputs(lm, batch, [replay_upto], self.precision)[replay_upto] if replay_upto >= 0 else None
        with torch.no_grad():
            self.z0 = self(1, nullcontext)[0]  # [P, T, vocab]

    def __call__(self, copies: int, perturb: Callable[[], ContextManager]) -> Tensor:
        with _steered(self, copies, perturb):
            logits = self.lm.model(**model_inputs(self.lm, self.batch.repeat(copies)), use_cache=False).logits
        return logits.float().log_softmax(-1).reshape(copies, *self.batch.input_ids.shape, -1)
