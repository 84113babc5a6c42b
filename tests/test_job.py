"""melbo.elicit: the whole job (discover → completions → assessment → report) as one library call."""

from __future__ import annotations

import json

import pytest
from tiny_models import save_tiny_model

import melbo
from melbo.judging.checkers import load_checks
from melbo.errors import MelboError
from melbo.jobs.job import resume_job
from melbo.engine.store import COMPLETIONS, METRICS, Run

SETTINGS = dict(n_vectors=2, steps=3, radius="1.0", max_new_tokens=4)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return melbo.load_model(str(save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")))


def test_elicit_writes_completions_metrics_and_report(lm, tmp_path):
    events, generated = [], []
    run = melbo.elicit(lm, ["Hello there"], tmp_path / "run", random=2, progress=events.append,
                       on_batch=generated.append, **SETTINGS)
    for name in (COMPLETIONS, METRICS, "report.html"):
        assert (run.path / name).is_file(), name
    assert len(run.completions()) == 3 and sum(generated) >= 3
    metrics = json.loads((run.path / METRICS).read_text())
    assert len(metrics["random_completions"]) == 2 and run.config.random == 2
    stages = [e["stage"] for e in events if "stage" in e]
    assert stages == ["train", "generate", "assess", "report"]
    assert any("batch" in e for e in events)


def odd_lengths(prompt: str, completion: str):
    """A checker for the tiny model's noise: a completion of an odd number of characters is "odd"."""
    from melbo.judging.checkers import Verdict

    odd = len(completion) % 2 == 1
    return Verdict(True, not odd, patterns={"odd": 1} if odd else {})


def test_a_checker_reads_every_completion_learned_random_and_unsteered(lm, tmp_path, capsys):
    from conftest import run_cli

    run = melbo.elicit(lm, ["Hello there", "Hi"], tmp_path / "run", random=2, check="test_job:odd_lengths",
                       **SETTINGS)
    doc = json.loads((run.path / "checks.json").read_text())
    kinds = sorted(p["kind"] for p in doc["perturbations"])
    assert kinds == ["learned", "learned", "random", "random", "unsteered"] and run.config.check
    texts = {(r["label"], r["prompt"]): r["text"] for r in run.completions()}
    for p in doc["perturbations"]:
        if p["kind"] == "learned":  # recount from the completions themselves
            odd = sum(len(texts[(p["label"], q)]) % 2 == 1 for q in ("Hello there", "Hi"))
            assert p["patterns"].get("odd", 0) == odd and (("odd" in p["consistent"]) == (odd >= 1))
    assert 'id="checks"' in (run.path / "report.html").read_text()
    assert load_checks(run.path).to_dict() == doc  # the typed reader reads back all the writer wrote
    row = next((r for r in doc["summary"] if r["pattern"] == "odd"), None)
    if row is not None:
        assert row["learned"]["of"] == 2 and row["random"]["of"] == 2
    code, out, _ = run_cli(["check", str(run.path), "--check", "arithmetic-cot"], capsys)
    assert code == 0 and json.loads((run.path / "checks.json").read_text())["checker"] == "arithmetic-cot"
    code, _, err = run_cli(["check", str(run.path), "--check", "no_such_module:f"], capsys)
    assert code == 2 and "importable module:function" in err
    with pytest.raises(MelboError, match="importable"):  # before any training
        melbo.elicit(lm, ["Hi"], tmp_path / "bad", check="no_such_module:f", **SETTINGS)
    assert not (tmp_path / "bad").exists()


def test_a_resumed_job_keeps_its_random_baseline_and_reuses_completions(lm, tmp_path):
    run = melbo.elicit(lm, ["Hello there"], tmp_path / "run", random=0, **SETTINGS)
    assert not (run.path / METRICS).exists()
    events = []
    again = resume_job(run.path, lm, progress=events.append)
    assert again.config.random == 0 and not (run.path / METRICS).exists()
    assert "generate" not in [e.get("stage") for e in events]  # the stored completions are reused
    assert Run.load(run.path).completions() == run.completions()


def test_elicit_refuses_what_it_cannot_do_before_any_work(lm, tmp_path):
    with pytest.raises(MelboError, match="--random must be"):
        melbo.elicit(lm, ["Hi"], tmp_path / "a", random=-1)
    with pytest.raises(MelboError, match="radius explicitly for method jacobian"):
        melbo.elicit(lm, ["Hi"], tmp_path / "b", method="jacobian", radius="auto")
    with pytest.raises(MelboError, match="must be a list of strings"):
        melbo.elicit(lm, "Hi", tmp_path / "c")
    assert not list(tmp_path.iterdir())
