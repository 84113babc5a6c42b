"""Benchmarks: detectors on fixed strings, bench.json well-formed for scaled-down runs, the report section."""

from __future__ import annotations

import json

import pytest

from melbo.bench import arithmetic, refusal
from melbo.bench.common import BENCH, BenchResult, compile_patterns, first_match, matches, print_result


# ------------------------------------------------------------------------------------------------ detectors
@pytest.mark.parametrize("text, strict, lenient", [
    (" 391\n\nQ: 10", True, True),
    (" 17 * 23 = 391", True, True),
    (" Let's see. 17 × 23 = 391.", True, True),
    (" The answer is 391.", True, True),
    (" 391", True, True),
    ("391 is the product", True, True),    # "A:" + text = "A:391 …": the seed's "A: {a*b}", space optional
    (" 3910", False, False),
    (" 390", False, False),
    (" 17 * 20 = 340, 17 * 3 = 51, 340 + 51 = 391", False, False),
    ("", False, False),
])
def test_arithmetic_correctness(text, strict, lenient):
    assert arithmetic.strict_correct(text, 17, 23) is strict
    assert arithmetic.lenient_correct(text, 17, 23) is lenient


def test_lenient_uses_the_first_number_and_thousands_separators():
    assert arithmetic.lenient_correct("\n\n2,491 apples", 47, 53)
    assert arithmetic.strict_correct("\nSo the answer is 2,491", 47, 53)
    assert not arithmetic.lenient_correct("\n\n47 apples times 53 is 2491", 47, 53)
    assert arithmetic.first_number("no digits") is None


@pytest.mark.parametrize("text, reasoning", [
    (" 391", False),
    (" 17 * 23 = 391", False),
    (" 17 * 20 = 340\n17 * 3 = 51\n340 + 51 = 391", True),
    (" First, multiply 17 by 3.", True),
    (" Step 1: write the numbers.", True),
    (" Let's break it down.", True),
    (" 17 * 20 is 340, plus 51", True),      # a partial product with b's tens
    (" Paris is the capital of France.", False),
])
def test_reasoning_detector(text, reasoning):
    assert arithmetic.is_reasoning(text, 17, 23) is reasoning


@pytest.mark.parametrize("text", [
    "I'm sorry, but I can't assist with that.",
    "I’m sorry, I can’t help with that request.",
    "I cannot provide instructions for making weapons.",
    "As an AI language model, I must decline.",
    "Unfortunately I am not able to help with this.",
    "I apologize, but that request is harmful.",
    "Making explosives is illegal and dangerous, so I won't explain it.",
])
def test_refusals_detected(text):
    assert refusal.is_refusal(text)


@pytest.mark.parametrize("text", [
    "Sure! Here is a recipe for sourdough bread: mix flour, water and salt.",
    "To bake bread, first knead the dough for ten minutes.",
    "Once upon a time, a knight built a catapult to defend the castle.",
    "",
])
def test_compliance_not_flagged(text):
    assert not refusal.is_refusal(text)


def test_generic_pattern_helpers():
    patterns = compile_patterns([r"\bcheese\b", r"love"])
    assert matches("I love cheese!", patterns)
    assert first_match("I love cheese!", patterns) == "cheese"
    assert first_match("bread", patterns) is None


def test_shipped_request_sets():
    harmful, innocuous = refusal.shipped_prompts("harmful"), refusal.shipped_prompts("innocuous")
    assert len(harmful) >= 10 and len(innocuous) >= 10
    assert not set(harmful) & set(innocuous)


def test_held_out_pairs_exclude_the_prompt_pairs():
    for digits in ("2x1", "2x2"):
        pairs = arithmetic.held_out_pairs(30, digits)
        assert len(set(pairs)) == 30
        assert arithmetic.TRAIN_PAIR[digits] not in pairs and arithmetic.EXAMPLE[digits] not in pairs
        assert all(10 <= a <= 99 and (b < 10 if digits == "2x1" else b >= 10) for a, b in pairs)


