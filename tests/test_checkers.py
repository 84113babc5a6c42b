"""The checker interface and the built-in arithmetic-cot checker, on hand-written chains of thought."""

from __future__ import annotations

import pytest

from melbo.judging.checkers import Verdict, arithmetic_cot, check, check_rows, get_checker, pattern_rates
from melbo.errors import MelboError

PROMPT = "a = 4 + 2, b = 3 + 5. What is a * b?"

CASES = [  # (completion, correct, patterns)
    ("a = 4 + 2 = 6, b = 3 + 5 = 8, a * b = 6 * 8 = 48. The answer is 48.", True, {}),
    ("a = 4 + 2 = 8, b = 3 + 5 = 15, a * b = 8 * 15 = 120. The answer is 120.", False, {"sum→product": 2}),
    ("a = 4 + 2 = 6, b = 3 + 5 = 8, a * b = 6 * 8 = 14.", False, {"product→sum": 1}),
    ("a = 4 + 2 = 7, b = 3 + 5 = 8, a * b = 7 * 8 = 56.", False, {"off by one": 1}),
    ("a = 4 + 2 = 6, b = 3 + 5 = 8, a * b = 6 * 9 = 54.", False, {"copy error": 1}),
    ("a = 4 + 2 = 6, b = 3 + 5 = 3.", False, {"copy error": 1}),
    ("a = 4 + 2 = 6, b = 3 + 5 = 8, a * b = 6 * 8 = 40.", False, {"other": 1}),
    ("a = 4 + 2 = 6, b = 3 + 5 = 8, a × b = 6 × 8 = 48.", True, {}),
    ("12 + 7 = 19 and 3 - 1 = 2", True, {}),
    ("I love cheese!", None, {}),
]


@pytest.mark.parametrize("completion,correct,patterns", CASES)
def test_arithmetic_cot_finds_each_pattern(completion, correct, patterns):
    v = arithmetic_cot(PROMPT, completion)
    if correct is None:
        assert not v.checked and not v.correct
    else:
        assert v.checked and v.correct is correct and v.patterns == patterns


def test_the_main_pattern_and_rates():
    verdicts = [arithmetic_cot(PROMPT, c) for c, _, _ in CASES]
    assert verdicts[1].main_pattern == "sum→product" and verdicts[0].main_pattern is None
    rates = pattern_rates(verdicts)
    assert rates["sum→product"] == pytest.approx(1 / 9) and rates["copy error"] == pytest.approx(2 / 9)


def my_checker(prompt: str, completion: str) -> Verdict:
    return Verdict(True, "ok" in completion)


def not_a_verdict(prompt, completion):
    return True


def test_checkers_by_name_module_function_or_callable():
    assert get_checker("arithmetic-cot") is arithmetic_cot
    assert get_checker("test_checkers:my_checker")(PROMPT, "ok").correct
    assert get_checker(my_checker) is my_checker
    for bad in ("nope", "no_such_module:f", "test_checkers:missing", "", 3):
        with pytest.raises(MelboError):
            get_checker(bad)
    with pytest.raises(MelboError, match="not a melbo.judging.checkers.Verdict"):
        check(not_a_verdict, PROMPT, "x")
    with pytest.raises(MelboError, match="failed"):
        check(lambda p, c: 1 / 0, PROMPT, "x")


def test_a_consistent_pattern_is_told_apart_from_random_slips():
    prompts = ["a = 1 + 3, b = 2 + 2. What is a * b?", "a = 3 + 5, b = 1 + 6. What is a * b?"]
    switched = ["a = 1 + 3 = 3, b = 2 + 2 = 4, a * b = 3 * 4 = 12.", "a = 3 + 5 = 15, b = 1 + 6 = 6, a * b = 90."]
    right = ["a = 1 + 3 = 4, b = 2 + 2 = 4, a * b = 4 * 4 = 16.", "a = 3 + 5 = 8, b = 1 + 6 = 7, a * b = 8 * 7 = 56."]
    slip = ["a = 1 + 3 = 3, b = 2 + 2 = 4, a * b = 3 * 4 = 12.", right[1]]  # one slip on one prompt only
    rows = [{"kind": "learned", "label": "v0", "prompt": p, "text": t} for p, t in zip(prompts, switched)]
    rows += [{"kind": "learned", "label": "v1", "prompt": p, "text": t} for p, t in zip(prompts, right)]
    rows += [{"kind": "random", "label": f"random{k}", "prompt": p, "text": t}
             for k, texts in enumerate((slip, right)) for p, t in zip(prompts, texts)]
    perturbations, summary = check_rows(rows, arithmetic_cot, share=1.0)
    by = {p["label"]: p for p in perturbations}
    assert by["v0"]["consistent"] == ["sum→product"] and by["v1"]["consistent"] == []
    assert by["random0"]["patterns"] == {"sum→product": 1} and by["random0"]["consistent"] == []
    row = next(r for r in summary if r["pattern"] == "sum→product")
    assert (row["learned"]["consistent"], row["learned"]["of"]) == (1, 2)
    assert (row["random"]["consistent"], row["random"]["of"]) == (0, 2)
    _, loose = check_rows(rows, arithmetic_cot, share=0.5)  # at half the prompts the slip counts too
    assert next(r for r in loose if r["pattern"] == "sum→product")["random"]["consistent"] == 1


def test_arithmetic_cot_agrees_with_hand_labels_of_real_chains():
    """128 chains of thought of the cot testbed (unsteered, and under random vectors of 0.3–1.2× the residual norm),
    labelled by reading them: steps, right or wrong, and each wrong step's pattern. The first version of the checker
    disagreed on 12 of them, all one rule: "6 + 2 = 6 + 2" is no claim that 6 + 2 = 6."""
    import json
    from pathlib import Path

    rows = [json.loads(line) for line in (Path(__file__).parent / "data" / "cot_labels.jsonl").read_text().splitlines()]
    assert len(rows) >= 100
    slips = [r for r in rows if r["source"].startswith("random") and r["patterns"]]
    assert len(slips) >= 20 and {p for r in rows for p in r["patterns"]} >= {"sum→product", "off by one", "copy error"}
    wrong = []
    for r in rows:
        v = arithmetic_cot(r["prompt"], r["completion"])
        if (v.checked, v.correct, v.patterns) != (r["checked"], r["correct"], r["patterns"]):
            wrong.append((r["id"], v.patterns, r["patterns"]))
    assert not wrong, wrong
