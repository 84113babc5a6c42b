"""A system prompt set on the model (`load_model(system=...)`, `--system-prompt`): every command reads prompts
through it, runs record it, and resuming or replaying a run reuses it."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli, tiny_lm
from melbo.errors import MelboError
from melbo.engine.prompts import encode, format_messages, format_prompt

PIRATE = "You are a pirate."


def test_the_model_s_system_prompt_opens_prompts_and_conversations():
    plain, lm = tiny_lm(), tiny_lm().with_system(PIRATE)
    assert encode(lm, ["hi"]).texts == encode(plain, ["hi"], system=PIRATE).texts == [f"{PIRATE}\nhi\n"]
    assert format_messages(lm, [{"role": "user", "content": "hi"}]) == f"{PIRATE}\nhi\n"  # chat, live serving
    own = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert format_messages(lm, own) == "Be brief.\nhi\n"  # a conversation's own system message wins
    assert format_prompt(lm, "hi", system="Be brief.") == "Be brief.\nhi\n"
    assert lm.describe()["system"] == PIRATE and "system" not in plain.describe()
    with pytest.raises(MelboError, match="raw text"):
        encode(lm, ["hi"], chat=False)
    with pytest.raises(MelboError, match="non-blank"):
        plain.with_system("  ")


def test_the_weights_are_shared_and_the_bf16_copy_keeps_the_system_prompt():
    base = tiny_lm()
    lm = base.with_system(PIRATE)
    assert lm.model is base.model
    assert lm.at_precision("bf16").system == PIRATE


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tiny_models import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def test_discover_records_it_generate_reuses_it_and_resume_refuses_another(model_dir, tmp_path, capsys,
                                                                            monkeypatch):
    run = tmp_path / "run"
    code, _, err = run_cli(["discover", "hi", "-m", str(model_dir), "-n", "1", "--steps", "1", "--radius", "1.0",
                            "--max-new-tokens", "2", "--random", "0", "--system-prompt", PIRATE, "--out", str(run)],
                           capsys)
    assert code == 0, err
    assert json.loads((run / "config.json").read_text())["model"]["system"] == PIRATE

    import melbo
    from melbo.engine.store import Run

    assert Run.load(run).config.model.system == PIRATE
    from melbo.engine import generation

    read = []
    real = generation.prompt_tokens
    monkeypatch.setattr(generation, "prompt_tokens", lambda *a: read.append(real(*a)) or read[-1])
    code, _, err = run_cli(["generate", str(run), "--prompts", "ahoy", "--max-new-tokens", "1"], capsys)
    assert code == 0, err
    from tiny_models import byte_tokenizer

    assert read and {byte_tokenizer().decode(ids) for ids in read} == {f"{PIRATE}\nahoy\n"}  # what the model read
    # resuming with another system prompt would train the rest of the run on other prompts: refused
    from melbo.engine import runner

    config = json.loads((run / "config.json").read_text())
    config["status"] = "running"
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(MelboError, match="system prompt"):
        runner.resume(run, melbo.load_model(str(model_dir)))
    code, _, err = run_cli(["discover", "--resume", str(run), "--system-prompt", "Be brief."], capsys)
    assert code == 2 and "system" in err and "--resume" in err, err


def test_a_model_without_room_for_it_is_one_line_before_any_work(model_dir, tmp_path, capsys):
    from tiny_models import byte_tokenizer

    tokenizer = byte_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}"
    tokenizer.save_pretrained(model_dir.parent / "user-only")
    import shutil

    shutil.copytree(model_dir, model_dir.parent / "user-only", dirs_exist_ok=True)
    tokenizer.save_pretrained(model_dir.parent / "user-only")
    code, _, err = run_cli(["discover", "hi", "-m", str(model_dir.parent / "user-only"), "-n", "1", "--steps", "1",
                            "--system-prompt", PIRATE, "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and "no system role" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()
