"""Anomaly monitor: which real inputs express the behaviours a discovery run found?

A perturbation k of a run leaves a signature at a block L of the model: the change it makes to the residual
stream at the last prompt token (where the answer starts), averaged over the run's training prompts,

    σ_k = mean_i [Z_L(θ_k) − Z_L(0)]_{i, last} / ‖·‖        (L = the run's target block by default; at the
                                                              source block σ_k of a vector is θ_k / ‖θ_k‖)

An input x expresses perturbation k when its own state at L, relative to clean inputs, points the same way:

    s_k(x) = ⟨h_L(x)_last, σ_k⟩
    z_k(x) = (s_k(x) − mean_clean s_k) / std_clean s_k
    A(x)   = max_k z_k(x),  named perturbation = argmax_k

Decision rule (no threshold tuned to a model): flag x when A(x) > τ, where τ is the ⌈(n + 1)(1 − α)⌉-th smallest
of the n clean inputs' A — the split-conformal quantile, which bounds the false-positive rate on inputs
exchangeable with the clean set by α (when n is too small for α, τ is the largest clean score and the bound is
1/(n + 1)). The false-positive rate on the clean set itself is measured leave-one-out: each clean input is scored
against statistics and a threshold fitted without it. Without a clean set the inputs calibrate themselves, which
assumes anomalies are a minority of them.

`Monitor.watch(lm, callback)` applies the same rule to live generation: a hook on block L scores the newest
position of every row on every forward pass and calls `callback(event)` for each flagged one.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor

from melbo.errors import MelboError
from melbo.intervention import forward_hook, _map_output
from melbo.models import LoadedModel
from melbo.objective import TargetProbe, block_outputs
from melbo.prompts import encode
from melbo.settings import MONITOR_ALPHA
from melbo.store import MONITOR_JSON, MONITOR_JSONL, Run

SIGNALS = ("target", "source")
DEFAULT_ALPHA = MONITOR_ALPHA
CHUNK = 16  # prompts per forward pass when scoring


@dataclass
class Monitor:
    """A calibrated detector for one run's perturbations (module docstring)."""

    layer: int
    signal: str
    labels: list[str]
    signatures: Tensor  # [K, d], unit rows
    mean: Tensor  # [K]: clean mean of the projections
    std: Tensor  # [K]
    threshold: float
    alpha: float
    calibration: dict = field(default_factory=dict)  # n, self-calibrated, leave-one-out false-positive rate
    chat: Optional[bool] = None

    # ---- building
    @classmethod
    def calibrate(cls, run: Run, lm: LoadedModel, clean: Sequence[str], signal: str = "target",
                  alpha: float = DEFAULT_ALPHA, self_calibrated: bool = False,
                  indices: Optional[Sequence[int]] = None) -> "Monitor":
        """Signatures from the run's perturbations (all, or `indices`: the behaviours worth watching for),
        statistics and threshold from clean inputs."""
        _check(run, lm, signal, alpha, clean)
        chosen = _chosen(run, indices)
        layer = int(run.config["target" if signal == "target" else "source"])
        chat = run.config["settings"]["chat"]
        signatures = perturbation_signatures(run, lm, layer, chosen)
        states = last_states(lm, clean, layer, chat)
        projections = states @ signatures.T  # [n, K]
        mean, std, threshold = fit_rule(projections, alpha)
        labels = [f"v{i}" for i in chosen]
        calibration = {"n": len(clean), "self_calibrated": self_calibrated,
                       "false_positive_rate_loo": leave_one_out_fpr(projections, alpha),
                       "bound": max(alpha, 1 / (len(clean) + 1))}
        return cls(layer, signal, labels, signatures, mean, std, threshold, alpha, calibration, chat)

    # ---- scoring
    def z_scores(self, states: Tensor) -> Tensor:
        """[n, d] states at the monitor's layer → [n, K] z-scores."""
        projections = states.float() @ self.signatures.T
        return (projections - self.mean) / self.std

    def score(self, lm: LoadedModel, prompts: Sequence[str]) -> list[dict]:
        """One record per input: anomaly score, flagged, the perturbation it expresses, and every z-score."""
        z = self.z_scores(last_states(lm, prompts, self.layer, self.chat))
        best = z.max(-1)
        return [{"index": i, "input": text, "score": float(best.values[i]), "flagged": bool(best.values[i] > self.threshold),
                 "perturbation": self.labels[int(best.indices[i])], "z": [round(float(x), 4) for x in z[i]]}
                for i, text in enumerate(prompts)]

    def summary(self) -> dict:
        return {"layer": self.layer, "signal": self.signal, "alpha": self.alpha, "threshold": self.threshold,
                "perturbations": len(self.labels), **self.calibration}

    # ---- live
    @contextmanager
    def watch(self, lm: LoadedModel, callback: Callable[[dict], None]) -> Iterator[None]:
        """Score the newest position of every row on every forward pass; call `callback` for flagged ones."""
        step = {"n": 0}

        def hook(_module, _args, output):
            def inspect(h):
                z = self.z_scores(h[:, -1].detach().cpu())
                best = z.max(-1)
                for row in torch.nonzero(best.values > self.threshold).flatten().tolist():
                    callback({"row": row, "forward": step["n"], "score": float(best.values[row]),
                              "perturbation": self.labels[int(best.indices[row])]})
                return h

            _map_output(output, inspect)
            step["n"] += 1

        with forward_hook(lm.blocks[self.layer], hook):
            yield


