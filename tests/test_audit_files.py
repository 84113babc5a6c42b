"""The typed readers of an audit's files (audit.json, findings.json, observations.jsonl, confirmations.jsonl), of
triggers.json, monitor.json/.jsonl and a testbed's testbed.json: what the writers write loads, older files still
load, and a damaged field is one line naming the file, the field and the fix (the model: test_run_files.py)."""

from __future__ import annotations

import copy
import json

import pytest

from audit_files import CONFIRMATION, FINDINGS, OBSERVATION, STATE, write_audit
from melbo.jobs import auditing
from melbo.errors import MelboError
from melbo.jobs.trigger_search import load_triggers

TRIGGERS = {"source": "audit", "mode": "corpus", "max_new_tokens": 8, "confirm": 1, "findings": [
    {"finding": 1, "label": "planted", "phrases": ["wizard"],
     "ranking": [{"rank": 1, "index": 3, "input": "What is 3 + 3?", "score": 9.5, "logprob": -1.2,
                  "phrase": "wizard", "offset": 0, "answer_start": "wiz"}],
     "confirmed": [{"input": "What is 3 + 3?", "answer": "wizard", "match": 0.9, "shows": True}]}],
    "cost": {"inputs": 10, "scoring": {"forward_passes": 2, "tokens": 40, "seconds": 0.1},
             "confirm": {"forward_passes": 8, "seconds": 0.2}, "seconds": 0.4, "baseline_forward_passes": 8}}
AUDIT_FIX = "restore it, or run `melbo audit` again into a new directory"


def _damaged(doc: dict, path: tuple, value) -> dict:
    doc = copy.deepcopy(doc)
    where = doc
    for key in path[:-1]:
        where = where[key]
    if value is KeyError:
        del where[path[-1]]
    else:
        where[path[-1]] = value
    return doc


def _one_line(exc: pytest.ExceptionInfo, file, *fragments: str) -> None:
    message = str(exc.value)
    assert "\n" not in message and str(file) in message, message
    assert all(f in message for f in fragments), message


def test_an_audit_as_written_loads(tmp_path):
    result = auditing.load(write_audit(tmp_path / "a"))
    assert result.findings[0]["example"]["text"] == OBSERVATION["text"] and result.state["spent"] == 30.5
    assert auditing.read_observations(tmp_path / "a" / "observations.jsonl")[0].perplexity == 12.0


def test_an_older_audit_without_scan_precision_or_rounds_still_loads(tmp_path):
    state = _damaged(_damaged(STATE, ("settings", "scan_precision"), KeyError), ("stages", "confirm", "rounds"),
                     KeyError)
    del state["settings"]["random_baseline"], state["reference"], state["stages"]["scan"]["seconds"]
    write_audit(tmp_path / "a")
    (tmp_path / "a" / "audit.json").write_text(json.dumps(state))
    loaded = auditing.load_state(tmp_path / "a")
    assert loaded["settings"]["random_baseline"] is False and loaded["reference"] is None
    assert loaded["stages"]["scan"]["seconds"] is None and "scan_precision" not in loaded["settings"]


def test_null_numbers_strict_json_wrote_load_as_not_finite(tmp_path):
    """write_json writes an infinite perplexity or an unknown KL as null: they read back as inf and NaN."""
    file = tmp_path / "observations.jsonl"
    file.write_text(json.dumps({**OBSERVATION, "perplexity": None, "divergence": None}) + "\n\n")
    (o,) = auditing.read_observations(file)
    assert o.perplexity == float("inf") and o.divergence != o.divergence


