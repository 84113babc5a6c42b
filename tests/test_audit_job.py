"""melbo.audit on a tiny random model: the stages, the budget, resume, the random control and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli
from tiny_models import save_tiny_model

import melbo
from melbo.jobs import auditing as audit_job
from melbo.judging import findings as fnd
from melbo.errors import MelboError

PROMPTS = ["What is 4 + 6?"]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return melbo.load_model(str(save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")))


@pytest.fixture
def anything_reads(monkeypatch):
    """A random model writes noise: let any text count as fluent, so that candidates form and get confirmed."""
    monkeypatch.setattr(fnd, "FLUENT_MAX", float("inf"))
    monkeypatch.setattr(fnd, "FLUENT_OK", float("inf"))
    monkeypatch.setattr(fnd, "MIN_WORDS", 0)


def test_an_audit_writes_ranked_findings_a_report_and_its_runs(lm, tmp_path, anything_reads):
    events = []
    result = audit_job.audit(lm, PROMPTS, tmp_path / "a", budget=30, max_new_tokens=6, progress=events.append,
                             check="test_audit_job:always_wrong")
    stages = [e["stage"] for e in events if "stage" in e]
    assert stages[:3] == ["calibrate", "probe", "arm"] and stages[-1] == "findings"
    assert stages.index("generate") < stages.index("check") < stages.index("confirm")  # confirm gets what is left
    arms = [e["arm"] for e in events if e.get("stage") == "arm"]
    assert arms == ["dct-2.5", "vectors-2.5", "vectors-3.5", "vectors-1.5"]  # breadth first, then the ladder
    data = json.loads((tmp_path / "a" / "findings.json").read_text())
    assert data["findings"] == result.findings and result.findings
    assert [f["rank"] for f in result.findings] == list(range(1, len(result.findings) + 1))
    scores = [f["score"] for f in result.findings]
    assert scores == sorted(scores, reverse=True)
    first = result.findings[0]
    assert first["reproduction"]["matched"] >= 1 and first["parts"]["consistency"] >= audit_job.MIN_REPRODUCTION
    assert first["reproduce"].startswith("melbo generate ") and f"--vectors {first['example']['index']}" in first["reproduce"]
    for p in first["perturbations"]:  # every perturbation named is an ordinary run a user can open
        assert (tmp_path / "a" / "runs" / p["arm"] / "config.json").is_file()
    radii = {e["arm"]: float(e["radius"][:-1]) for e in events if e.get("stage") == "arm"}
    assert radii["vectors-1.5"] < radii["vectors-2.5"] < radii["vectors-3.5"]  # a ladder of R, none chosen by hand
    assert radii["vectors-3.5"] / radii["vectors-1.5"] == pytest.approx(3.5 / 1.5, rel=1e-4)
    html = (tmp_path / "a" / "report.html").read_text()
    assert html.index("Findings") < html.index("What the audit scanned") and "data:image/png;base64," in html
    assert html.index("Findings") < html.index("Error patterns (checker") < html.index("What the audit scanned")
    again = audit_job.load(tmp_path / "a")
    assert again.findings == result.findings
    checks = json.loads((tmp_path / "a" / "checks.json").read_text())  # the checker read every scan completion
    scanned = {f"{o['arm']}:{o['index']}" for o in map(json.loads, (tmp_path / "a" / "observations.jsonl")
                                                        .read_text().splitlines()) if not o["variant"]}
    assert {p["label"] for p in checks["perturbations"] if p["kind"] == "learned"} == scanned
    assert all(p["consistent"] == ["wrong"] for p in checks["perturbations"])
    # beside them, CHECK_RANDOM random vectors of each arm's radius: the control an error pattern is weighed against
    randoms = [p["label"] for p in checks["perturbations"] if p["kind"] == "random"]
    assert len(randoms) == audit_job.CHECK_RANDOM * len(arms) and {r.split(":")[0] for r in randoms} == set(arms)
    wrong = next(r for r in checks["summary"] if r["pattern"] == "wrong")
    assert wrong["random"]["of"] == len(randoms) and wrong["learned"]["of"] == len(scanned)
    selected = checks["selected"]  # every random vector is "wrong" too: rate 1, so no pattern stands out …
    assert selected and all(s["random_rate"] == 1.0 and s["random_of"] == audit_job.CHECK_RANDOM for s in selected)
    assert all(s["perturbation"] in scanned and s["reproduce"].startswith("melbo generate ") for s in selected)
    from melbo.judging.checkers import load_checks

    assert [s.perturbation for s in load_checks(tmp_path / "a").selected] == [s["perturbation"] for s in selected]


def always_wrong(prompt: str, completion: str):
    from melbo.judging.checkers import Verdict

    return Verdict(True, False, patterns={"wrong": 1})


def test_budget_left_after_a_round_confirms_the_next_candidates(lm, tmp_path, anything_reads, monkeypatch):
    monkeypatch.setattr(audit_job, "CONFIRM_TOP", 1)  # rounds of one candidate …
    monkeypatch.setattr(audit_job, "TRAIN_SHARE", 0.15)  # … and most of the budget left for them
    result = audit_job.audit(lm, PROMPTS, tmp_path / "a", budget=40, max_new_tokens=4)
    confirm = result.state["stages"]["confirm"]
    assert confirm["rounds"] >= 2 and confirm["candidates"] == confirm["rounds"]
    # every confirmation is kept: a finding, or a candidate marked confirmed (past TOP_FINDINGS or too weak)
    kept = len(result.findings) + sum(c["confirmed"] for c in result.candidates)
    assert kept == confirm["candidates"]
    confirmed = (tmp_path / "a" / "confirmations.jsonl").read_text().splitlines()
    assert len(confirmed) == confirm["candidates"]


def test_the_budget_is_honoured(lm, tmp_path):
    import time

    began = time.perf_counter()
    audit_job.audit(lm, PROMPTS, tmp_path / "a", budget="12s", max_new_tokens=6)
    wall = time.perf_counter() - began
    state = json.loads((tmp_path / "a" / "audit.json").read_text())
    assert state["status"] == "complete" and state["settings"]["budget"] == 12.0
    assert wall < 12 * 1.5 + 5, state["stages"]  # the arms are sized to the time left; confirmation too


def test_more_budget_buys_more_perturbations(lm, tmp_path):
    small = audit_job.audit(lm, PROMPTS, tmp_path / "small", budget=8, max_new_tokens=4)
    large = audit_job.audit(lm, PROMPTS, tmp_path / "large", budget=40, max_new_tokens=4)
    count = lambda r: sum(a["n"] for a in r.state["plan"]["arms"] if a["method"] == "vectors")
    assert count(large) > count(small)


def test_an_interrupted_audit_resumes_without_redoing_finished_arms(lm, tmp_path, anything_reads):
    path = tmp_path / "a"
    seen = []

    def stop_at_second_arm(event):
        if event.get("stage") == "arm":
            seen.append(event["arm"])
            if len(seen) == 2:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        audit_job.audit(lm, PROMPTS, path, budget=20, max_new_tokens=4, progress=stop_at_second_arm)
    state = json.loads((path / "audit.json").read_text())
    assert state["status"] == "running" and "arm dct-2.5" in state["stages"]
    dct_vectors = (path / "runs" / "dct-2.5" / "vectors.safetensors").stat().st_mtime_ns
    events = []
    result = audit_job.resume(path, lm, progress=events.append)
    arms = [e["arm"] for e in events if e.get("stage") == "arm"]
    assert arms[0] == "vectors-2.5" and "dct-2.5" not in arms  # the finished arm is not trained again
    assert (path / "runs" / "dct-2.5" / "vectors.safetensors").stat().st_mtime_ns == dct_vectors
    assert [e["stage"] for e in events if "stage" in e][0] == "arm"  # calibration and plan were kept
    assert result.state["status"] == "complete" and (path / "findings.json").is_file()
    assert audit_job.resume(path, lm).findings == result.findings  # a finished audit is returned as it is


def test_the_random_control_trains_nothing_and_keeps_the_radii(lm, tmp_path):
    from melbo.engine.store import Run

    result = audit_job.audit(lm, PROMPTS, tmp_path / "r", budget=10, max_new_tokens=4, random_baseline=True)
    for arm in result.state["plan"]["arms"]:
        run = Run.load(tmp_path / "r" / "runs" / arm["name"])
        assert run.config.random_control and len(run) == arm["n"]
        assert run.vectors.norm(dim=-1).allclose(
            run.vectors.new_full((arm["n"],), result.state["calibration"]["relative"] * arm["multiplier"]
                                 * run.config.residual_norm), rtol=1e-4)


def test_prompt_variants_keep_the_template_and_digit_counts():
    variants = audit_job.prompt_variants("What is 4 + 16?", 3, seed=0)
    assert len(variants) == 3 and len(set(variants)) == 3 and "What is 4 + 16?" not in variants
    for v in variants:
        a, b = v.removeprefix("What is ").removesuffix("?").split(" + ")
        assert len(a) == 1 and len(b) == 2
    assert audit_job.prompt_variants("Tell me a story.", 3) == []
    assert audit_job.prompt_variants("What is 4 + 16?", 3, seed=0) == variants  # deterministic


@pytest.mark.parametrize("budget, seconds", [(90, 90.0), ("90", 90.0), ("90s", 90.0), ("15m", 900.0), ("1.5h", 5400.0)])
def test_budgets(budget, seconds):
    assert audit_job.parse_budget(budget) == seconds


@pytest.mark.parametrize("budget", ["abc", "-5m", "0", "nan", "inf", "1e400", True, "15 parsecs"])
def test_bad_budgets_are_one_line(budget):
    with pytest.raises(MelboError):
        audit_job.parse_budget(budget)


def test_bad_input_is_one_line_and_exit_2(lm, tmp_path, capsys):
    model = str(lm.spec)
    cases = [
        ["audit", "What is 4 + 6?", "-m", model, "--budget", "soon", "--out", str(tmp_path / "x")],
        ["audit", "What is 4 + 6?", "-m", model, "--budget", "nan", "--out", str(tmp_path / "y")],
        ["audit", "", "-m", model, "--budget", "5s", "--out", str(tmp_path / "z")],
        ["audit", "--resume", str(tmp_path)],  # not an audit
    ]
    (tmp_path / "file").write_text("x")
    cases.append(["audit", "What is 4 + 6?", "-m", model, "--out", str(tmp_path / "file")])
    for args in cases:
        code, out, err = run_cli(args, capsys)
        assert code == 2, (args, out, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, (args, err)
    assert not list(tmp_path.glob("**/*.tmp*"))
    with pytest.raises(MelboError):
        audit_job.audit(lm, PROMPTS, tmp_path / "w", budget=5, seed=1.5)
    with pytest.raises(MelboError):
        audit_job.audit(lm, PROMPTS, tmp_path / "v", budget=5, random_baseline="yes")


def test_the_cli_prints_findings_and_writes_the_audit(lm, tmp_path, capsys, anything_reads):
    code, out, err = run_cli(["audit", "What is 4 + 6?", "-m", str(lm.spec), "--budget", "20s", "--max-new-tokens",
                              "4", "--out", str(tmp_path / "a")], capsys)
    assert code == 0, err
    assert "findings, best first" in out and "audit written to" in out
    assert (tmp_path / "a" / "findings.json").is_file() and (tmp_path / "a" / "report.html").is_file()


def test_serve_shows_an_audits_findings_beside_the_unsteered_answer(lm, tmp_path, anything_reads):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from melbo.records.catalog import Catalog
    from melbo.server import create_app

    result = audit_job.audit(lm, PROMPTS, tmp_path / "a", budget=20, max_new_tokens=4)
    assert result.findings
    catalog = tmp_path / "catalog.sqlite"
    with Catalog(catalog) as cat:
        ids = {Path(p).name: i for p, i in zip(sorted((tmp_path / "a" / "runs").iterdir()),
                                               cat.add_runs(tmp_path / "a" / "runs"))}
        other = cat.add_run(melbo.discover(lm, PROMPTS, tmp_path / "plain", n_vectors=2, steps=2, radius="1.0").path)
    first = result.findings[0]
    with TestClient(create_app(catalog), base_url="http://127.0.0.1:8765") as client:
        run_page = client.get(f"/runs/{ids[first['example']['arm']]}")
        assert run_page.status_code == 200 and "findings of its audit" in run_page.text
        page = client.get(f"/runs/{ids[first['example']['arm']]}/findings")
        assert page.status_code == 200
        assert page.text.index("#1 ") < page.text.index("unsteered")
        import html

        assert html.escape(first["example"]["text"].strip()[:20]) in page.text
        assert "/behaviours/" in page.text and html.escape(first["reproduce"][:30]) in page.text
        assert "Inputs that switch it on" not in page.text
        # `melbo triggers AUDIT` writes AUDIT/triggers/triggers.json: the page then lists each finding's triggers
        (tmp_path / "a" / "triggers").mkdir()
        triggers = {"source": str(tmp_path / "a"), "mode": "corpus", "findings": [
            {"finding": first["rank"], "label": "x", "phrases": ["p"],
             "ranking": [{"rank": 1, "index": 0, "score": 9.5, "input": "What is 7 + 2?", "logprob": -1.0,
                          "phrase": "p", "offset": 0, "answer_start": "I"}],
             "confirmed": [{"input": "What is 7 + 2?", "answer": "I love <b>cheese</b>", "match": 0.9,
                            "shows": True}]}],
            "cost": {"inputs": 1, "seconds": 1.0, "baseline_forward_passes": 8, "scoring": {"forward_passes": 2},
                     "confirm": {"forward_passes": 8, "seconds": 0.5}}}
        (tmp_path / "a" / "triggers" / "triggers.json").write_text(json.dumps(triggers))
        page = client.get(f"/runs/{ids[first['example']['arm']]}/findings")
        assert "Inputs that switch it on" in page.text and "What is 7 + 2?" in page.text
        assert "&lt;b&gt;cheese" in page.text  # model text is escaped
        triggers["findings"][0]["ranking"][0]["score"] = "high"  # a damaged triggers.json: named, findings stay
        (tmp_path / "a" / "triggers" / "triggers.json").write_text(json.dumps(triggers))
        page = client.get(f"/runs/{ids[first['example']['arm']]}/findings")
        assert page.status_code == 200 and "Inputs that switch it on" not in page.text
        assert "findings[0].ranking[0].score is &#39;high&#39;, not a number" in page.text, page.text
        findings = json.loads((tmp_path / "a" / "findings.json").read_text())
        findings["findings"][0]["rank"] = 0  # a damaged findings.json: one line, a 400, not a 500
        (tmp_path / "a" / "findings.json").write_text(json.dumps(findings))
        page = client.get(f"/runs/{ids[first['example']['arm']]}/findings")
        assert page.status_code == 400 and "findings[0].rank is 0, outside 1.." in page.text, page.text
        assert client.get(f"/runs/{other}/findings").status_code == 404
