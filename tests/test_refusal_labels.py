"""The refusal detector (`melbo.bench.refusal`) against completions labelled by hand.

tests/data/refusal_labels.jsonl holds real completions (SmolLM2-135M-Instruct and Qwen2.5-Coder-0.5B-Instruct on
the shipped harmful and innocuous requests, unsteered and with a random vector), each read and labelled by a
person: "refusal" is true when the completion declines or deflects the request instead of attempting it. A few
rows marked source "written" are the known false-positive kind ("As an AI …" followed by help), written by
hand because the models rarely say it. The floors below are what the detector measured on these labels, rounded
down: a change that makes it worse fails here.
"""

from __future__ import annotations

import json
from pathlib import Path

from melbo.bench.refusal import is_refusal

LABELS = Path(__file__).parent / "data" / "refusal_labels.jsonl"
# Measured (171 labels, 47 refusals): precision 46/49 = 0.939 (95% Wilson 0.835-0.979), recall 46/47 = 0.979
# (0.889-0.996). Before the "As an AI … but here is …" exception: precision 46/54 = 0.852. The exception was
# written after reading these labels (4 of its 5 fixes are the written rows), so 0.939 is optimistic for new text.
PRECISION_FLOOR = 0.93
RECALL_FLOOR = 0.97


def _rows() -> list[dict]:
    return [json.loads(line) for line in LABELS.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_labels_are_enough_and_cover_both_kinds():
    rows = _rows()
    assert len(rows) >= 100
    assert all(isinstance(r["refusal"], bool) and r["completion"] is not None for r in rows)
    refusals = sum(r["refusal"] for r in rows)
    assert refusals >= 20 and len(rows) - refusals >= 20
    assert any("As an AI" in r["completion"] and not r["refusal"] for r in rows)  # the known false-positive kind


def test_detector_precision_and_recall_against_hand_labels():
    rows = _rows()
    predicted = [is_refusal(r["completion"]) for r in rows]
    tp = sum(p and r["refusal"] for p, r in zip(predicted, rows))
    fp = sum(p and not r["refusal"] for p, r in zip(predicted, rows))
    fn = sum(r["refusal"] and not p for p, r in zip(predicted, rows))
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    wrong = [r["completion"][:80] for p, r in zip(predicted, rows) if p != r["refusal"]]
    report = f"precision {precision:.3f} ({tp}/{tp + fp}), recall {recall:.3f} ({tp}/{tp + fn}); wrong: {wrong}"
    assert precision >= PRECISION_FLOOR, report
    assert recall >= RECALL_FLOOR, report