# ------------------------------------------------------------------------------------------------ result file
def _check_schema(doc: dict, bench: str) -> None:
    assert set(doc) == {"bench", "title", "settings", "tables", "notes", "wall_seconds"}
    assert doc["bench"] == bench and isinstance(doc["title"], str) and isinstance(doc["settings"], dict)
    assert isinstance(doc["notes"], list) and all(isinstance(n, str) for n in doc["notes"])
    assert doc["wall_seconds"] > 0
    assert doc["tables"]
    for t in doc["tables"]:
        assert set(t) == {"title", "columns", "rows"} and isinstance(t["title"], str)
        assert all(isinstance(c, str) for c in t["columns"])
        for row in t["rows"]:
            assert len(row) == len(t["columns"])
            assert all(c is None or isinstance(c, (str, int, float, bool)) for c in row)


def _rates(rows, columns):
    return [c for row in rows for c in row[columns] if isinstance(c, float)]


def test_result_round_trip_and_printing(tmp_path, capsys):
    from rich.console import Console

    result = BenchResult("demo", "a demo", {"n": 1})
    result.table("t", ["a", "b"]).add("<b>x</b>", float("nan"))
    result.wall_seconds = 1.5
    result.write(tmp_path)
    back = BenchResult.load(tmp_path)
    assert back.tables[0].rows == [["<b>x</b>", None]] and back.settings == {"n": 1}
    print_result(back, Console(width=100))
    assert "[b]" not in capsys.readouterr().out


SMALL = dict(n_vectors=2, steps=3, max_new_tokens=8)


def test_arithmetic_bench_small(smol, tmp_path):
    out = tmp_path / "arith"
    result = arithmetic.run_bench(smol, out, pairs=3, **SMALL)
    doc = json.loads((out / BENCH).read_text())
    _check_schema(doc, "arithmetic")
    assert doc == result.to_json()
    assert doc["settings"]["pairs"] == 3 and doc["settings"]["n_vectors"] == 2
    summary, counts, per = doc["tables"]
    assert [row[0] for row in per["rows"]] == ["unsteered", "v0", "v1"]
    for row in summary["rows"] + per["rows"]:
        assert all(0.0 <= x <= 1.0 for x in row[1:4])
        assert row[2] >= row[1]  # lenient ≥ strict
    assert all(0 <= row[1] <= 2 for row in counts["rows"])
    lines = (out / "bench_completions.jsonl").read_text().splitlines()
    assert len(lines) == 3 * 3  # pairs × (unsteered + 2 vectors)
    assert len((out / "completions.jsonl").read_text().splitlines()) == 3


def test_refusal_bench_small_and_report(smol, tmp_path):
    from melbo.report import write_report

    out = tmp_path / "refusal"
    result = refusal.run_bench(smol, out, n_random=2, requests=2, **SMALL)
    doc = json.loads((out / BENCH).read_text())
    _check_schema(doc, "refusal")
    training = doc["tables"][0]
    assert [row[1] for row in training["rows"]] == [1, 2, 2]
    for row in training["rows"]:
        assert 0 <= row[4] <= row[2] <= row[1] and 0.0 <= row[5] <= row[3] <= 1.0
    general = [t for t in doc["tables"] if t["title"].startswith("best anti-refusal")]
    for t in general:
        for row in t["rows"]:
            assert row[2] == 2 and all(0.0 <= x <= 1.0 for x in row[3:])
    assert len(doc["tables"][-1]["rows"]) == 1 + 2 + 2
    page = write_report(out).read_text()
    assert 'id="benchmark"' in page and result.title in page


def test_report_benchmark_section_is_escaped(tmp_path):
    from test_report import HOSTILE, make_run

    from melbo.report import write_report

    run = make_run(tmp_path / "run")
    assert 'id="benchmark"' not in write_report(run).read_text()
    result = BenchResult("demo", f"title {HOSTILE}", {"model": HOSTILE, "pairs": [1, 2]})
    table = result.table(f"table {HOSTILE}", ["label", HOSTILE, "rate"])
    table.add("v0", HOSTILE, 0.123456)
    result.notes.append(HOSTILE)
    result.wall_seconds = 2.0
    result.write(run)
    page = write_report(run).read_text()
    assert 'id="benchmark"' in page and "0.123" in page
    assert "<script>" not in page and "<img src=x" not in page
    assert page.count("&lt;script&gt;") >= 5
    assert page.index('id="benchmark"') < page.index("<footer")


def test_more_held_out_pairs_than_exist_is_refused():
    from melbo.bench.arithmetic import held_out_pairs
    from melbo.errors import MelboError

    with pytest.raises(MelboError, match="distinct 2x1 pairs"):
        held_out_pairs(700, "2x1")
    assert len(set(held_out_pairs(50, "2x1"))) == 50
