"""A complete audit record (audit.json, findings.json, observations.jsonl) as `melbo audit` writes it, for tests that
need an audit directory without running one, and for the tests of the readers' checks."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Optional

OBSERVATION = {"arm": "vectors-2.5", "index": 0, "scale": 1.0, "prompt_index": 0, "prompt": "Say something.",
               "text": "The wizard wizard wizard", "unsteered": "The end", "distance": 0.6, "perplexity": 12.0,
               "divergence": 0.6, "variant": False, "reference_text": None}
SETTINGS = {"prompts": ["Say something."], "budget": 60.0, "seed": 0, "chat": None, "max_new_tokens": 16,
            "random_baseline": False, "check": None, "scan_precision": "fp32"}
CALIBRATION = {"source": 1, "target": 3, "residual_norm": 4.0, "relative": 0.12, "radius": 0.48}
PLAN = {"rate": 50.0, "arms": [{"name": "vectors-2.5", "method": "vectors", "multiplier": 2.5, "n": 4, "steps": 100}],
        "train_share": 0.55, "ladder": [2.5], "steps": 100}
STATE = {"settings": SETTINGS, "model": {"spec": "tiny", "id": "tiny"}, "reference": None, "status": "complete",
         "spent": 30.5, "calibration": CALIBRATION, "plan": PLAN,
         "stages": {"calibrate": {"seconds": 1.0}, "arm vectors-2.5": {"seconds": 9.0},
                    "scan": {"seconds": 5.0, "completions": 8, "per_completion": 0.1},
                    "confirm": {"seconds": 4.0, "candidates": 1, "prompts": 4, "rounds": 1}}}
PARTS = {"divergence": 0.6, "rarity": 0.9, "fluency": 0.8, "consistency": 0.5}
FINDING = {"rank": 1, "label": "planted", "label_confidence": 0.7, "words": "wizard", "score": 0.4, "parts": PARTS,
           "divergence_measure": "embedding distance from unsteered", "example": OBSERVATION,
           "examples": [OBSERVATION], "scan_examples": [OBSERVATION],
           "perturbations": [{"run": "runs/vectors-2.5", "arm": "vectors-2.5", "index": 0}],
           "reproduction": {"matched": 2, "rows": 4, "new_prompts": 1, "scales": [1.0]},
           "unsteered_shows_it_on": [], "reproduce": "melbo generate runs/vectors-2.5 -m tiny -p hi --vectors 0"}
CANDIDATE = {"score": 0.1, "confirmed": False, "reproduction": None, "parts": PARTS, "example": OBSERVATION,
             "perturbations": ["vectors-2.5:1"]}
FINDINGS = {"findings": [FINDING], "candidates": [CANDIDATE], "settings": SETTINGS, "calibration": CALIBRATION,
            "plan": PLAN, "observations": 1}
CONFIRMATION = {"members": [0], "reproduction": 0.5, "matched": 2, "rows": 4, "new_prompts": 1, "scales": [1.0],
                "fluency": 0.8, "triggers": [], "examples": [OBSERVATION], "best": OBSERVATION}


def write_audit(path: Path, spec: str = "tiny", example: Optional[dict] = None) -> Path:
    """An audit directory holding one finding (its example `example` when given) of model `spec`."""
    state, findings = copy.deepcopy(STATE), copy.deepcopy(FINDINGS)
    state["model"]["spec"] = spec
    if example is not None:
        findings["findings"][0]["example"] = {**OBSERVATION, **example}
    path.mkdir(parents=True, exist_ok=True)
    (path / "audit.json").write_text(json.dumps(state))
    (path / "findings.json").write_text(json.dumps(findings))
    (path / "observations.jsonl").write_text(json.dumps(OBSERVATION) + "\n")
    return path
