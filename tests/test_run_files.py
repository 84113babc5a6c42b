"""The typed readers of a run's JSON files (metrics.json, divergence.json, sweep.json, bench.json): what the writers
write round-trips, and a damaged field is one line naming the file, the field and the fix."""

from __future__ import annotations

import copy
import json

import pytest

from melbo.judging.assess import Metrics
from melbo.bench.common import BenchResult
from melbo.judging.divergence import Divergence, load_divergence
from melbo.errors import MelboError
from melbo.jobs.sweep import SweepResult, decide

SCORES = {"diversity": 0.4, "mean_distance_from_unsteered": 0.3, "median_perplexity": 9.0, "mean_repetition": None,
          "perturbations": [
              {"label": "unsteered", "vector": None, "distance_from_unsteered": 0.0, "perplexity": 5.0,
               "repetition": 0.1, "mean_tokens": 8.0, "cluster": None, "cluster_name": None, "no_change": None},
              {"label": "v0", "vector": 0, "distance_from_unsteered": 0.3, "perplexity": 9.0, "repetition": 0.2,
               "mean_tokens": 12.0, "cluster": 1, "cluster_name": "pirates", "no_change": False}]}
METRICS = {"learned": SCORES, "random": None,
           "clusters": [{"id": 1, "name": "pirates", "members": ["v0"], "no_change": False}],
           "random_completions": [{"vector": 0, "label": "random0", "prompt_index": 0, "prompt": "hi", "sample": 0,
                                   "text": "arr", "tokens": 3}]}
ROW = {"label": "v0", "vector": 0, "kind": "learned", "prompt_index": 0, "prompt": "hi", "audited": "arr",
       "reference": "hello", "tokens": 3, "kl": 1.5, "distance": 0.4}
DIVERGENCE = {"kl_tokens": 16, "unsteered": [{**ROW, "label": "unsteered", "vector": None, "kind": "unsteered"}],
              "rows": [{**ROW, "rank": 1}, {**ROW, "label": "random0", "vector": 1, "kind": "random", "rank": 2,
                                            "kl": None}]}
POINT = {"radius": 2.0, "radius_relative": 0.2, "source": 2, "target": 6, "diversity": 0.4,
         "median_perplexity": 9.0, "mean_distance_from_unsteered": 0.3, "mean_repetition": 0.1}
BENCH = {"bench": "refusal", "title": "Refusal", "settings": {"n": 4},
         "tables": [{"title": "rates", "columns": ["arm", "rate"], "rows": [["learned", 0.5], ["random", None]]}],
         "notes": ["a note"], "wall_seconds": 12.5}


def _damaged(doc: dict, path: tuple, value) -> dict:
    doc = copy.deepcopy(doc)
    where = doc
    for key in path[:-1]:
        where = where[key]
    where[path[-1]] = value
    return doc


def _one_line(exc: pytest.ExceptionInfo, file, *fragments: str) -> None:
    message = str(exc.value)
    assert "\n" not in message and str(file) in message, message
    assert all(f in message for f in fragments), message


def test_metrics_round_trip_and_typed_access(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps(METRICS))
    metrics = Metrics.load(tmp_path)
    assert metrics.learned.unsteered.perplexity == 5.0 and [p.cluster_name for p in metrics.learned.steered] == [
        "pirates"]
    assert metrics.random is None and metrics.random_completions[0].text == "arr"
    assert metrics.to_dict() == METRICS and Metrics.load(tmp_path / "none") is None


@pytest.mark.parametrize("path, value, fragment", [
    (("learned", "perturbations", 1, "vector"), -1, "learned.perturbations[1].vector is -1, outside 0.."),
    (("learned", "perturbations", 1, "perplexity"), float("inf"), "learned.perturbations[1].perplexity is inf"),
    (("learned", "diversity"), "high", "learned.diversity is 'high', not a number"),
    (("clusters", 0, "id"), True, "clusters[0].id is True, not a whole number"),
    (("random_completions", 0, "text"), None, "random_completions[0].text is None, not text"),
])
def test_a_damaged_metrics_field_is_named(path, value, fragment, tmp_path):
    file = tmp_path / "metrics.json"
    file.write_text(json.dumps(_damaged(METRICS, path, value)))
    with pytest.raises(MelboError) as caught:
        Metrics.load(tmp_path)
    _one_line(caught, file, fragment, "run `melbo assess` again")


def test_divergence_round_trips_and_splits_by_kind(tmp_path):
    (tmp_path / "divergence.json").write_text(json.dumps(DIVERGENCE))
    doc = load_divergence(tmp_path)
    assert [r.label for r in doc.learned()] == ["v0"] and doc.random()[0].kl is None and doc.unsteered[0].rank is None
    assert Divergence.from_dict(doc.to_dict()) == doc
    with pytest.raises(MelboError, match="holds no divergence.json"):
        load_divergence(tmp_path / "none")


