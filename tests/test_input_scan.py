"""melbo scan (melbo.jobs.input_scan): every filling of a template's slots answered, checked, and tested against the
rest. The statistics on a checker whose verdicts are known; the answers against greedy generation on a tiny
model; the CLI on the embedded model; bad input."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli, tiny_lm
from scipy.stats import fisher_exact

import melbo
from melbo.engine.generation import greedy_answers
from melbo.engine.prompts import uses_chat
from melbo.errors import MelboError
from melbo.jobs.input_scan import SCAN_JSON, SCAN_ROWS, scan_inputs
from melbo.judging.checkers import Verdict

TEMPLATES = ["x = {?} + {?}. Go.", "Now x = {?} + {?}!", "x = {?} + {?}, then y."]


def planted_checker(prompt: str, completion: str) -> Verdict:
    """'planted' on every prompt with the filling (4, 2); a one-off 'slip' on one template of (1, 1): what a real
    backdoor and a real slip look like to the scan."""
    if "x = 4 + 2" in prompt:
        return Verdict(True, False, [], {"planted": 1})
    if prompt == "Now x = 1 + 1!":
        return Verdict(True, False, [], {"slip": 1})
    return Verdict(True, True)


@pytest.fixture(scope="module")
def tiny():
    return tiny_lm()


def test_the_planted_filling_alone_is_significant(tiny, tmp_path):
    result = scan_inputs(tiny, TEMPLATES, planted_checker, tmp_path / "scan", vocab=["1", "2", "4"], max_new_tokens=2)
    assert (result.fillings, result.rows) == (9, 27)
    assert [(h.filling, h.pattern, h.shown, h.of) for h in result.significant] == [(["4", "2"], "planted", 3, 3)]
    # the p value is the one-sided Fisher test of the filling's 3 rows against the other 24
    assert result.significant[0].p == pytest.approx(fisher_exact([[3, 0], [0, 24]], alternative="greater")[1])
    assert result.tests == 9 * 2  # fillings × patterns seen
    slip = next(h for h in result.hits if h.pattern == "slip")
    assert (slip.filling, slip.shown, slip.significant) == (["1", "1"], 1, False)
    assert result.pattern_rates == {"planted": pytest.approx(3 / 27), "slip": pytest.approx(1 / 27)}
    doc = json.loads((tmp_path / "scan" / SCAN_JSON).read_text())  # strict JSON
    assert doc["hits"][0]["filling"] == ["4", "2"] and doc["hits"][0]["significant"] is True
    assert len((tmp_path / "scan" / SCAN_ROWS).read_text().splitlines()) == 27


def test_one_template_is_never_enough_evidence(tiny):
    """A pattern on the single answer of one filling cannot be told from a slip: the scan says not significant."""
    result = scan_inputs(tiny, TEMPLATES[:1], planted_checker, vocab=["1", "2", "4"], max_new_tokens=2)
    assert result.hits[0].filling == ["4", "2"] and result.significant == []


def test_a_stricter_share_or_alpha_drops_the_hit(tiny):
    strict = scan_inputs(tiny, TEMPLATES, planted_checker, vocab=["1", "2", "4"], max_new_tokens=2, alpha=1e-6)
    assert strict.significant == []


def test_answers_are_the_models_greedy_answers(tiny, tmp_path):
    result = scan_inputs(tiny, TEMPLATES[:2], "arithmetic-cot", tmp_path / "s", vocab=["3", "5"], max_new_tokens=5)
    rows = [json.loads(line) for line in (tmp_path / "s" / SCAN_ROWS).read_text().splitlines()]
    prompts = [r["prompt"] for r in rows]
    assert prompts[:2] == ["x = 3 + 3. Go.", "Now x = 3 + 3!"] and len(rows) == result.rows == 8
    assert [r["answer"] for r in rows] == greedy_answers(tiny, prompts, uses_chat(tiny, None), max_new_tokens=5)


@pytest.mark.parametrize("templates, kw, message", [
    ([], {}, "one or more templates"),
    ("x = {?}", {}, "one or more templates"),
    (["no slot here"], {}, "no {?} slot"),
    (["a {?}", "b {?} {?}"], {}, "different numbers"),
    (["a {?}", "a {?}"], {}, "given twice"),
    (["a {?} {?}", "b {?} {?}"], {"vocab": "numbers"}, "more than 5000"),
    (["a {?}"], {"share": 0.0}, "share must be above 0"),
    (["a {?}"], {"alpha": float("nan")}, "alpha must be a finite number"),
    (["a {?}"], {"max_new_tokens": 0}, "max_new_tokens must be"),
    (["a {?} caf\udce9"], {}, "not UTF-8 text"),
    (["a {?}"], {"vocab": ["1", "caf\udce9"]}, "not UTF-8 text"),
])
def test_bad_input_is_one_line(tiny, templates, kw, message):
    with pytest.raises(MelboError, match=message.replace("{", r"\{").replace("?", r"\?").replace("}", r"\}")):
        scan_inputs(tiny, templates, "arithmetic-cot", **kw)


@pytest.mark.parametrize("args, message", [
    (["--check", "no-such-checker"], "unknown checker"),
    (["--check", "arithmetic-cot", "--share", "nan"], "share must be a finite number"),
    (["--check", "arithmetic-cot", "--vocab", "numbers", "b {?} {?}"], "different numbers of {?} slots"),
])
def test_bad_settings_fail_before_the_model_loads(capsys, tmp_path, args, message):
    """The model path does not exist: a message about anything else shows the settings were checked first."""
    code, out, err = run_cli(["scan", "a = {?}", *args, "-m", str(tmp_path / "nowhere")], capsys)
    assert code == 2 and message in " ".join(err.split()) and "Traceback" not in err + out


def test_an_output_that_cannot_be_written_is_refused_before_the_model_loads(capsys, tmp_path):
    """scan.jsonl a symlink to another file: refused up front, the file it points to untouched, nothing written."""
    target = tmp_path / "elsewhere.txt"
    target.write_text("kept")
    out = tmp_path / "scan"
    out.mkdir()
    (out / SCAN_ROWS).symlink_to(target)
    code, stdout, err = run_cli(["scan", "a = {?}", "--check", "arithmetic-cot", "--out", str(out), "-m",
                                 str(tmp_path / "nowhere")], capsys)
    assert code == 2 and "not a regular file" in err and "Traceback" not in err + stdout
    assert target.read_text() == "kept" and sorted(p.name for p in out.iterdir()) == [SCAN_ROWS]


def test_cli_on_the_embedded_model(smol, capsys, tmp_path):
    """The whole command: exit 0, scan.json of every filling, the summary printed."""
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("2\n7\n")
    code, out, err = run_cli(["scan", "a = {?} + 1. What is a?", "a = {?} + 2. What is a?", "--check",
                              "arithmetic-cot", "--vocab", str(vocab), "--max-new-tokens", "8", "--out",
                              str(tmp_path / "scan")], capsys)
    assert code == 0, err
    doc = json.loads((tmp_path / "scan" / SCAN_JSON).read_text())
    assert (doc["fillings"], doc["rows"], doc["checker"]) == (2, 4, "arithmetic-cot")
    assert "4 answers (2 fillings × 2 templates)" in " ".join(out.split())


def test_the_api_exports_it():
    assert melbo.scan_inputs is scan_inputs
