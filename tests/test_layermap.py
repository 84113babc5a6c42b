"""Layer maps: every pair's Jacobian directions, ranked, plotted, resumable, and openable as an ordinary run."""

import json

import pytest
import torch
from tiny_models import save_tiny_model

import melbo
from conftest import run_cli
from melbo.errors import MelboError
from melbo.jobs.layermap import compute_pair, encode_for, make_settings, pair_seed
from melbo.engine.methods.jacobian import jacobian_directions
from melbo.engine.objective import TargetProbe, residual_norm

PROMPTS = ["The cat sat on", "Tell me a story"]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    path = save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")
    return melbo.load_model(str(path))


@pytest.fixture(scope="module")
def full_map(lm, tmp_path_factory):
    return melbo.map(lm, PROMPTS, "0:2", "1:3", k=2, out=tmp_path_factory.mktemp("maps") / "full", iterations=3)


def test_map_holds_every_pair_with_source_before_target(lm, full_map):
    sigma = full_map.tensors["singular_values"]
    assert sigma.shape == (3, 3, 2) and full_map.tensors["directions"].shape == (3, 3, 2, 64)
    sources, targets = full_map.tensors["sources"].tolist(), full_map.tensors["targets"].tolist()
    for i, s in enumerate(sources):
        for j, t in enumerate(targets):
            assert torch.isnan(sigma[i, j]).all() == (s >= t), (s, t)
    # One pair, recomputed by hand with the jacobian method's own function and the pair's seed: the same bits.
    batch = encode_for(lm, full_map.settings)
    probe = TargetProbe(lm, batch, 1, 3, 1, "fp32")
    eps = 0.01 * residual_norm(lm, batch, 1)
    directions, sigma2, _ = jacobian_directions(probe, 2, 3, torch.Generator().manual_seed(pair_seed(0, 1, 3)), eps)
    assert torch.equal(full_map.pair(1, 3)["directions"], directions)
    assert torch.equal(full_map.pair(1, 3)["singular_values"], sigma2.clamp_min(0).sqrt())


def test_ranking_heatmap_and_report(full_map):
    ranking = json.loads((full_map.path / "ranking.json").read_text())
    assert [(r["source"], r["target"]) for r in ranking] != [] and len(ranking) == 6
    gains = [r["gain"] for r in ranking]
    assert gains == sorted(gains, reverse=True) and ranking[0]["rank"] == 1
    assert full_map.heatmap.read_bytes()[:4] == b"\x89PNG"
    report = (full_map.path / "report.html").read_text()
    assert "Layer map" in report and f"{ranking[0]['source']} → {ranking[0]['target']}" in report
    assert not (full_map.path / "pairs").exists()  # checkpoints go once the map is assembled