@pytest.mark.parametrize("path, value, fragment", [
    (("rows", 0, "kind"), "other", "rows[0].kind is 'other', not one of learned, random, unsteered"),
    (("rows", 0, "kl"), -0.5, "rows[0].kl is -0.5, not in [0, inf]"),
    (("rows", 0, "rank"), 0, "rows[0].rank is 0, outside 1.."),
    (("rows", 1, "vector"), 2**70, "rows[1].vector is 1180591620717411303424, outside"),
    (("unsteered",), {"a": 1}, "unsteered is dict, not a list"),
])
def test_a_damaged_divergence_field_is_named(path, value, fragment, tmp_path):
    file = tmp_path / "divergence.json"
    file.write_text(json.dumps(_damaged(DIVERGENCE, path, value)))
    with pytest.raises(MelboError) as caught:
        Divergence.load(tmp_path)
    _one_line(caught, file, fragment, "run `melbo diff` again")


def test_sweep_reads_what_decide_writes(tmp_path):
    points = [dict(POINT), {**POINT, "radius": 4.0, "radius_relative": 0.4, "diversity": 0.6,
                            "median_perplexity": 99.0}]
    written = decide(points, [5.0], relative=True)
    (tmp_path / "sweep.json").write_text(json.dumps(written))
    sweep = SweepResult.load(tmp_path)
    assert sweep.chosen.radius == 2.0 and [p.fluent for p in sweep.points] == [True, False]
    assert [p.at(sweep.chosen) for p in sweep.points] == [True, False] and sweep.fluency_floor == 20.0
    assert sweep.to_dict() == written


@pytest.mark.parametrize("doc, fragment", [
    ({"points": [{**POINT, "source": "2"}]}, "points[0].source is '2', not a whole number"),
    ({"points": [{**POINT, "radius": 0}]}, "points[0].radius is 0, not > 0"),
    ({"points": [], "chosen": {"radius": 1.0}}, "chosen.radius_relative is missing"),
    ({"points": [], "fluency_floor": -1}, "fluency_floor is -1, not in [0, inf]"),
])
def test_a_damaged_sweep_field_is_named(doc, fragment, tmp_path):
    file = tmp_path / "sweep.json"
    file.write_text(json.dumps({"relative": True, **doc}))
    with pytest.raises(MelboError) as caught:
        SweepResult.load(tmp_path)
    _one_line(caught, file, fragment, "run the sweep again")
    with pytest.raises(MelboError, match="holds no sweep.json"):
        SweepResult.load(tmp_path / "elsewhere")


def test_bench_round_trips(tmp_path):
    (tmp_path / "bench.json").write_text(json.dumps(BENCH))
    result = BenchResult.load(tmp_path)
    assert result.to_json() == BENCH and result.rates() == {}


@pytest.mark.parametrize("path, value, fragment", [
    (("tables", 0, "rows", 0), ["learned"], "tables[0].rows[0] is not a list of 2 cells"),
    (("tables", 0, "rows", 0, 1), {"x": 1}, "tables[0].rows[0] holds dict, not a cell"),
    (("tables", 0, "columns"), "arm", "tables[0].columns is str, not a list"),
    (("bench",), 5, "bench is 5, not text"),
    (("wall_seconds",), -3, "wall_seconds is -3"),
])
def test_a_damaged_bench_field_is_named(path, value, fragment, tmp_path):
    file = tmp_path / "bench.json"
    file.write_text(json.dumps(_damaged(BENCH, path, value)))
    with pytest.raises(MelboError) as caught:
        BenchResult.load(tmp_path)
    _one_line(caught, file, fragment, "re-run the benchmark")


# ------------------------------------------------------------------------------------------------ tensors read back
def _unfinished_run(tmp_path):
    import torch  # noqa: F401  (the store's tensors)

    from melbo.io.runconfig import RunConfig
    from melbo.engine.store import Run

    config = RunConfig.from_dict({"model": {"id": "m", "spec": "m", "width": 4, "depth": 4}, "source": 1,
                                  "target": 3, "settings": {"prompts": ["hi"], "n_vectors": 4}})
    return Run.create(tmp_path / "run", config)


@pytest.mark.parametrize("tensors, batches, fragment", [
    ({"vectors": [[float("nan")] * 4]}, 1, "NaN or infinite vectors"),
    ({"vectors": [[1.0] * 5]}, 1, "vectors of shape (1, 5), not [N, 4]"),
    ({"vectors": [[1, 2, 3, 4]]}, 1, "vectors of int64 numbers, not floats"),
    ({"vectors": [[1.0] * 4]}, 9, "batches_done 9 of 4 perturbations"),
])
def test_a_damaged_checkpoint_is_refused_before_training_resumes_from_it(tensors, batches, fragment, tmp_path):
    import torch

    run = _unfinished_run(tmp_path)
    run.save_checkpoint({k: torch.tensor(v) for k, v in tensors.items()}, batches)
    with pytest.raises(MelboError) as caught:
        run.load_checkpoint()
    _one_line(caught, run.path / "checkpoint.safetensors", fragment, "delete it to restart this run")