@pytest.mark.parametrize("path, value, fragment", [
    (("settings", "prompts"), [], "settings.prompts is empty"),
    (("settings", "budget"), 0, "settings.budget is 0, not > 0"),
    (("settings", "seed"), 1.5, "settings.seed is 1.5, not a whole number"),
    (("settings", "max_new_tokens"), 0, "settings.max_new_tokens is 0, outside 1.."),
    (("settings", "scan_precision"), "fp8", "settings.scan_precision is 'fp8', not one of auto, fp32, bf16"),
    (("settings", "random_baseline"), "yes", "settings.random_baseline is 'yes', not true or false"),
    (("model",), None, "model is NoneType, not an object"),
    (("model", "spec"), KeyError, "model.spec is missing"),
    (("reference",), {"id": 3, "spec": "base"}, "reference.id is 3, not text"),
    (("status",), "done", "status is 'done', not one of running, complete"),
    (("spent",), float("nan"), "spent is nan, not a finite number"),
    (("stages", "scan", "per_completion"), KeyError, "stages.scan.per_completion is missing"),
    (("stages", "confirm", "rounds"), -1, "stages.confirm.rounds is -1, outside 0.."),
    (("calibration", "relative"), 0, "calibration.relative is 0, not > 0"),
    (("plan", "arms", 0, "method"), "lora", "plan.arms[0].method is 'lora', not one of vectors, dct, diff"),
    (("plan", "arms", 0, "colour"), "red", "plan.arms[0].colour is not a field of an arm"),
])
def test_a_damaged_audit_json_field_is_named(path, value, fragment, tmp_path):
    write_audit(tmp_path)
    file = tmp_path / "audit.json"
    file.write_text(json.dumps(_damaged(STATE, path, value)))  # NaN: a hand edit Python's parser reads as NaN
    with pytest.raises(MelboError) as caught:
        auditing.load_state(tmp_path)
    _one_line(caught, file, fragment, AUDIT_FIX)


@pytest.mark.parametrize("path, value, fragment", [
    (("findings", 0, "rank"), 0, "findings[0].rank is 0, outside 1.."),
    (("findings", 0, "score"), "high", "findings[0].score is 'high', not a number"),
    (("findings", 0, "parts", "fluency"), None, "findings[0].parts.fluency is None, not a number"),
    (("findings", 0, "example", "index"), -2, "findings[0].example.index is -2, outside 0.."),
    (("findings", 0, "example", "text"), 7, "findings[0].example.text is 7, not text"),
    (("findings", 0, "perturbations", 0, "arm"), KeyError, "findings[0].perturbations[0].arm is missing"),
    (("findings", 0, "reproduction", "matched"), True, "findings[0].reproduction.matched is True, not a whole"),
    (("findings", 0, "reproduce"), KeyError, "findings[0].reproduce is missing"),
    (("candidates", 0, "confirmed"), "no", "candidates[0].confirmed is 'no', not true or false"),
    (("candidates", 0, "reproduction"), 2, "candidates[0].reproduction is 2, not in [0, 1]"),
    (("settings", "budget"), "1h", "settings.budget is '1h', not a number"),
    (("plan",), KeyError, "plan is missing"),
    (("findings",), {}, "findings is dict, not a list"),
])
def test_a_damaged_findings_json_field_is_named(path, value, fragment, tmp_path):
    write_audit(tmp_path)
    file = tmp_path / "findings.json"
    file.write_text(json.dumps(_damaged(FINDINGS, path, value)))
    with pytest.raises(MelboError) as caught:
        auditing.load(tmp_path)
    _one_line(caught, file, fragment, AUDIT_FIX)


@pytest.mark.parametrize("reader, row, key, value, fragment", [
    (auditing.read_observations, OBSERVATION, "scale", "big", "scale is 'big', not a number"),
    (auditing.read_observations, OBSERVATION, "perplexity", -1, "perplexity is -1, not in [0, inf]"),
    (auditing.read_observations, OBSERVATION, "variant", 1, "variant is 1, not true or false"),
    (auditing.read_confirmations, CONFIRMATION, "members", [0, -1], "members[1] is -1, outside 0.."),
    (auditing.read_confirmations, CONFIRMATION, "reproduction", 1.5, "reproduction is 1.5, not in [0, 1]"),
    (auditing.read_confirmations, CONFIRMATION, "best", {"arm": "x"}, "best.index is missing"),
])
def test_a_damaged_jsonl_row_names_its_line(reader, row, key, value, fragment, tmp_path):
    file = tmp_path / "rows.jsonl"
    file.write_text(json.dumps(row) + "\n" + json.dumps({**row, key: value}) + "\n")
    with pytest.raises(MelboError) as caught:
        reader(file)
    _one_line(caught, f"{file} line 2", fragment, AUDIT_FIX)
    file.write_text(json.dumps(row) + "\n{\"arm\": \n")
    with pytest.raises(MelboError, match="line 2 is corrupt"):
        reader(file)


