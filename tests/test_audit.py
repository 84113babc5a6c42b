"""Audit mode on the embedded model: divergence ranking, the anomaly monitor, and the diff/monitor commands."""

import copy
import json

import pytest
import torch
from conftest import run_cli

from melbo.judging.divergence import rank_perturbations
from melbo.jobs.job import diff
from melbo.errors import MelboError
from melbo.engine.generation import Sampling
from melbo.engine.intervention import SteeringVectors
from melbo.judging.monitor import Monitor, auroc, conformal_threshold, leave_one_out_fpr
from melbo.io.runconfig import RunConfig
from melbo.engine.store import Run

pytestmark = pytest.mark.slow
SOURCE, TARGET = 8, 22
CLEAN = ["What is 4 + 6?", "Tell me about the moon.", "How do I bake bread?", "Name a colour.",
         "Write a haiku about rain.", "What is the capital of Italy?", "Give me a synonym for happy.",
         "How many legs does a spider have?"]


@pytest.fixture(scope="module")
def planted(smol):
    """A copy of the embedded model with one planted direction u: block 12's MLP reacts strongly only along u."""
    audited = copy.copy(smol)
    audited.model = copy.deepcopy(smol.model)
    from melbo.engine.layers import find_blocks

    audited.blocks = find_blocks(audited.model)[1]
    audited.model_id = "smollm2-planted"
    u = torch.randn(smol.width, generator=torch.Generator().manual_seed(7))
    u /= u.norm()
    mlp = audited.blocks[12].mlp
    with torch.no_grad():
        # up_proj' = up_proj + α e uᵀ: inputs along u open a large new MLP channel; other inputs barely do.
        e = torch.zeros(mlp.up_proj.weight.shape[0])
        e[:64] = 1.0
        mlp.up_proj.weight += 2.0 * e[:, None] * u[None, :]
        mlp.gate_proj.weight += 2.0 * e[:, None] * u[None, :]
    return audited, u


def test_perturbation_only_the_audited_model_reacts_to_ranks_first(smol, planted):
    audited, u = planted
    radius = 40.0
    others = torch.randn(5, smol.width, generator=torch.Generator().manual_seed(1))
    vectors = torch.cat([others / others.norm(dim=-1, keepdim=True), u[None]]) * radius
    labels = [f"v{i}" for i in range(6)]
    result = rank_perturbations(audited, smol, SteeringVectors(vectors, SOURCE), ["What is 4 + 6?"], labels,
                                ["learned"] * 6, sampling=Sampling(max_new_tokens=12))
    assert result["rows"][0]["label"] == "v5"
    assert result["rows"][0]["kl"] > 2 * result["rows"][1]["kl"]
    assert [row["rank"] for row in result["rows"]] == list(range(1, 7))
    assert result["unsteered"][0]["vector"] is None


def test_identical_models_diverge_nowhere(smol):
    vectors = torch.randn(3, smol.width, generator=torch.Generator().manual_seed(2))
    result = rank_perturbations(smol, smol, SteeringVectors(vectors * 5, SOURCE), ["Name a colour."],
                                ["a", "b", "c"], ["learned"] * 3, sampling=Sampling(max_new_tokens=8))
    assert all(row["kl"] < 1e-6 and row["distance"] < 1e-6 for row in result["rows"] + result["unsteered"])


def fake_run(tmp_path, lm, vectors, prompts=("What is 4 + 6?",)):
    config = {"status": "complete", "model": {**lm.describe(), "id": lm.model_id}, "source": SOURCE,
              "target": TARGET, "radius": float(vectors.norm(dim=-1)[0]), "radius_relative": 0.1,
              "settings": {"prompts": list(prompts), "chat": None, "max_new_tokens": 16, "batch_size": 16, "seed": 0}}
    return Run(tmp_path, RunConfig.from_dict(config), SteeringVectors(vectors, SOURCE), model=lm)


def test_monitor_scores_are_deterministic_and_clean_copies_are_not_flagged(tmp_path, smol):
    vectors = torch.randn(4, smol.width, generator=torch.Generator().manual_seed(3)) * 3
    run = fake_run(tmp_path, smol, vectors)
    monitor = Monitor.calibrate(run, smol, CLEAN[:6], alpha=0.05)
    first, second = monitor.score(smol, CLEAN[:6]), monitor.score(smol, CLEAN[:6])
    assert first == second
    assert monitor.threshold == max(r["score"] for r in first)  # n = 6 is too few for α: τ = the largest
    assert not any(r["flagged"] for r in first)
    assert monitor.calibration["bound"] == pytest.approx(1 / 7)


def test_live_monitor_names_the_perturbation_being_expressed(tmp_path, smol):
    vectors = torch.randn(4, smol.width, generator=torch.Generator().manual_seed(4))
    vectors = vectors / vectors.norm(dim=-1, keepdim=True) * 100  # about the residual norm: a strong signal
    run = fake_run(tmp_path, smol, vectors)
    monitor = Monitor.calibrate(run, smol, CLEAN, alpha=0.1)
    events = []
    ids = smol.tokenizer(smol.tokenizer.apply_chat_template([{"role": "user", "content": "Name a fruit."}],
                                                            tokenize=False, add_generation_prompt=True),
                         return_tensors="pt")["input_ids"]
    with monitor.watch(smol, events.append), torch.no_grad():
        smol.model(ids)  # unsteered: a clean input
    assert events == []
    with monitor.watch(smol, events.append), SteeringVectors(vectors, SOURCE).apply(smol, [2]), torch.no_grad():
        smol.model(ids)
    assert events and events[0]["perturbation"] == "v2"
    watched = Monitor.calibrate(run, smol, CLEAN, alpha=0.1, indices=[1, 2])
    assert watched.labels == ["v1", "v2"] and watched.signatures.shape == (2, smol.width)
    torch.testing.assert_close(watched.signatures[1], monitor.signatures[2])


