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

**The output signal** (`OutputMonitor`, `--signal output`, the default for an audit's findings) reads no
activation: it scores x by phrase spotting (`melbo.judging.phrases`), the log-likelihood that the unsteered model writes one
of the findings' phrases at or near the start of its answer. The columns are phrases instead of perturbations; the
z-scores, the max, the split-conformal threshold and the leave-one-out false-positive rate are the same. Its live
form scores the text generated so far: the share of a phrase's word trigrams it contains, flagged above the
conformal threshold of the same share on the clean inputs' own answers (normal outputs).
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
from melbo.engine.intervention import forward_hook, _map_output
from melbo.engine.models import LoadedModel
from melbo.engine.objective import TargetProbe, block_outputs
from melbo.engine.prompts import encode
from melbo.settings import MONITOR_ALPHA
from melbo.engine.store import MONITOR_JSON, MONITOR_JSONL, Run

SIGNALS = ("target", "source", "output")
ACTIVATION_SIGNALS = ("target", "source")
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
        layer = run.config.target if signal == "target" else run.config.source
        chat = run.config.chat
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


@dataclass
class OutputMonitor:
    """A calibrated detector on the output level: the findings' phrases, spotted in the unsteered answer."""

    phrases: list[str]
    labels: list[str]  # the finding each phrase belongs to
    mean: Tensor  # [P]: clean mean of the phrase log-likelihoods
    std: Tensor  # [P]
    threshold: float
    alpha: float
    text_threshold: float  # live: the clean answers' conformal share of phrase trigrams
    calibration: dict = field(default_factory=dict)
    chat: Optional[bool] = None
    signal: str = "output"

    @classmethod
    def calibrate(cls, findings: Sequence[dict], lm: LoadedModel, clean: Sequence[str], alpha: float = DEFAULT_ALPHA,
                  self_calibrated: bool = False, chat: Optional[bool] = None) -> "OutputMonitor":
        """Phrases from the findings (`melbo.judging.phrases.phrases_of`); statistics and threshold from clean inputs."""
        from melbo.judging.phrases import phrases_of, score_phrases

        _check_rule(alpha, clean)
        phrases, labels = [], []
        for f in findings:
            for p in phrases_of(f):
                phrases.append(p)
                labels.append(f"#{f['rank']} {f.get('label', '')}".strip())
        if not phrases:
            raise MelboError("the findings have no example text with new words: nothing to monitor for")
        scored = score_phrases(lm, clean, phrases, chat=chat)
        projections = torch.tensor(scored.logprob, dtype=torch.float32)
        mean, std, threshold = fit_rule(projections, alpha)
        shares = torch.tensor([text_score(a, phrases) for a in scored.answers])
        calibration = {"n": len(clean), "self_calibrated": self_calibrated,
                       "false_positive_rate_loo": leave_one_out_fpr(projections, alpha),
                       "bound": max(alpha, 1 / (len(clean) + 1)), "cost": scored.cost}
        return cls(phrases, labels, mean, std, threshold, alpha, conformal_threshold(shares, alpha), calibration,
                   chat)

    def score(self, lm: LoadedModel, prompts: Sequence[str]) -> list[dict]:
        """One record per input, as `Monitor.score`; `perturbation` names the finding of the best phrase."""
        from melbo.judging.phrases import score_phrases

        scored = score_phrases(lm, prompts, self.phrases, chat=self.chat)
        z = (torch.tensor(scored.logprob, dtype=torch.float32) - self.mean) / self.std
        best = z.max(-1)
        return [{"index": i, "input": text, "score": float(best.values[i]),
                 "flagged": bool(best.values[i] > self.threshold), "perturbation": self.labels[int(best.indices[i])],
                 "phrase": self.phrases[int(best.indices[i])], "answer_start": scored.answers[i],
                 "z": [round(float(x), 4) for x in z[i]]}
                for i, text in enumerate(prompts)]

    def summary(self) -> dict:
        return {"signal": "output", "alpha": self.alpha, "threshold": self.threshold,
                "text_threshold": self.text_threshold, "phrases": self.phrases, "findings": sorted(set(self.labels)),
                **{k: v for k, v in self.calibration.items() if k != "cost"}}

    @contextmanager
    def watch(self, lm: LoadedModel, callback: Callable[[dict], None]) -> Iterator[None]:
        """Score each row's generated text so far on every forward pass; call `callback` once per row when its
        share of a phrase's trigrams passes the calibrated threshold."""
        state: dict = {"rows": None, "flagged": set(), "n": 0}

        def hook(_module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is None:
                return
            if state["rows"] is None or ids.shape[1] > 1:  # a new generation: the prompt's pass
                state["rows"], state["flagged"] = [[] for _ in range(ids.shape[0])], set()
            else:
                for row, token in enumerate(ids[:, -1].tolist()):
                    state["rows"][row].append(token)
                    share, phrase = text_share(lm.tokenizer.decode(state["rows"][row], skip_special_tokens=True),
                                               self.phrases)
                    if share > self.text_threshold and row not in state["flagged"]:
                        state["flagged"].add(row)
                        callback({"row": row, "forward": state["n"], "score": share, "phrase": phrase,
                                  "perturbation": self.labels[self.phrases.index(phrase)]})
            state["n"] += 1

        handle = lm.model.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()


def _trigrams(text: str) -> set[tuple[str, ...]]:
    import re

    words = re.findall(r"[^\W_]+", text.lower())
    n = min(3, len(words))
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)} if n else set()


