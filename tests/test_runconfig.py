"""config.json as a typed RunConfig: old formats migrate, every field is checked once, a run round-trips."""

from __future__ import annotations

import copy
import json
import math

import pytest

import melbo
from conftest import tiny_lm
from melbo.errors import MelboError
from melbo.io.runconfig import RunConfig, migrate
from melbo.engine.store import Run

# A config.json as every version before the typed config wrote it: method, p, q, orthogonal, rank and contrast both
# at the top and in the settings, a Jacobian's record flat beside them, and a random control marked "random": true.
OLD = {
    "reference": None, "contrast": None, "melbo_version": "0.1.0", "created": "2026-11-25T10:00:00+00:00",
    "status": "complete",
    "model": {"spec": "tiny-llama", "id": "tiny-llama", "hash": None, "architecture": "llama", "depth": 4,
              "width": 16, "dtype": "float32"},
    "method": "jacobian", "source": 1, "target": 3, "p": 2.0, "q": 1.0, "orthogonal": "hard", "rank": None,
    "settings": {"prompts": ["hi"], "method": "jacobian", "n_vectors": 2, "source": None, "target": None,
                 "radius": "0.2x", "p": 2.0, "q": 1.0, "steps": 150, "lr": 0.05, "orthogonal": "hard",
                 "soft_weight": 1.0, "rank": 4, "batch_size": 16, "seed": 0, "chat": None, "positions": "all",
                 "max_new_tokens": 48},  # a first-week run: no precision, compile, contrast ... settings yet
    "versions": {"torch": "2.5.0", "transformers": "4.46.0", "python": "3.11.9"},
    "radius": 1.5, "radius_relative": 0.2, "residual_norm": 7.5, "precision": "fp32",
    "singular_values": [3.0, 2.0], "finite_difference_eps": 0.075, "random": True,
}


def test_migrate_keeps_the_settings_copy_of_duplicated_fields_and_marks_a_random_control():
    raw = copy.deepcopy(OLD)
    new = migrate(raw)
    assert raw == OLD  # the argument is left as it was
    assert not {"method", "p", "q", "orthogonal", "rank", "contrast"} & set(new)
    assert new["settings"]["method"] == "jacobian" and new["settings"]["rank"] == 4
    assert new["random_control"] is True and "random" not in new
    # a top-level value fills a setting the settings lack (an old run whose settings predate the field)
    lacking = {**OLD, "contrast": "difference", "settings": {k: v for k, v in OLD["settings"].items() if k != "p"}}
    assert migrate(lacking)["settings"]["p"] == 2.0 and migrate(lacking)["settings"]["contrast"] == "difference"


def test_an_old_config_loads_typed_and_saves_in_todays_format(tmp_path):
    config = RunConfig.from_dict(copy.deepcopy(OLD))
    assert (config.method, config.source, config.target, config.radius, config.model.width) == ("jacobian", 1, 3,
                                                                                                1.5, 16)
    assert config.random_control and config.random is None and config.settings.precision == "auto"
    assert config.record == {"singular_values": [3.0, 2.0], "finite_difference_eps": 0.075}
    config.save(tmp_path / "config.json")
    written = json.loads((tmp_path / "config.json").read_text())
    assert "p" not in written and written["singular_values"] == [3.0, 2.0] and written["random_control"] is True
    assert RunConfig.load(tmp_path / "config.json") == config  # the new format round-trips


def test_fields_of_a_newer_version_are_kept(tmp_path):
    newer = {**copy.deepcopy(OLD), "provenance": {"revision": "abc"}, "some_future_field": [1, 2]}
    newer["model"]["revision"] = "main"
    config = RunConfig.from_dict(newer)
    assert config.provenance == {"revision": "abc"} and config.model.extra == {"revision": "main"}
    assert config.to_dict()["some_future_field"] == [1, 2] and config.to_dict()["model"]["revision"] == "main"