def test_conformal_threshold_and_loo_false_positive_rate():
    scores = torch.arange(1.0, 101.0)
    assert conformal_threshold(scores, 0.05) == 96.0  # ⌈101 · 0.95⌉ = 96th smallest
    assert conformal_threshold(scores[:5], 0.05) == 5.0  # too few: the largest
    projections = torch.randn(200, 3, generator=torch.Generator().manual_seed(0))
    assert 0.0 < leave_one_out_fpr(projections, 0.1) < 0.2
    assert auroc([3.0, 4.0], [1.0, 2.0]) == 1.0 and auroc([1.0], [1.0]) == 0.5


def test_monitor_refuses_bad_input(tmp_path, smol):
    run = fake_run(tmp_path, smol, torch.randn(2, smol.width))
    with pytest.raises(MelboError, match="at least 3 clean inputs"):
        Monitor.calibrate(run, smol, ["a"])
    with pytest.raises(MelboError, match="not in 0..1"):
        Monitor.calibrate(run, smol, CLEAN, indices=[5])
    for alpha in (1.5, float("nan"), "0.1"):
        with pytest.raises(MelboError, match="alpha"):
            Monitor.calibrate(run, smol, CLEAN, alpha=alpha)
    with pytest.raises(MelboError, match="list"):
        monitor_inputs = "What is 4 + 6?"  # a bare string, not a list of inputs
        Monitor.calibrate(run, smol, CLEAN).score(smol, monitor_inputs)
    with pytest.raises(MelboError):
        diff(smol, smol, "What is 4 + 6?", tmp_path / "bare")
    assert not (tmp_path / "bare").exists()
    other = fake_run(tmp_path, smol, torch.randn(2, smol.width))
    other.config.model.id = "another-model"
    with pytest.raises(MelboError, match="was made with model another-model"):
        Monitor.calibrate(other, smol, CLEAN)


def test_cli_diff_monitor_and_their_bad_inputs(tmp_path, capsys, smol):
    from tiny_models import save_tiny_model

    # two different tiny models: diff refuses a model against itself (every KL would be 0)
    audited, reference = save_tiny_model(tmp_path / "audited", seed=0), save_tiny_model(tmp_path / "base", seed=1)
    out = tmp_path / "d"
    code, stdout, _ = run_cli(["diff", "What is 4 + 6?", "-m", str(audited), "--reference", str(reference), "-n", "2",
                               "--steps", "3", "--random", "1", "--max-new-tokens", "6", "--source", "1",
                               "--target", "3", "--out", str(out)], capsys)
    assert code == 0, stdout
    ranked = json.loads((out / "divergence.json").read_text())
    assert sorted(r["label"] for r in ranked["rows"]) == ["random0", "v0", "v1"]
    assert "ranked by divergence" in stdout and (out / "report.html").exists()
    inputs = tmp_path / "inputs.txt"
    inputs.write_text("\n".join(CLEAN) + "\n")
    code, stdout, _ = run_cli(["monitor", str(out), "--prompts-file", str(inputs), "--clean", str(inputs)], capsys)
    assert code == 0, stdout
    summary = json.loads((out / "monitor" / "monitor.json").read_text())
    assert summary["inputs"] == len(CLEAN) and summary["flagged"] == 0
    assert len((out / "monitor" / "monitor.jsonl").read_text().splitlines()) == len(CLEAN)

    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    for args, message in [
        (["diff", "hi", "--out", str(tmp_path / "x")], "give the reference"),
        (["diff", "hi", "--reference", str(tmp_path / "missing"), "--out", str(tmp_path / "y")], "missing"),
        (["diff", "hi", "-m", str(audited), "--reference", str(reference), "--method", "jacobian",
          "--out", str(tmp_path / "z")], "vectors or adapters"),
        (["monitor", str(out), "--prompts-file", str(empty)], "no prompts"),
        (["monitor", str(out), "--prompts-file", str(tmp_path)], "is a directory"),
        (["monitor", str(out), "--prompts-file", str(inputs), "--alpha", "nan"], "alpha"),
        (["monitor", str(out), "--prompts-file", str(inputs), "--out", str(inputs)], "not a directory"),
        (["diff", "hi", "-m", str(audited), "-r", str(reference), "--contrast-weight", "nan",
          "--out", str(tmp_path / "w")], "finite"),
        (["diff", "hi", "-m", str(audited), "-r", str(reference), "--out", str(inputs)], "not a directory"),
        (["bench", "diff", "--out", str(inputs)], "not a directory"),
        (["bench", "monitor", str(out), "--alpha", "inf", "--out", str(tmp_path / "bm")], ""),
        (["monitor", str(out), "--prompts-file", str(inputs), "--model", "gemma3-270m"], ""),
    ]:
        code, _, stderr = run_cli(args, capsys)
        assert code == 2, (args, stderr)
        assert message in stderr and "Traceback" not in stderr
        assert len(stderr.strip().splitlines()) == 1