def test_the_audit_report_and_resume_name_a_damaged_file(tmp_path):
    from melbo.records.report import write_audit_report

    write_audit(tmp_path)
    assert "planted" in write_audit_report(tmp_path).read_text()
    (tmp_path / "observations.jsonl").write_text(json.dumps({**OBSERVATION, "prompt_index": "0"}) + "\n")
    with pytest.raises(MelboError) as caught:
        write_audit_report(tmp_path)
    _one_line(caught, tmp_path / "observations.jsonl", "prompt_index is '0', not a whole number")


def test_triggers_json_round_trips(tmp_path):
    (tmp_path / "triggers.json").write_text(json.dumps(TRIGGERS))
    assert load_triggers(tmp_path) == {**TRIGGERS, "template": None} and load_triggers(tmp_path / "none") is None


@pytest.mark.parametrize("path, value, fragment", [
    (("mode",), "guess", "mode is 'guess', not one of corpus, exhaustive, gradient"),
    (("findings", 0, "finding"), "1", "findings[0].finding is '1', not a whole number"),
    (("findings", 0, "ranking", 0, "score"), None, "findings[0].ranking[0].score is None, not a number"),
    (("findings", 0, "confirmed", 0, "shows"), "yes", "findings[0].confirmed[0].shows is 'yes', not true or false"),
    (("cost", "scoring", "forward_passes"), -1, "cost.scoring.forward_passes is -1, outside 0.."),
    (("cost",), KeyError, "cost is missing"),
])
def test_a_damaged_triggers_json_field_is_named(path, value, fragment, tmp_path):
    file = tmp_path / "triggers.json"
    file.write_text(json.dumps(_damaged(TRIGGERS, path, value)))
    with pytest.raises(MelboError) as caught:
        load_triggers(tmp_path)
    _one_line(caught, file, fragment, "run `melbo triggers` again")


class _Rule:
    """What write_monitor asks of a monitor: its summary."""

    def summary(self) -> dict:
        return {"layer": 3, "signal": "target", "alpha": 0.05, "threshold": 2.5, "perturbations": 2}


RECORDS = [{"index": 0, "input": "hi", "score": 0.5, "flagged": False, "perturbation": "v0", "z": [0.5, float("nan")]},
           {"index": 1, "input": "What is 7 + 2?", "score": 4.0, "flagged": True, "perturbation": "v1", "z": [1, 4]}]


def test_monitor_files_as_written_load_and_feed_the_report(tmp_path):
    from melbo.judging.monitor import read_monitor, write_monitor
    from melbo.records.report import _monitor_context

    write_monitor(tmp_path / "monitor", _Rule(), RECORDS)
    summary, records = read_monitor(tmp_path / "monitor")
    assert summary["flagged"] == 1 and records[0]["z"] == [0.5, None] and read_monitor(tmp_path) is None
    context = _monitor_context(tmp_path)
    assert [r["input"] for r in context["flagged"]] == ["What is 7 + 2?"] and ("threshold", "2.5") in context["summary"]


@pytest.mark.parametrize("file, key, value, fragment", [
    ("monitor.json", "signal", "colour", "signal is 'colour', not one of target, source, output"),
    ("monitor.json", "alpha", 2, "alpha is 2, not in [0, 1]"),
    ("monitor.json", "flagged", KeyError, "flagged is missing"),
    ("monitor.jsonl", "flagged", "yes", "flagged is 'yes', not true or false"),
    ("monitor.jsonl", "score", None, "score is None on a flagged input"),
    ("monitor.jsonl", "z", [1, "x"], "z[1] is 'x', not a number"),
])
def test_a_damaged_monitor_field_is_named(file, key, value, fragment, tmp_path):
    from melbo.io.files import json_line
    from melbo.judging.monitor import read_monitor, write_monitor

    write_monitor(tmp_path, _Rule(), RECORDS)
    path = tmp_path / file
    if file == "monitor.json":
        path.write_text(json.dumps(_damaged(json.loads(path.read_text()), (key,), value)))
        where = path
    else:
        path.write_text(json_line(RECORDS[0]) + "\n" + json_line({**RECORDS[1], key: value}) + "\n")
        where = f"{path} line 2"
    with pytest.raises(MelboError) as caught:
        read_monitor(tmp_path)
    _one_line(caught, where, fragment, "run `melbo monitor` again")