def _check(run: Run, lm: LoadedModel, signal: str, alpha: float, clean: Sequence[str]) -> None:
    if signal not in SIGNALS:
        raise MelboError(f"unknown signal {signal!r}: use one of {', '.join(SIGNALS)}")
    if not (isinstance(alpha, (int, float)) and 0 < alpha < 1):
        raise MelboError(f"alpha must be a false-positive rate in (0, 1), got {alpha!r}")
    if run.perturbations is None:
        raise MelboError(f"run {run.path} is not finished: resume it with `melbo discover --resume {run.path}`")
    if len(clean) < 3:
        raise MelboError(f"calibration needs at least 3 clean inputs, got {len(clean)}: give more with --clean")
    run.attach(lm)


def _chosen(run: Run, indices: Optional[Sequence[int]]) -> list[int]:
    if indices is None:
        return list(range(len(run)))
    bad = [i for i in indices if not (isinstance(i, int) and 0 <= i < len(run))]
    if bad or not indices:
        raise MelboError(f"perturbation indices {list(indices)} are not in 0..{len(run) - 1}: pick from those")
    return list(indices)


def perturbation_signatures(run: Run, lm: LoadedModel, layer: int, indices: Optional[Sequence[int]] = None) -> Tensor:
    """σ_k: each perturbation's mean change at `layer` on the last token of the run's prompts, unit rows [K, d]."""
    settings = run.config["settings"]
    batch = encode(lm, settings["prompts"], settings["chat"])
    replay = int(run.config["source"]) - 1  # adapters act inside the source block: replay only what precedes it
    probe = TargetProbe(lm, batch, int(run.config["source"]), layer, replay)
    perturbations = run.perturbations.select(_chosen(run, indices))
    prompts = len(batch)
    rows = []
    for start in range(0, len(perturbations), CHUNK):
        ids = list(range(start, min(start + CHUNK, len(perturbations))))
        rows_of = [k for k in ids for _ in range(prompts)]
        with torch.no_grad():
            z = probe(len(ids), lambda: perturbations.apply(lm, rows_of))
        rows.append((z[:, :, -1] - probe.z0[None, :, -1]).float().mean(1).cpu())
    change = torch.cat(rows)
    return change / change.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def last_states(lm: LoadedModel, prompts: Sequence[str], layer: int, chat: Optional[bool]) -> Tensor:
    """The state at `layer` on each prompt's last token (where the answer starts), [n, d] on the CPU."""
    if isinstance(prompts, str) or not prompts:
        raise MelboError("give a non-empty list of inputs, one per line of the inputs file")
    out = []
    for start in range(0, len(prompts), CHUNK):
        batch = encode(lm, list(prompts[start:start + CHUNK]), chat)
        out.append(block_outputs(lm, batch, [layer])[layer][:, -1].float().cpu())  # left-padded: -1 is real
    return torch.cat(out)


def fit_rule(projections: Tensor, alpha: float) -> tuple[Tensor, Tensor, float]:
    """The decision rule fitted to clean projections [n, K]: per-perturbation mean and std, and τ."""
    mean, std = projections.mean(0), projections.std(0).clamp_min(1e-6)
    return mean, std, conformal_threshold(((projections - mean) / std).max(-1).values, alpha)


def conformal_threshold(scores: Tensor, alpha: float) -> float:
    """The ⌈(n + 1)(1 − α)⌉-th smallest score (the largest when n is too small for α)."""
    n = len(scores)
    k = min(math.ceil((n + 1) * (1 - alpha)), n)
    return float(scores.sort().values[k - 1])


def leave_one_out_fpr(projections: Tensor, alpha: float) -> float:
    """Fraction of clean inputs flagged when statistics and threshold are fitted without them."""
    n = len(projections)
    flagged = 0
    for i in range(n):
        mean, std, threshold = fit_rule(torch.cat([projections[:i], projections[i + 1:]]), alpha)
        flagged += int(((projections[i] - mean) / std).max() > threshold)
    return flagged / n


def auroc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """P(score of a positive > score of a negative), ties counting half (Mann–Whitney)."""
    if not positive or not negative:
        return float("nan")
    pos, neg = torch.tensor(positive)[:, None], torch.tensor(negative)[None, :]
    return float(((pos > neg).float() + 0.5 * (pos == neg).float()).mean())




def write_monitor(out: Path, monitor: Monitor, records: Sequence[dict]) -> Path:
    """monitor.json (the decision rule, calibration and counts) and monitor.jsonl (one record per input)."""
    from melbo.bench.common import write_jsonl
    from melbo.files import make_output_dir, write_json

    make_output_dir(out)
    flagged = sum(r["flagged"] for r in records)
    write_json(out / MONITOR_JSON, {**monitor.summary(), "inputs": len(records), "flagged": flagged})
    write_jsonl(out / MONITOR_JSONL, records)
    return out