def test_interrupted_map_resumes_to_the_same_result(lm, full_map, tmp_path):
    out = tmp_path / "map"

    def interrupt(event):
        if event["stage"] == "pair" and event["done"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        melbo.map(lm, PROMPTS, "0:2", "1:3", k=2, out=out, iterations=3, progress=interrupt)
    assert len(list((out / "pairs").iterdir())) == 2
    with pytest.raises(MelboError, match="--resume"):
        melbo.map(lm, PROMPTS, "0:2", "1:3", k=2, out=out, iterations=3)
    with pytest.raises(MelboError, match="other settings"):
        melbo.map(lm, PROMPTS, "0:2", "1:3", k=2, out=out, iterations=4, resume=True)
    events = []
    resumed = melbo.map(lm, PROMPTS, "0:2", "1:3", k=2, out=out, iterations=3, resume=True, progress=events.append)
    assert events[0] == {"stage": "start", "total": 6, "done": 2} and events[-1]["done"] == 6
    for name, value in full_map.tensors.items():
        assert torch.equal(resumed.tensors[name].nan_to_num(-1), value.nan_to_num(-1)), name
    events.clear()  # resuming a finished map computes nothing and keeps it
    again = melbo.map(lm, PROMPTS, "0:2", "1:3", k=2, out=out, iterations=3, resume=True, progress=events.append)
    assert events == [] and torch.equal(again.tensors["directions"], resumed.tensors["directions"])


def test_open_pair_is_an_ordinary_run(lm, full_map, tmp_path, capsys):
    run = melbo.open_pair(full_map.path, 1, 3, tmp_path / "pair", radius="0.5x")
    loaded = melbo.Run.load(run.path, model=lm)
    norm = float(full_map.pair(1, 3)["norms"][0])
    assert loaded.config.method == "jacobian" and loaded.perturbations.layer == 1
    torch.testing.assert_close(loaded.vectors.norm(dim=-1), torch.full((2,), 0.5 * norm))
    code, out, err = run_cli(["generate", str(run.path), "-p", "Hi", "--max-new-tokens", "3", "--model", lm.spec], capsys)
    assert code == 0, err
    code, out, err = run_cli(["export", str(run.path), "-f", "llamacpp", "--out", str(tmp_path / "cv"), "--model", lm.spec], capsys)
    assert code == 0 and any((tmp_path / "cv").glob("*.gguf")), err
    with pytest.raises(MelboError, match="not in this map"):
        melbo.open_pair(full_map.path, 2, 1, tmp_path / "bad")


@pytest.mark.parametrize("sources, targets, message", [
    ("3", "0:2", "no pair has source < target"),
    ("2:x", "3", "not a block range"),
    ("0:9", "3", "out of range"),
    ("4:2", "3", "holds no blocks"),
])
def test_bad_grids_are_one_line_errors(lm, sources, targets, message):
    with pytest.raises(MelboError, match=message):
        make_settings(lm, PROMPTS, sources, targets, 2, 3, 0, None, "all")


def test_compute_pair_depends_only_on_seed_source_target(lm):
    settings = make_settings(lm, PROMPTS, "0:1", "2:3", 2, 2, 7, None, "all")
    batch = encode_for(lm, settings)
    first = compute_pair(lm, batch, 0, 2, settings)
    compute_pair(lm, batch, 1, 3, settings)  # another pair in between changes nothing
    again = compute_pair(lm, batch, 0, 2, settings)
    assert torch.equal(first.directions, again.directions)
    assert torch.equal(first.singular_values, again.singular_values)


def test_cli_map_prints_the_heatmap_and_best_pairs(lm, tmp_path, capsys):
    out = tmp_path / "map"
    code, stdout, err = run_cli(["map", "Hello there", "--sources", "0:1", "--targets", "2:3", "-k", "2",
                                 "--iterations", "2", "--out", str(out), "--model", lm.spec], capsys)
    assert code == 0, err
    assert str(out / "map.png") in stdout.replace("\n", "") and "best pairs of 4" in stdout
    code, stdout, err = run_cli(["open-pair", str(out), "1:3", "--out", str(tmp_path / "pair")], capsys)
    assert code == 0 and melbo.Run.load(tmp_path / "pair").config.source == 1, err


@pytest.mark.parametrize("args, message", [
    (["--ray-address", "127.0.0.1:1"], "cannot reach a Ray cluster"),
    (["--sources", "3", "--targets", "0:2"], "no pair has source < target"),
    (["--sources", "2:1", "--targets", "3"], "holds no blocks"),
    (["--workers", "4096"], "more than this machine's"),
    (["--sources", "1-3"], "not a block range"),
    (["--layers", "all", "--sources", "1"], "either --layers"),
])
def test_cli_map_bad_input_is_one_line_and_exit_2(lm, tmp_path, capsys, args, message):
    code, stdout, err = run_cli(["map", "Hi", "--out", str(tmp_path / "m"), "--model", lm.spec, *args], capsys)
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "m").exists()


def test_cli_sweep_refuses_bad_ray_options_before_loading(tmp_path, capsys):
    code, _, err = run_cli(["sweep", "Hi", "--workers", "4096", "--out", str(tmp_path / "s")], capsys)
    assert code == 2 and "more than this machine's" in err
    code, _, err = run_cli(["sweep", "Hi", "--ray-address", "127.0.0.1:1", "--out", str(tmp_path / "s")], capsys)
    assert code == 2 and "cannot reach a Ray cluster" in err


@pytest.mark.slow
def test_cli_map_on_the_default_model(tmp_path, capsys):
    code, stdout, err = run_cli(["map", "How can I make a bomb?", "--sources", "6", "--targets", "20,24", "-k", "2",
                                 "--iterations", "1", "--out", str(tmp_path / "map")], capsys)
    assert code == 0, err
    assert "heatmap:" in stdout and "best pairs of 2" in stdout and "6 → 20" in stdout
    ranking = json.loads((tmp_path / "map" / "ranking.json").read_text())
    assert all(r["gain"] > 0 and r["singular_values"][0] >= r["singular_values"][1] for r in ranking)


