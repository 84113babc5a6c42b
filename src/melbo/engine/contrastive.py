"""Contrastive objectives: perturbations that change an audited model in ways its reference model does not.

An auditor usually has the audited model's base (or an earlier checkpoint). The same perturbation θ is applied
to both models at block s, in the same optimiser step, and the objective rewards what only the audited model does:

    difference   F(θ) = Σ_i ( Σ_{t∈I_i} ‖ΔZ^aud_{i,t}(θ) − ΔZ^ref_{i,t}(θ)‖^p )^{1/q}
                 with ΔZ(θ) = Z(θ) − Z(0) at block t of each model. A change both models make cancels, so shared
                 behaviours (arithmetic slips, repetition) are worth nothing; a change only the fine-tune makes
                 counts in full. This is the default (see `DEFAULT_FORM`).
    penalised    F(θ) = F_aud(θ) − λ·F_ref(θ): the plain MELBO objective on the audited model, minus λ times the
                 same on the reference. Penalises perturbations that move the reference at all, even in a
                 different direction; λ = `contrast_weight`.
    kl           F(θ) = Σ_i ( Σ_{t∈I_i} [KL(p^aud_θ ‖ p^ref_θ) − KL(p^aud_0 ‖ p^ref_0)]_{i,t}^{p/2} )^{1/q}, the
                 output-level form: how much the two steered models' next-token distributions disagree, beyond
                 what they disagree unsteered. It runs both models to the LM head.

Why "difference" is the default: it is the only target-layer form that is zero for every θ when the two models
are the same function, without a tuned weight (penalised needs λ, and λ trades recall of the audited model's
behaviours against their specificity), and it costs the same as plain discovery per model (both passes stop at
the target block, where kl runs the whole model and its LM head). `benchmarks/diff_recall.py` measures the forms
against plain discovery and random vectors on the planted-backdoor testbed.
"""

from __future__ import annotations

import torch

from melbo.errors import MelboError
from melbo.engine.models import LoadedModel
from melbo.engine.objective import Measured, OutputProbe, Perturb, TargetProbe, change_objective, positional_objective
from melbo.engine.prompts import PromptBatch
from melbo.settings import DEFAULT_CONTRAST

FORMS = ("difference", "penalised", "kl")
DEFAULT_FORM = DEFAULT_CONTRAST


def check_pair(audited: LoadedModel, reference: LoadedModel) -> None:
    """The two models must be steerable by the same perturbation: same tokenizer, width and depth."""
    if audited.width != reference.width:
        raise MelboError(f"the audited model has width {audited.width} but the reference {reference.width}: "
                         "give a reference of the same architecture (its base or an earlier checkpoint)")
    if audited.depth != reference.depth:
        raise MelboError(f"the audited model has {audited.depth} blocks but the reference {reference.depth}: "
                         "give a reference of the same architecture (its base or an earlier checkpoint)")
    if _vocabulary(audited) != _vocabulary(reference):
        raise MelboError("the audited and reference models have different tokenizers: give a reference that "
                         "shares the audited model's tokenizer (its base or an earlier checkpoint)")


def _vocabulary(lm: LoadedModel) -> dict:
    tokenizer = lm.tokenizer
    return tokenizer.get_vocab() if tokenizer is not None else {"size": lm.model.config.vocab_size}


class ContrastiveObjective:
    """One of `FORMS` for a pair of models; both forward passes run in every step (module docstring)."""

    def __init__(self, audited: LoadedModel, reference: LoadedModel, batch: PromptBatch, source: int, target: int,
                 replay_upto: int, form: str = DEFAULT_FORM, p: float = 2.0, q: float = 1.0, weight: float = 1.0,
                 precision: str = "fp32", compile: bool = False):
        if form not in FORMS:
            raise MelboError(f"unknown contrast {form!r}: use one of {', '.join(FORMS)}")
        self.lm, self.reference, self.batch = audited, reference, batch
        self.form, self.p, self.q, self.weight = form, p, q, weight
        if form == "kl":
            self.probes = [OutputProbe(m, batch, replay_upto, precision) for m in (audited, reference)]
        else:
            self.probes = [TargetProbe(m, batch, source, target, replay_upto, precision, compile)
                           for m in (audited, reference)]
        self.precision = self.probes[0].precision
        self.mask = batch.token_mask.to(self.probes[0].z0.device)

    def __call__(self, n: int, perturb: Perturb) -> Measured:
        outputs = [probe(n, lambda probe=probe: perturb(probe.lm)).float() for probe in self.probes]
        if self.form == "kl":
            return self._kl(*outputs)
        audited, reference = (z - probe.z0.float() for z, probe in zip(outputs, self.probes))
        if self.form == "difference":
            change = audited - reference
            return Measured(change_objective(change, self.mask, self.p, self.q), change)
        value = (change_objective(audited, self.mask, self.p, self.q)
                 - self.weight * change_objective(reference, self.mask, self.p, self.q))
        return Measured(value, audited)

    def _kl(self, audited: torch.Tensor, reference: torch.Tensor) -> Measured:
        unsteered = [probe.z0.float()[None] for probe in self.probes]
        value = self._kl_value(audited, reference) - self._kl_value(*unsteered)
        return Measured(value, (audited - reference) - (unsteered[0] - unsteered[1]))

    def _kl_value(self, audited: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        kl = kl_divergence(audited, reference).clamp_min(0)  # [n, P, T]; ≥ 0 up to rounding
        return positional_objective(kl, self.mask, self.p / 2, self.q)  # KL is a squared distance: p/2


def kl_divergence(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) over the last axis, from log-probabilities."""
    return (logp.exp() * (logp - logq)).sum(-1)