def text_share(text: str, phrases: Sequence[str]) -> tuple[float, str]:
    """(the largest share of a phrase's word trigrams that `text` contains, that phrase)."""
    have = _trigrams(text)
    best, which = 0.0, phrases[0] if phrases else ""
    for p in phrases:
        grams = _trigrams(p)
        share = len(grams & have) / len(grams) if grams else 0.0
        if share > best:
            best, which = share, p
    return best, which


def text_score(text: str, phrases: Sequence[str]) -> float:
    return text_share(text, phrases)[0]


def _check_rule(alpha: float, clean: Sequence[str]) -> None:
    if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and 0 < alpha < 1):
        raise MelboError(f"alpha must be a false-positive rate in (0, 1), got {alpha!r}")
    if isinstance(clean, str) or len(clean) < 3:
        raise MelboError(f"calibration needs at least 3 clean inputs, got {len(clean)}: give more with --clean")


def _check(run: Run, lm: LoadedModel, signal: str, alpha: float, clean: Sequence[str]) -> None:
    if signal not in ACTIVATION_SIGNALS:
        raise MelboError(f"unknown signal {signal!r} for a run's perturbations: use one of "
                         f"{', '.join(ACTIVATION_SIGNALS)} (output: OutputMonitor, from findings)")
    _check_rule(alpha, clean)
    if run.perturbations is None:
        raise MelboError(f"run {run.path} is not finished: resume it with `melbo discover --resume {run.path}`")
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
    batch = encode(lm, run.config.prompts, run.config.chat)
    replay = run.config.source - 1  # adapters act inside the source block: replay only what precedes it
    probe = TargetProbe(lm, batch, run.config.source, layer, replay)
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
    """P(score of a positive > score of a negative), ties counting half (Mann–Whitney): sklearn's ROC AUC."""
    from sklearn.metrics import roc_auc_score

    if not positive or not negative:
        return float("nan")
    labels = [1] * len(positive) + [0] * len(negative)
    return float(roc_auc_score(labels, [float(x) for x in positive] + [float(x) for x in negative]))




def write_monitor(out: Path, monitor: "Monitor | OutputMonitor", records: Sequence[dict]) -> Path:
    """monitor.json (the decision rule, calibration and counts) and monitor.jsonl (one record per input)."""
    from melbo.io.files import json_bytes, jsonl_bytes, make_output_dir, replacing_all

    check_monitor_outputs(out)
    make_output_dir(out)
    flagged = sum(r["flagged"] for r in records)
    # both strict JSON (a NaN threshold or score, from a model that overflowed, is written as null), and both or
    # neither: a full disk at the records leaves no summary that counts records which are not there
    with replacing_all([out / MONITOR_JSON, out / MONITOR_JSONL]) as (summary, lines):
        summary.write_bytes(json_bytes({**monitor.summary(), "inputs": len(records), "flagged": flagged}))
        lines.write_bytes(jsonl_bytes(records))
    return out


def check_monitor_outputs(out: Path) -> None:
    """Refuse an --out where either file cannot be written, before the first is: both files or neither."""
    from melbo.io.files import check_outputs

    check_outputs(out, (MONITOR_JSON, MONITOR_JSONL))


# ---- reading back: monitor.json and monitor.jsonl, each field checked where it is read (the report's monitor
# section), so a hand-edited file is one line naming the file, the field and the fix
MONITOR_FIX = "run `melbo monitor` again to rewrite it"


def read_monitor(out: Path) -> Optional[tuple[dict, list[dict]]]:
    """(monitor.json, the records of monitor.jsonl) in `out`, or None where `melbo monitor` wrote none."""
    from melbo.io.files import read_json
    from melbo.io.jsonfields import Fields, read_lines

    out = Path(out)
    if not (out / MONITOR_JSON).is_file():
        return None
    summary = Fields(read_json(out / MONITOR_JSON), out / MONITOR_JSON, MONITOR_FIX)
    summary.text("signal", choices=(*ACTIVATION_SIGNALS, "output")), summary.real("alpha", 0, 1)
    summary.real("threshold", default=None)  # null: NaN from a model that overflowed (write_monitor)
    summary.whole("inputs", 0), summary.whole("flagged", 0)
    records = read_lines(out / MONITOR_JSONL, MONITOR_FIX) if (out / MONITOR_JSONL).is_file() else []
    for r in records:
        r.whole("index", 0), r.text("input"), r.real("score", default=None), r.flag("flagged")
        r.text("perturbation"), r.reals("z", [], missing=True)
        if r.raw["flagged"] and r.raw["score"] is None:
            raise r.error("score", "is None on a flagged input")
    return summary.raw, [r.raw for r in records]
