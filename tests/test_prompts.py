"""melbo.engine.prompts: system prompts reach the model, or fail in one line when the model cannot take one."""

import pytest

from conftest import tiny_lm
from melbo.errors import MelboError
from melbo.engine.prompts import check_system_role, encode, format_prompt

USER_ONLY = "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}\n{% endif %}{% endfor %}"
REJECTS = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
           "{% endif %}{{ m['content'] }}\n{% endfor %}")


def test_a_system_prompt_opens_every_prompt_of_the_batch():
    lm = tiny_lm()
    plain = encode(lm, ["hi", "there"])
    steered = encode(lm, ["hi", "there"], system="You are a pirate.")
    assert [t.split("\n")[0] for t in steered.texts] == ["You are a pirate."] * 2
    assert [t.endswith(p) for t, p in zip(steered.texts, plain.texts)] == [True, True]
    assert steered.input_ids.shape[1] > plain.input_ids.shape[1]
    assert format_prompt(lm, "hi", system="Be brief.") == steered.texts[0].replace("You are a pirate.", "Be brief.")


@pytest.mark.parametrize("template", [USER_ONLY, REJECTS], ids=["drops-it", "rejects-it"])
def test_a_template_without_a_system_role_is_one_line(template):
    lm = tiny_lm()
    lm.tokenizer.chat_template = template
    with pytest.raises(MelboError, match="chat template has no system role: drop --system-prompt"):
        encode(lm, ["hi"], system="You are a pirate.")
    assert encode(lm, ["hi"]).texts == ["hi\n"]  # without one, the template still works


def test_raw_text_has_no_place_for_a_system_prompt():
    lm = tiny_lm()
    with pytest.raises(MelboError, match="raw text: drop --system-prompt"):
        encode(lm, ["hi"], chat=False, system="You are a pirate.")
    with pytest.raises(MelboError, match="raw text"):
        format_prompt(lm, "hi", chat=False, system="You are a pirate.")
    check_system_role(lm)  # the tiny template renders every role


def test_generation_reads_the_system_prompt_and_refuses_one_the_template_drops(monkeypatch):
    from melbo.engine import generation

    lm = tiny_lm()
    read = []
    real = generation.prompt_tokens
    monkeypatch.setattr(generation, "prompt_tokens", lambda *a: read.append(real(*a)) or read[-1])
    sampling = generation.Sampling(max_new_tokens=3)
    generation.generate(lm, None, ["hi"], sampling=sampling, system="You are a pirate.")
    assert lm.tokenizer.decode(read[-1]) == "You are a pirate.\nhi\n"  # what the model was given
    lm.tokenizer.chat_template = USER_ONLY
    with pytest.raises(MelboError, match="no system role"):
        generation.generate(lm, None, ["hi"], sampling=sampling, system="You are a pirate.")