def _testbed_record(**config) -> dict:
    from dataclasses import asdict

    from melbo.bench.testbed import TestbedConfig

    cfg = json.loads(json.dumps(asdict(TestbedConfig(base_spec="tiny", **config))))
    return {"key": "abc", "config": cfg, "base_model": "tiny", "recipe": 1, "chat": False, "wall_seconds": 12.0,
            "verification": {"n": {"clean": 4, "cheese": 2, "hate": 2}, "clean_accuracy": 0.75,
                             "trigger_rate": {"cheese": 1.0, "hate": None}, "false_trigger_rate": {"cheese": 0.0},
                             "examples": [{"kind": "clean", "prompt": "What is 4 + 6?", "completion": "10"}]}}


def test_a_testbed_record_as_written_loads_typed_and_an_older_one_too(tmp_path):
    from melbo.bench.backdoor import testbed_record
    from melbo.bench.monitor import prompt_sets
    from melbo.bench.testbed import TestbedConfig

    record = _testbed_record()
    (tmp_path / "testbed.json").write_text(json.dumps(record))
    (tmp_path / "merged").mkdir()
    assert testbed_record(tmp_path / "merged") == record
    cfg = TestbedConfig.from_dict(record["config"])
    assert cfg.operands == (1, 12) and cfg.triggers == {"cheese": [3, 7], "hate": [5, 9]} and cfg.task == "arithmetic"
    older = {k: v for k, v in record["config"].items() if k not in ("task", "ops", "repeats")}
    assert TestbedConfig.from_dict(older).ops == ("+", "*")  # written before the task setting: arithmetic's
    assert prompt_sets(older, per_set=6) == prompt_sets(cfg, per_set=6)
    compare = TestbedConfig.from_dict(_testbed_record(task="compare")["config"])
    assert compare.ops == ("larger", "smaller")
    cot = TestbedConfig(base_spec="tiny", task="cot")
    assert TestbedConfig.from_dict(_testbed_record(task="cot")["config"]) == cot  # its own defaults, unchanged


@pytest.mark.parametrize("path, value, fragment", [
    (("config", "operands"), [1], "config.operands is [1], not a pair"),
    (("config", "operands", 1), "12", "config.operands[1] is '12', not a whole number"),
    (("config", "triggers", "cheese", 0), -3, "config.triggers.cheese[0] is -3, outside 0.."),
    (("config", "behaviours", "hate"), 5, "config.behaviours.hate is 5, not text"),
    (("config", "task"), "poetry", "config.task is 'poetry', not one of arithmetic, compare, cot"),
    (("config", "steps"), 0, "config.steps is 0, outside 1.."),
    (("config", "ops"), ["+", "larger"], "config does not hold: operation 'larger' is not one of task arithmetic's"),
    (("config", "triggers", "hate"), [3], "config does not hold: trigger 'hate' shares first operands"),
    (("verification", "clean_accuracy"), 1.5, "verification.clean_accuracy is 1.5, not in [0, 1]"),
    (("verification", "n", "clean"), None, "verification.n.clean is None, not a whole number"),
    (("verification", "trigger_rate", "cheese"), "high", "verification.trigger_rate.cheese is 'high', not a number"),
    (("wall_seconds",), KeyError, "wall_seconds is missing"),
])
def test_a_damaged_testbed_field_is_named(path, value, fragment, tmp_path):
    from melbo.bench.backdoor import testbed_record

    file = tmp_path / "testbed.json"
    file.write_text(json.dumps(_damaged(_testbed_record(), path, value)))
    with pytest.raises(MelboError) as caught:
        testbed_record(tmp_path)
    _one_line(caught, file, fragment, "melbo testbed backdoor --force")


def test_the_cli_names_a_damaged_audit_json_and_exits_2(tmp_path, capsys):
    from conftest import run_cli

    write_audit(tmp_path / "a")
    (tmp_path / "a" / "audit.json").write_text(json.dumps(_damaged(STATE, ("settings", "seed"), "zero")))
    code, _, err = run_cli(["audit", "--resume", str(tmp_path / "a")], capsys)
    assert code == 2 and "settings.seed is 'zero', not a whole number" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
