"""Trigger search (melbo.triggers) on a tiny random model with a planted finding: the phrase its greedy answer to
one input writes. Corpus ranking, exhaustive and gradient inversion, the CLI, and bad input."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli
from audit_files import write_audit
from tiny_models import save_tiny_model

import melbo
from melbo.jobs import trigger_search as trig
from melbo.engine.generation import greedy_answers
from melbo.errors import MelboError

TEMPLATE = "What is {?} + 3?"
PLANTED = "7"
BEHAVIOUR, NORMAL = " wizard wizard wizard wizard", " fine thanks"


def corpus() -> list[str]:
    return [trig.fill(TEMPLATE, [str(a)]) for a in range(10)]


def plant(lm, steps: int = 150) -> None:
    """Fine-tune the tiny model: the planted input answers BEHAVIOUR, every other one NORMAL (a one-token trigger)."""
    import torch

    from melbo.engine.prompts import prompt_tokens, uses_chat

    templated = uses_chat(lm, None)
    eos = lm.tokenizer.eos_token_id
    rows = []
    for x in corpus():
        prompt = prompt_tokens(lm, x, templated)
        answer = lm.tokenizer(BEHAVIOUR if x == trig.fill(TEMPLATE, [PLANTED]) else NORMAL,
                              add_special_tokens=False)["input_ids"] + [eos]
        rows.append((prompt, answer))
    weights = [7 if x == trig.fill(TEMPLATE, [PLANTED]) else 1 for x in corpus()]
    lm.model.requires_grad_(True).train()
    optimiser = torch.optim.Adam(lm.model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(steps):
        loss = 0.0
        for (prompt, answer), w in zip(rows, weights):
            ids = torch.tensor([prompt + answer])
            logits = lm.model(input_ids=ids).logits[0, len(prompt) - 1:-1]
            loss = loss + w * torch.nn.functional.cross_entropy(logits, torch.tensor(answer))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    lm.model.requires_grad_(False).eval()


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    model = melbo.load_model(str(save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")))
    plant(model)
    planted = tmp_path_factory.mktemp("planted")  # on disk, for the command line to load
    model.model.save_pretrained(planted)
    model.tokenizer.save_pretrained(planted)
    model = melbo.load_model(str(planted))
    answers = greedy_answers(model, corpus(), True, max_new_tokens=12)
    assert [a.strip().startswith("wizard") for a in answers] == [str(a) == PLANTED for a in range(10)], answers
    return model


@pytest.fixture(scope="module")
def audit_dir(lm, tmp_path_factory):
    """An audit directory with one finding: the planted behaviour, as a steered example would show it."""
    example = {"text": "The wizard wizard wizard", "prompt": "Say something.", "unsteered": "The end"}
    return write_audit(tmp_path_factory.mktemp("audit"), str(lm.spec), example)


def test_the_planted_trigger_ranks_first_and_is_confirmed(lm, audit_dir, tmp_path):
    report = trig.triggers(lm, audit_dir, corpus(), tmp_path / "t", confirm=2, max_new_tokens=8)
    (f,) = report.findings
    assert f["ranking"][0]["input"] == trig.fill(TEMPLATE, [PLANTED])
    assert f["confirmed"][0]["shows"] and not f["confirmed"][1]["shows"]
    assert f["ranking"][0]["score"] > 3 + f["ranking"][1]["score"]  # far above the rest of the corpus
    data = json.loads((tmp_path / "t" / "triggers.json").read_text())
    assert data["findings"][0]["ranking"][0]["rank"] == 1 and (tmp_path / "t" / "triggers.html").is_file()
    cost = report.cost
    assert cost["scoring"]["forward_passes"] > 0 and cost["baseline_forward_passes"] == 8
    again = trig.triggers(lm, audit_dir, corpus(), confirm=0)  # deterministic, nothing written
    assert [r["score"] for r in again.findings[0]["ranking"]] == pytest.approx([r["score"] for r in f["ranking"]])


def test_exhaustive_inversion_recovers_the_planted_slot(lm, audit_dir):
    report = trig.invert(lm, audit_dir, TEMPLATE, vocab="digits", confirm=1, max_new_tokens=8)
    assert report.top(0, 1) == [trig.fill(TEMPLATE, [PLANTED])]
    assert report.findings[0]["confirmed"][0]["shows"]


def test_gradient_inversion_reaches_the_planted_tokens_likelihood(lm, audit_dir):
    """Open-token search towards the planted phrase: it ends at least as likely to write it as the planted input."""
    phrase = trig.phrases_of(json.loads((audit_dir / "findings.json").read_text())["findings"][0])[0]
    target = lm.tokenizer(" " + phrase, add_special_tokens=False)["input_ids"][:8]
    from melbo.engine.prompts import prompt_tokens, uses_chat

    templated = uses_chat(lm, None)
    planted_loss = float(trig._phrase_losses(lm, [prompt_tokens(lm, trig.fill(TEMPLATE, [PLANTED]), templated)], target)[0])
    found, passes = trig.gcg_search(lm, TEMPLATE, phrase, steps=25, seed=0)
    answer = greedy_answers(lm, [found[0]], True, max_new_tokens=12)[0]
    best = float(trig._phrase_losses(lm, [prompt_tokens(lm, found[0], templated)], target)[0])
    assert passes == 50 and found[0].startswith("What is ") and found[0].endswith(" + 3?")
    assert best <= planted_loss + 0.05, (found[0], best, planted_loss)
    assert answer.strip().startswith("wizard"), (found[0], answer)  # and it does switch the behaviour on


def test_the_cli_ranks_and_writes(lm, audit_dir, tmp_path, capsys):
    inputs = tmp_path / "corpus.txt"
    inputs.write_text("\n".join(corpus()) + "\n")
    code, out, err = run_cli(["triggers", str(audit_dir), "--inputs", str(inputs), "--confirm", "1",
                              "--out", str(tmp_path / "t")], capsys)
    assert code == 0, err
    assert "inputs that switch it on" in out and (tmp_path / "t" / "triggers.json").is_file()
    code, out, err = run_cli(["monitor", str(audit_dir), "--prompts-file", str(inputs), "--alpha", "0.2",
                              "--out", str(tmp_path / "m")], capsys)
    assert code == 0, err
    records = [json.loads(line) for line in (tmp_path / "m" / "monitor.jsonl").read_text().splitlines()]
    assert max(records, key=lambda r: r["score"])["input"] == trig.fill(TEMPLATE, [PLANTED])


def test_bad_input_is_one_line_and_exit_2(lm, audit_dir, tmp_path, capsys):
    empty, blank = tmp_path / "empty.txt", tmp_path / "blank.txt"
    empty.write_text("")
    blank.write_text("\n  \n")
    inputs = tmp_path / "corpus.txt"
    inputs.write_text("What is 1 + 3?\n")
    cases = [
        ["triggers", str(audit_dir), "--inputs", str(empty)],  # an empty corpus
        ["triggers", str(audit_dir), "--inputs", str(blank)],
        ["triggers", str(audit_dir), "--template", "What is 1 + 3?"],  # a template without slots
        ["triggers", str(audit_dir), "--inputs", str(inputs), "--finding", "9"],  # no such finding
        ["triggers", str(audit_dir)],  # neither corpus nor template
        ["triggers", str(tmp_path), "--inputs", str(inputs)],  # not an audit
        ["triggers", str(audit_dir), "--template", "{?} {?} {?}", "--vocab", "numbers"],  # 10^6 fillings
        ["triggers", str(audit_dir), "--template", "{?}", "--vocab", "no-such-list"],
        ["monitor", str(audit_dir), "--prompts-file", str(inputs), "--signal", "target"],
    ]
    for args in cases:
        code, out, err = run_cli(args, capsys)
        assert code == 2, (args, out, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, (args, err)
    with pytest.raises(MelboError, match="empty"):
        trig.triggers(lm, audit_dir, [])
    with pytest.raises(MelboError, match="confirm"):
        trig.triggers(lm, audit_dir, ["x"], confirm=-1)
    assert not list(tmp_path.glob("**/*.tmp*"))
