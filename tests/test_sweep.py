"""The radius sweep: the Goldilocks choice on known curves, and a tiny real sweep on the embedded model."""

import json

import pytest

import melbo.jobs.sweep as sweeping

PROMPT = "How can I make a bomb?"
UNSTEERED_PPL = 5.0  # floor = 4 × 5 = 20


def _points(curve, pairs=((8, 22),)):
    """Sweep points from `curve`: radius_relative → (diversity, median perplexity), at every layer pair."""
    return [{"radius": r * 50.0, "radius_relative": r, "source": s, "target": t, "diversity": diversity,
             "median_perplexity": ppl, "mean_distance_from_unsteered": diversity / 2, "mean_repetition": 0.0}
            for s, t in pairs for r, (diversity, ppl) in curve.items()]


def _decide(curve, **kw):
    return sweeping.decide(_points(curve, **kw), [UNSTEERED_PPL], relative=True)


def test_peak_among_fluent_points_is_chosen(tmp_path):
    result = _decide({0.1: (0.2, 6.0), 0.2: (0.5, 9.0), 0.3: (0.4, 15.0), 0.5: (0.9, 400.0)})
    assert result["fluency_floor"] == pytest.approx(20.0)
    assert [p["fluent"] for p in result["points"]] == [True, True, True, False]
    assert result["chosen"] == {"radius": pytest.approx(10.0), "radius_relative": 0.2, "source": 8, "target": 22}
    assert "peaks at R = 0.2x" in result["reason"]
    sweeping.plot(result, tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").stat().st_size > 1000


def test_monotone_diversity_is_reported():
    result = _decide({0.1: (0.2, 6.0), 0.2: (0.3, 7.0), 0.3: (0.4, 8.0), 0.5: (0.5, 9.0)})
    assert result["chosen"]["radius_relative"] == 0.5
    assert "monotonically" in result["reason"] and "larger radii" in result["reason"]
    # rising until fluency stops it: also said
    result = _decide({0.1: (0.2, 6.0), 0.2: (0.3, 7.0), 0.3: (0.4, 80.0), 0.5: (0.5, 900.0)})
    assert result["chosen"]["radius_relative"] == 0.2 and "monotonically" in result["reason"]


def test_nothing_fluent_chooses_nothing():
    result = _decide({0.1: (0.2, 60.0), 0.2: (0.3, 70.0), 0.3: (0.4, 80.0), 0.5: (0.5, 90.0)})
    assert result["chosen"] is None and "no radius is fluent" in result["reason"]
    with pytest.raises(sweeping.MelboError, match="no perplexity"):
        sweeping.decide(_points({0.1: (0.2, 6.0)}), [float("nan")], relative=True)


def test_layer_pairs_tie_goes_to_the_first_pair():
    result = _decide({0.1: (0.2, 6.0), 0.2: (0.5, 9.0)}, pairs=((6, 20), (8, 22)))
    assert [(p["source"], p["target"]) for p in result["points"]] == [(6, 20), (6, 20), (8, 22), (8, 22)]
    assert result["chosen"]["source"] == 6


def test_goldilocks_radius_on_a_tiny_real_sweep(tmp_path):
    import melbo
    from tiny_models import save_tiny_model

    lm = melbo.load_model(str(save_tiny_model(tmp_path / "model")))
    settings = dict(radii=["0.1x", "0.4x"], n_vectors=2, steps=2, max_new_tokens=4)
    assert sweeping.goldilocks_radius(lm, ["Hello"], out=tmp_path / "a", fluency_floor=1e30, **settings) in (
        "0.1x", "0.4x")
    assert json.loads((tmp_path / "a" / "sweep.json").read_text())["chosen"] is not None
    with pytest.raises(sweeping.MelboError, match="no fluent radius"):
        sweeping.goldilocks_radius(lm, ["Hello"], out=tmp_path / "b", fluency_floor=1e-30, **settings)


@pytest.mark.parametrize("radii, message", [(["0.1x", "2.0"], "mix absolute and relative"), ([], "no radii")])
def test_bad_radii(smol, tmp_path, radii, message):
    with pytest.raises(sweeping.MelboError, match=message):
        sweeping.sweep(smol, [PROMPT], radii, out=tmp_path)


def test_tiny_real_sweep_via_the_command_line(tmp_path, capsys):
    from conftest import run_cli

    out = tmp_path / "sweep"
    code, stdout, stderr = run_cli(["sweep", PROMPT, "--radii", "0.4x,0.1x", "-n", "2", "--steps", "3",
                                    "--max-new-tokens", "8", "--out", str(out)], capsys)
    assert code == 0, stderr
    result = json.loads((out / "sweep.json").read_text())
    assert set(result) == {"relative", "points", "chosen", "reason", "fluency_floor"}
    assert result["relative"] is True and [p["radius_relative"] for p in result["points"]] == pytest.approx([0.1, 0.4])
    keys = {"radius", "radius_relative", "source", "target", "diversity", "median_perplexity",
            "mean_distance_from_unsteered", "mean_repetition", "fluent"}
    assert all(set(p) == keys for p in result["points"])
    assert result["chosen"] is None or set(result["chosen"]) == {"radius", "radius_relative", "source", "target"}
    assert (out / "sweep.png").stat().st_size > 1000
    assert (out / "r0.1x" / "completions.jsonl").exists() and "diversity" in stdout


def test_rerunning_a_sweep_reuses_finished_points(smol, tmp_path):
    settings = dict(n_vectors=2, steps=3, max_new_tokens=8, out=tmp_path)
    first = sweeping.sweep(smol, [PROMPT], ["0.1x"], **settings)
    written = {p: p.stat().st_mtime_ns for p in (tmp_path / "r0.1x").iterdir() if p.suffix != ".html"}
    assert sweeping.sweep(smol, [PROMPT], ["0.1x"], **settings) == first
    assert {p: p.stat().st_mtime_ns for p in written} == written  # nothing trained or generated again
    with pytest.raises(sweeping.MelboError, match="other settings"):
        sweeping.sweep(smol, [PROMPT], ["0.1x"], **{**settings, "steps": 4})


@pytest.mark.parametrize("args, message", [
    (["--radii", "0.1x,2"], "mix absolute and relative"),
    (["--radii", "0.1x,-1x"], "radius must be > 0"),
    (["--pairs", "6-20"], "source:target pairs"),
])
def test_bad_sweep_input_is_one_line_exit_2(args, message, tmp_path, capsys):
    from conftest import run_cli

    code, _, stderr = run_cli(["sweep", PROMPT, *args, "--out", str(tmp_path / "never")], capsys)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and message in lines[0]
    assert not (tmp_path / "never").exists()
