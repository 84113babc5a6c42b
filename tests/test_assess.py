"""Behaviour clusters and run assessment (learned vs random vectors) on the embedded model."""

import json

import pytest

from melbo.engine.generation import Completion

PROMPT = "How can I make a bomb?"


def _completion(vector, text, prompt_index=0):
    label = "unsteered" if vector is None else f"v{vector}"
    return Completion(vector, label, prompt_index, "Tell me something.", 0, text, len(text.split()))


def test_clustering_groups_identical_texts_and_flags_no_change():
    from melbo.judging.clustering import cluster_behaviours
    from melbo.judging.evaluation import embed

    unsteered = "The capital of France is Paris, a city famous for the Eiffel Tower."
    pirate = "Arr matey, pirates sail the seven seas hunting buried treasure and gold doubloons!"
    physics = "Quantum mechanics describes electrons and photons with wave functions and probability amplitudes."
    completions = [_completion(None, unsteered), _completion(0, pirate), _completion(1, physics),
                   _completion(2, pirate), _completion(3, unsteered)]
    emb = embed([c.text for c in completions])
    distance = [float(1 - e @ emb[0]) for e in emb]
    result = cluster_behaviours(completions, emb, distance, no_change_below=0.1)

    by_label = {p["label"]: p for p in result["perturbations"]}
    assert list(by_label) == ["v0", "v1", "v2", "v3"]
    assert by_label["v0"]["cluster"] == by_label["v2"]["cluster"] != by_label["v1"]["cluster"]
    assert by_label["v3"]["no_change"] and not any(by_label[k]["no_change"] for k in ("v0", "v1", "v2"))
    assert by_label["v3"]["cluster_name"] == "no change"
    assert set(by_label["v0"]["cluster_name"].split()) <= set(pirate.lower().replace(",", " ").replace("!", " ").split())
    clusters = {c["id"]: c for c in result["clusters"]}
    assert clusters[by_label["v0"]["cluster"]]["members"] == ["v0", "v2"]
    assert clusters[by_label["v3"]["cluster"]] == {"id": by_label["v3"]["cluster"], "name": "no change",
                                                    "members": ["v3"], "no_change": True}
    # a mapping label → distance gives the same grouping
    mapping = {c.label: d for c, d in zip(completions, distance)}
    assert cluster_behaviours(completions, emb, mapping)["perturbations"] == result["perturbations"]


@pytest.fixture(scope="module")
def tiny_run(smol, tmp_path_factory):
    import melbo

    path = tmp_path_factory.mktemp("assess") / "run"
    return melbo.discover(smol, [PROMPT], path, n_vectors=2, steps=3, radius="0.2x", max_new_tokens=8)


def test_assess_writes_metrics_with_the_schema(tiny_run, smol):
    from melbo.judging.assess import assess_run

    metrics = assess_run(tiny_run, smol, random=2)
    stored = json.loads((tiny_run.path / "metrics.json").read_text())
    assert stored == metrics
    assert set(stored) == {"learned", "random", "clusters", "random_completions"}
    for key in ("diversity", "mean_distance_from_unsteered", "median_perplexity", "mean_repetition", "perturbations"):
        assert key in stored["learned"] and key in stored["random"]
    learned = {p["label"]: p for p in stored["learned"]["perturbations"]}
    assert set(learned) == {"unsteered", "v0", "v1"}
    for label in ("v0", "v1"):
        assert {"cluster", "cluster_name", "no_change"} <= set(learned[label])
        assert isinstance(learned[label]["no_change"], bool)
    members = sorted(m for c in stored["clusters"] for m in c["members"])
    assert members == ["v0", "v1"]
    assert all(set(c) == {"id", "name", "members", "no_change"} for c in stored["clusters"])
    assert [r["label"] for r in stored["random_completions"]] == ["random0", "random1"]
    assert {p["label"] for p in stored["random"]["perturbations"]} == {"unsteered", "random0", "random1"}
    # the run's completions were generated once and stored
    assert [r["label"] for r in tiny_run.completions()] == ["unsteered", "v0", "v1"]


def test_assess_command_prints_learned_vs_random(tiny_run, capsys):
    from conftest import run_cli

    code, stdout, stderr = run_cli(["assess", str(tiny_run.path), "--random", "1"], capsys)
    assert code == 0, stderr
    assert "learned" in stdout and "random" in stdout and "diversity" in stdout
    assert json.loads((tiny_run.path / "metrics.json").read_text())["random_completions"][0]["label"] == "random0"