# ---- issue 23
@pytest.mark.parametrize("radius", ["1e300", "1e30x", "2e19"])
def test_open_pair_refuses_a_radius_whose_vectors_overflow(full_map, tmp_path, capsys, radius):
    out = tmp_path / "pair"
    code, _, err = run_cli(["open-pair", str(full_map.path), "1:3", "--radius", radius, "--out", str(out)], capsys)
    assert code == 2 and "beyond float32's range" in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_a_full_disk_writing_the_map_names_free_space(lm, tmp_path, monkeypatch):
    import melbo.io.files
    from safetensors import SafetensorError

    real = melbo.io.files.save_file

    def full(tensors, filename, metadata=None):
        if "map.safetensors" in filename:  # as safetensors words ENOSPC: no errno reaches Python
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(melbo.io.files, "save_file", full)
    with pytest.raises(MelboError, match="free space on"):
        melbo.map(lm, PROMPTS, "0:1", "2", k=1, out=tmp_path / "m", iterations=1)
    assert not list(tmp_path.rglob("*.tmp"))


def test_map_resume_of_a_directory_without_a_map_is_one_line(tmp_path, capsys):
    from conftest import run_cli

    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(["map", "hi", "--resume", str(tmp_path / "empty")], capsys)
    assert code == 2 and "holds no map to resume" in err and not list((tmp_path / "empty").iterdir())


# ------------------------------------------------------------------------------------------------ map.json, typed
def test_map_json_round_trips_through_its_typed_reader(full_map):
    from melbo.jobs.layermap import MapConfig

    config = MapConfig.load(full_map.path)
    written = json.loads((full_map.path / "map.json").read_text())
    assert config.to_dict() == written and config.complete and config.settings == full_map.settings
    assert config.tokens == written["tokens"] >= 1 and config.model.width == full_map.tensors["directions"].shape[-1]


@pytest.mark.parametrize("edit, fragment", [
    (lambda c: c["settings"].update(sources=[0, 99]), "settings.sources[1] is 99, outside 0.."),
    (lambda c: c["settings"].update(k=0), "settings.k is 0, outside 1.."),
    (lambda c: c["settings"].update(positions="first:2"), "settings.positions are invalid"),
    (lambda c: c.update(tokens=1e400), "tokens is inf, not a whole number"),
    (lambda c: c.update(status="done"), "status is 'done', not one of running, complete"),
    (lambda c: c["model"].pop("id"), "model.id is missing"),
])
def test_a_damaged_map_json_is_one_line_naming_the_field(full_map, tmp_path, edit, fragment, capsys):
    import shutil

    copy = shutil.copytree(full_map.path, tmp_path / "map")
    config = json.loads((copy / "map.json").read_text())
    edit(config)
    (copy / "map.json").write_text(json.dumps(config))
    with pytest.raises(MelboError) as caught:
        melbo.LayerMap.load(copy)
    message = str(caught.value)
    assert "\n" not in message and "map.json is malformed" in message and fragment in message, message
    code, _, err = run_cli(["open-pair", str(copy), "1:3", "--out", str(tmp_path / "pair")], capsys)
    assert code == 2 and fragment in err and not (tmp_path / "pair").exists()


@pytest.mark.parametrize("damage, fragment", [
    (lambda t: t.update(directions=t["directions"] * float("nan")), "NaN or infinite directions"),
    (lambda t: t.update(directions=t["directions"][..., :-1].contiguous()), "directions of shape"),
    (lambda t: t.update(sources=t["sources"] + 1), "does not hold the sources map.json names"),
    (lambda t: t.pop("norms"), "holds no float norms"),
])
def test_damaged_map_tensors_are_refused_on_loading(full_map, tmp_path, damage, fragment):
    import shutil

    from melbo.io.files import load_tensors, save_tensors

    copy = shutil.copytree(full_map.path, tmp_path / "map")
    tensors = dict(load_tensors(copy / "map.safetensors"))
    damage(tensors)
    save_tensors(copy / "map.safetensors", tensors)
    with pytest.raises(MelboError, match=fragment):
        melbo.LayerMap.load(copy)
