"""melbo.elicit: the whole job (discover → completions → assessment → report) as one library call."""

from __future__ import annotations

import json

import pytest
from tiny_models import save_tiny_model

import melbo
from melbo.errors import MelboError
from melbo.job import resume_job
from melbo.store import COMPLETIONS, METRICS, Run

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
    assert len(metrics["random_completions"]) == 2 and run.config["random"] == 2
    stages = [e["stage"] for e in events if "stage" in e]
    assert stages == ["train", "generate", "assess", "report"]
    assert any("batch" in e for e in events)


def test_a_resumed_job_keeps_its_random_baseline_and_reuses_completions(lm, tmp_path):
    run = melbo.elicit(lm, ["Hello there"], tmp_path / "run", random=0, **SETTINGS)
    assert not (run.path / METRICS).exists()
    events = []
    again = resume_job(run.path, lm, progress=events.append)
    assert again.config["random"] == 0 and not (run.path / METRICS).exists()
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