def test_a_sound_checkpoint_loads(tmp_path):
    import torch

    run = _unfinished_run(tmp_path)
    run.save_checkpoint({"vectors": torch.ones(2, 4), "curves": torch.full((2, 3), float("nan"))}, 2)
    tensors, done = run.load_checkpoint()
    assert done == 2 and tensors["vectors"].shape == (2, 4)  # a NaN objective curve is no reason to refuse


def test_earlier_vectors_a_resume_stays_orthogonal_to_are_checked(tmp_path):
    from types import SimpleNamespace

    import torch

    from melbo.io.files import save_tensors
    from melbo.engine.runner import _previous

    file = tmp_path / "previous.safetensors"
    save_tensors(file, {"vectors": torch.ones(2, 5)})
    with pytest.raises(MelboError, match=r"vectors of shape \(2, 5\), not \[N, 4\]"):
        _previous(file, SimpleNamespace(width=4))
    save_tensors(file, {"other": torch.ones(2, 4)})
    with pytest.raises(MelboError, match="holds no vectors"):
        _previous(file, SimpleNamespace(width=4))
    save_tensors(file, {"vectors": torch.ones(2, 4)})
    assert _previous(file, SimpleNamespace(width=4)).shape == (2, 4)


@pytest.mark.parametrize("row, fragment", [
    ('{"vector": "1", "label": "v1", "prompt_index": 0, "text": "x"}', "line 2 is malformed (vector is '1'"),
    ('{"vector": 1, "label": "v1", "prompt_index": -1, "text": "x"}', "(prompt_index is -1, outside 0.."),
    ('{"vector": 1, "label": "v1", "prompt_index": 0}', "(text is missing)"),
    ('[1, 2]', "(the file is list, not an object)"),
])
def test_a_damaged_completion_row_is_named_with_its_line(row, fragment, tmp_path):
    run = _unfinished_run(tmp_path)
    good = '{"vector": null, "label": "unsteered", "prompt_index": 0, "prompt": "hi", "sample": 0, "text": "a", ' \
           '"tokens": 1}'
    (run.path / "completions.jsonl").write_text(f"{good}\n{row}\n")
    with pytest.raises(MelboError) as caught:
        run.completions()
    _one_line(caught, run.path / "completions.jsonl", fragment, "delete it and it will be generated again")
    (run.path / "completions.jsonl").write_text(f"{good}\n\n")
    assert run.completions() == [json.loads(good)]


CHECKS = {"checker": "arithmetic-cot", "consistent_share": 0.5,
          "summary": [{"pattern": "wrong", "learned": {"consistent": 1, "of": 2, "rate": 0.5, "low": 0.1, "high": 0.9},
                       "random": {"consistent": 0, "of": 0, "rate": None, "low": None, "high": None}}],
          "perturbations": [{"kind": "learned", "label": "v0", "completions": 2, "checked": 2, "correct": 1,
                             "patterns": {"wrong": 1}, "consistent": ["wrong"], "examples": {"wrong": "2 + 2 = 5"}}]}


@pytest.mark.parametrize("path, value, fragment", [
    (("summary", 0, "learned", "consistent"), 3, "summary[0].learned.consistent is 3, outside 0..2"),
    (("summary", 0, "learned", "rate"), 1.5, "summary[0].learned.rate is 1.5, not in [0, 1]"),
    (("perturbations", 0, "patterns", "wrong"), "1", "perturbations[0].patterns.wrong is '1', not a whole number"),
    (("perturbations", 0, "examples", "wrong"), 5, "perturbations[0].examples.wrong is 5, not text"),
    (("perturbations",), None, "perturbations is missing"),
])
def test_checks_round_trip_and_a_damaged_field_is_named(path, value, fragment, tmp_path):
    from melbo.judging.checkers import load_checks

    (tmp_path / "checks.json").write_text(json.dumps(CHECKS))
    assert load_checks(tmp_path).to_dict() == CHECKS and load_checks(tmp_path / "none") is None
    damaged = _damaged(CHECKS, path, value)
    if value is None:
        del damaged[path[-1]]
    (tmp_path / "checks.json").write_text(json.dumps(damaged))
    with pytest.raises(MelboError) as caught:
        load_checks(tmp_path)
    _one_line(caught, tmp_path / "checks.json", fragment, "run the checker again")
