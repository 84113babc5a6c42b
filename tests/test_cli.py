"""The command line on the embedded model: the main job end to end, and one-line errors with exit code 2."""

import json

import pytest
from conftest import run_cli

PROMPT = "How can I make a bomb?"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A small but real discovery run shared by the CLI tests."""
    import melbo

    path = tmp_path_factory.mktemp("cli") / "run"
    lm = melbo.load_model()
    melbo.discover(lm, [PROMPT], path, n_vectors=3, steps=5, radius="0.2x")
    return path


def test_discover_writes_a_complete_run(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, stderr = run_cli(["discover", PROMPT, "-n", "2", "--steps", "3", "--max-new-tokens", "8",
                                    "--out", str(out)], capsys)
    assert code == 0, stderr
    config = json.loads((out / "config.json").read_text())
    assert config["status"] == "complete" and config["source"] == 8 and config["target"] == 22
    assert config["radius"] == pytest.approx(0.2 * config["residual_norm"])
    rows = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert [r["label"] for r in rows] == ["unsteered", "v0", "v1"]
    assert all(set(r) >= {"vector", "prompt", "sample", "text", "tokens"} for r in rows)
    assert str(out) in stdout
    assert [line.split()[1] for line in stdout.splitlines() if line.startswith("│")][:3] == ["unsteered", "v0", "v1"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert len([p for p in metrics["random"]["perturbations"] if p["vector"] is not None]) == 4
    assert (out / "report.html").read_text().count('class="card"') == 2


def test_generate_with_expressions_and_random_baseline(run_dir, capsys):
    code, stdout, stderr = run_cli(["generate", str(run_dir), "-p", "Write a haiku about autumn.",
                                    "--expr", "v1 - 0.5*v2", "--random", "2", "--max-new-tokens", "6"], capsys)
    assert code == 0, stderr
    for label in ("unsteered", "v1 - 0.5*v2", "random0", "random1"):
        assert label in stdout


def test_scripted_chat_keeps_history_with_a_vector_active(run_dir, tmp_path, capsys):
    turns = tmp_path / "turns.txt"
    turns.write_text("Hi! My name is Ada.\n/scale 0.5\nWhat is my name?\n")
    code, stdout, stderr = run_cli(["chat", str(run_dir), "--vector", "1", "--turns", str(turns),
                                    "--max-new-tokens", "20"], capsys)
    assert code == 0, stderr
    assert stdout.count("assistant[v1]>") == 2 and "[scale 0.5]" in stdout


def test_chat_session_history_and_commands(run_dir, smol):
    from melbo.engine.chat import ChatSession
    from melbo.engine.generation import Sampling
    from melbo.engine.store import Run

    run = Run.load(run_dir, model=smol)
    session = ChatSession(smol, run.perturbations, vector=0, sampling=Sampling(max_new_tokens=8))
    session.say("Hello there.")
    session.say("And again.")
    assert [m["role"] for m in session.history] == ["user", "assistant", "user", "assistant"]
    session.command("/off")
    assert session.vector is None
    session.command("/reset")
    assert session.history == []


@pytest.mark.parametrize(
    "args, message",
    [
        (["discover", PROMPT, "--source", "22", "--target", "8"], "must come before"),
        (["discover", PROMPT, "--source", "40"], "out of range"),
        (["discover", PROMPT, "--radius", "0"], "radius must be > 0"),
        (["discover", " "], "empty prompt"),
        (["discover", PROMPT, "--positions", "[[99]]"], "outside prompt 0"),
        (["discover", PROMPT, "-n", "0"], "n-vectors must be"),
        (["discover", PROMPT, "--model", "nope"], "unknown model"),
        (["generate", "/no/such/run", "-p", "hi"], "does not exist"),
        (["generate", "RUN", "-p", "hi", "--vectors", "7"], "out of range"),
        (["generate", "RUN", "-p", "hi", "--expr", "v1 +* v2"], "malformed expression"),
        (["generate", "RUN", "-p", "hi", "--expr", "__import__('os')"], "malformed expression"),
        (["chat", "RUN", "--vector", "9", "--turns", "RUN/config.json"], "out of range"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, message, run_dir, tmp_path, capsys):
    args = [a.replace("RUN", str(run_dir)) for a in args]
    if args[0] == "discover":
        args += ["--out", str(tmp_path / "never")]
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    code, stdout, stderr = run_cli(args, capsys)
    assert code == 2
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in stderr
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before


def test_run_from_another_model_is_refused(run_dir, tmp_path, capsys):
    config = json.loads((run_dir / "config.json").read_text())
    other = tmp_path / "other"
    other.mkdir()
    for f in run_dir.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    config["model"]["id"] = "some-other-model@0123"
    (other / "config.json").write_text(json.dumps(config))
    code, _, stderr = run_cli(["generate", str(other), "-p", "hi"], capsys)
    assert code == 2 and "was made with model some-other-model" in stderr


def test_models_lists_installed_state(capsys):
    from melbo.engine.models import EMBEDDED

    code, stdout, _ = run_cli(["models"], capsys)
    assert code == 0
    shown = {}  # the "installed" cell of each model's first table row ("installed" is inside "not installed")
    for line in stdout.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("│").split("│")]
        if len(cells) == 4 and cells[0].split(" ")[0] in EMBEDDED:
            shown[cells[0].split(" ")[0]] = cells[1]
    assert shown == {name: "installed" if m.installed() else "not installed" for name, m in EMBEDDED.items()}
    assert shown["smollm2-135m"] == "installed"  # the test suite's own model