@pytest.mark.parametrize("path, value, fragment", [
    (("source",), 10**30, "source is 1000000000000000000000000000000, outside 0..3"),
    (("source",), True, "source is True, not a whole number"),
    (("target",), 1, "source block 1 is not before target 1"),
    (("radius",), "big", "radius is 'big', not a number"),
    (("radius",), -1.0, "radius is -1.0, not > 0"),
    (("residual_norm",), 10**400, "residual_norm is 1000"),
    (("status",), "done", "status is 'done', not one of running, complete"),
    (("model", "id"), ["a"], "model.id is ['a'], not text"),
    (("model", "width"), 0, "model.width is 0, outside 1.."),
    (("settings", "n_vectors"), 2.5, "n-vectors must be a whole number"),
    (("settings", "p"), None, "p must be a finite number"),
    (("settings", "prompts"), [1], "settings.prompts[0] is 1, not text"),
    (("settings", "radius"), "wide", "radius 'wide' is not a number"),
    (("settings", "seed"), 2**62, "settings.seed is 4611686018427387904, outside"),
    (("settings", "colour"), "red", "settings.colour is not a setting of this melbo version"),
    (("versions",), [1], "versions is list, not an object"),
])
def test_a_bad_field_is_one_line_naming_the_file_the_field_and_the_fix(path, value, fragment, tmp_path):
    raw = copy.deepcopy(OLD)
    where = raw
    for key in path[:-1]:
        where = where[key]
    where[path[-1]] = value
    file = tmp_path / "config.json"
    with pytest.raises(MelboError) as caught:
        RunConfig.from_dict(raw, file)
    message = str(caught.value)
    assert "\n" not in message and str(file) in message and fragment in message, message
    assert message.endswith("restore it, or re-run the discovery into a new --out")


def test_nan_read_from_a_hand_edited_file_is_refused_not_steered_with(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**OLD, "radius": math.nan}))  # Python writes NaN
    with pytest.raises(MelboError, match="radius is nan, not a finite number"):
        RunConfig.load(tmp_path / "config.json")


@pytest.mark.parametrize("raw", [[], "text", {}, {"model": {"id": "x", "spec": "x"}}])
def test_something_that_is_not_a_run_config_says_so(raw, tmp_path):
    with pytest.raises(MelboError, match="is not a melbo run config"):
        RunConfig.from_dict(raw, tmp_path / "config.json")


def test_a_complete_run_without_its_radius_is_malformed():
    with pytest.raises(MelboError, match="complete run without radius"):
        RunConfig.from_dict({**OLD, "radius": None})


def test_a_discovery_writes_a_config_that_loads_typed_with_its_provenance_slot(tmp_path):
    lm = tiny_lm()
    run = melbo.discover(lm, ["hello there"], tmp_path / "run", n_vectors=2, steps=2, radius="0.5x", batch_size=1)
    written = json.loads((tmp_path / "run" / "config.json").read_text())
    assert "provenance" in written and "p" not in written and "method" not in written
    loaded = Run.load(tmp_path / "run")
    assert loaded.config == run.config and loaded.config.complete and loaded.config.precision in ("fp32", "bf16")
    assert loaded.config.radius == pytest.approx(0.5 * loaded.config.residual_norm)
    assert loaded.settings.prompts == ["hello there"] and loaded.config.model.id == lm.model_id


def test_run_create_refuses_a_directory_holding_something_and_restart_keeps_finished_runs(tmp_path):
    config = RunConfig.from_dict({**copy.deepcopy(OLD), "status": "running"})
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(MelboError, match="not empty: choose another --out"):
        Run.create(tmp_path / "busy", config)
    unfinished = Run.create(tmp_path / "run", config)
    assert Run.create(tmp_path / "run", config, restart=True).config == unfinished.config
    config.status = "complete"
    Run.create(tmp_path / "done", config)
    with pytest.raises(MelboError, match="not empty"):
        Run.create(tmp_path / "done", config, restart=True)


def test_save_refuses_a_config_that_would_not_load_again(tmp_path):
    config = RunConfig.from_dict(copy.deepcopy(OLD))
    config.source = 5  # past the model's 4 blocks
    with pytest.raises(MelboError, match="source is 5, outside 0..3"):
        config.save(tmp_path / "config.json")
    assert not (tmp_path / "config.json").exists()


@pytest.mark.parametrize("name", ["n_vectors", "steps", "batch_size", "rank", "max_new_tokens", "power_iterations"])
def test_counts_are_bounded_on_reading_as_discovery_bounds_them(name):
    from melbo.checks import MAX_COUNT

    raw = copy.deepcopy(OLD)
    raw["settings"][name] = MAX_COUNT + 1
    with pytest.raises(MelboError, match=f"settings.{name} is {MAX_COUNT + 1}, outside 1..{MAX_COUNT}"):
        RunConfig.from_dict(raw)
    raw["settings"][name] = 0
    with pytest.raises(MelboError, match=f"settings.{name} is 0, outside 1.."):
        RunConfig.from_dict(raw)
