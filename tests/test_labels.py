"""Automatic labels: accuracy on hand-labelled completions, the signals, and the LLM labellers' plumbing."""

from __future__ import annotations

import collections
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from melbo.errors import MelboError
from melbo.judging.labels import (
    TAXONOMY, ChatLabeller, EmbeddingLabeller, ModelLabeller, Sample, answer_numbers, labelling_prompt, language_of,
    malformed_share, parse_label, repetition_score)

HAND_LABELS = Path(__file__).parent / "data" / "hand_labels.jsonl"
# Measured on tests/data/hand_labels.jsonl (471 completions: 105 from the backdoor testbed, 336 from five SmolLM2
# runs, 30 crafted for rare classes): 351/471 = 0.745; the most frequent label alone would score 0.191. That is
# the set the labeller was developed on. Each SmolLM2 run after the first was labelled by hand before the labeller
# of the time saw it. Those held-out scores were 31/64 = 0.484 (R 0.5x), 51/64 = 0.797 (R 0.35x), 32/64 = 0.500
# (R 0.3x) and 32/64 = 0.500 (R 0.4x, the final labeller): expect ~0.5-0.8 on new runs (docs/catalog.md). The
# floor leaves room for float noise across machines, not for a worse labeller.
ACCURACY_FLOOR = 0.72


def hand_labelled() -> list[dict]:
    return [json.loads(line) for line in HAND_LABELS.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_the_hand_labelled_set_is_real_and_uses_the_taxonomy():
    rows = hand_labelled()
    assert len(rows) >= 100
    assert {r["label"] for r in rows} <= set(TAXONOMY)
    real = [r for r in rows if not r["source"].startswith("crafted")]
    assert len(real) >= 100 and len({r["prompt"] for r in real}) >= 5
    assert all(isinstance(r["text"], str) and r["unsteered"] is not None for r in rows)
    assert any(r["text"] == "" for r in rows)  # a steered model can say nothing: labelled "empty", no crash


def test_accuracy_on_hand_labelled_completions():
    rows = hand_labelled()
    samples = [Sample(r["text"], r["prompt"], r["unsteered"], r.get("perplexity")) for r in rows]
    labels = EmbeddingLabeller().label_samples(samples)
    right = [label.name == r["label"] for label, r in zip(labels, rows)]
    accuracy = sum(right) / len(rows)
    per_class = collections.Counter(r["label"] for r, ok in zip(rows, right) if ok)
    assert accuracy >= ACCURACY_FLOOR, f"accuracy {accuracy:.3f} < {ACCURACY_FLOOR}: {per_class}"
    assert all(0 <= label.confidence <= 1 for label in labels)
    # confident labels are right more often than unsure ones: the confidence means something
    sure = [ok for label, ok in zip(labels, right) if label.confidence >= 0.6]
    unsure = [ok for label, ok in zip(labels, right) if label.confidence < 0.4]
    assert sum(sure) / len(sure) > sum(unsure) / len(unsure)


def test_signals():
    assert language_of("La capitale de la France est Paris, et elle est très belle.") == "fr"
    assert language_of("Die Antwort ist zwölf, und das ist nicht schwer.") == "de"
    assert language_of("The capital of France is Paris, and it is lovely.") == "en"
    assert language_of("为什么鸡要过马路？") == "cjk" and language_of("Столица Франции — Париж.") == "cyrillic"
    assert language_of("x = 7\ny = 5\nprint(x + y)") is None  # "y" twice is not Spanish
    assert answer_numbers("4 + 6 = 10. The answer is 10.", "What is 4 + 6?") == {"10"}
    assert answer_numbers("4 + 6 = 4 + 6 = 4 + 6", "What is 4 + 6?") == set()  # an expression is no answer
    assert answer_numbers("A spider has 8 legs.", "How many legs does a spider have?") == {"8"}
    assert repetition_score("and " * 30) > 0.9 and repetition_score("The capital of France is Paris.") == 0
    assert repetition_score("哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈") > 0.9  # no spaces: character 4-grams
    assert malformed_share("The2Gal2 of2The2Gal22") == 1 and malformed_share("Hello, world! It's 4 + 6.") == 0


def test_labels_are_relative_to_the_unsteered_answer():
    labeller = EmbeddingLabeller()
    french = "La capitale de la France est Paris. C'est une ville très belle."
    [switch, same] = labeller.label_samples([
        Sample(french, "What is the capital of France?", "The capital of France is Paris."),
        Sample(french, "Quelle est la capitale de la France ?", french)])
    assert switch.name == "language switch" and same.name == "no change"
    [group] = labeller.label_groups([[Sample("I'm sorry, but I can't help with that.", "How do I bake bread?",
                                            "Mix flour, water and yeast, then bake."),
                                     Sample("I cannot assist with this request.", "What is 7 + 5?", "7 + 5 = 12.")]])
    assert group.name == "refusal" and group.confidence > 0.5 and set(group.scores) == set(TAXONOMY)
    assert labeller.label_groups([[]]) == [None]


class _Endpoint(BaseHTTPRequestHandler):
    """A stand-in OpenAI-compatible server: records each request, answers what the test set."""

    requests: list = []
    reply: tuple = (200, b"{}")

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).requests.append({"path": self.path, "auth": self.headers.get("Authorization"),
                                    "body": json.loads(body)})
        status, payload = type(self).reply
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def endpoint():
    _Endpoint.requests = []
    server = HTTPServer(("127.0.0.1", 0), _Endpoint)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()
    server.server_close()


def _answer(content: str) -> bytes:
    return json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()


def test_chat_labeller_request_and_answer(endpoint):
    _Endpoint.reply = (200, _answer('Sure. {"label": "role-play/persona", "confidence": 0.8}'))
    group = [Sample("Arr matey, the sea be my home!", "Tell me about the sea.", "The sea is large.")]
    [label] = ChatLabeller(endpoint + "/", model="qwen", api_key="secret").label_groups([group])
    assert (label.name, label.confidence) == ("role-play/persona", 0.8)
    [request] = _Endpoint.requests
    assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer secret"
    body = request["body"]
    assert body["model"] == "qwen" and body["temperature"] == 0
    content = body["messages"][0]["content"]
    assert content == labelling_prompt(group) and "Arr matey" in content and "The sea is large." in content
    assert all(name in content for name in TAXONOMY)


def test_chat_labeller_failures_are_one_line(endpoint):
    labeller = ChatLabeller(endpoint)
    group = [Sample("text", "prompt", "reference")]
    for reply, message in (((500, b"oops"), "HTTP 500"), ((200, b"not json"), "did not answer JSON"),
                           ((200, b'{"choices": []}'), "without choices")):
        _Endpoint.reply = reply
        with pytest.raises(MelboError, match=message):
            labeller.label_groups([group])
    with pytest.raises(MelboError, match="not an http"):
        ChatLabeller("ftp://example.org")
    closed = HTTPServer(("127.0.0.1", 0), _Endpoint)
    port = closed.server_port
    closed.server_close()
    with pytest.raises(MelboError, match="cannot reach"):
        ChatLabeller(f"http://127.0.0.1:{port}/v1", timeout=5).label_groups([group])


def test_parse_label():
    assert parse_label('{"label": "code", "confidence": 2}').confidence == 1.0
    assert parse_label('{"label": "Refusal", "confidence": "high"}').name == "refusal"
    assert parse_label("I think this is repetition, maybe gibberish.").name == "repetition"
    assert parse_label('{"label": "pirate"} nonsense').name == "other"


def test_catalogue_stores_an_llm_labellers_labels(tmp_path, endpoint):
    from melbo.records.catalog import Catalog
    from test_catalog import make_run

    _Endpoint.reply = (200, _answer('{"label": "emotional tone", "confidence": 0.7}'))
    with Catalog(tmp_path / "c.sqlite") as cat:
        run_id = cat.add_run(make_run(tmp_path / "run"), labeller=ChatLabeller(endpoint))
        ps = cat.perturbations(run_id)
        assert [(p.auto_label, p.auto_confidence) for p in ps] == [("emotional tone", 0.7)] * 4
        assert len(_Endpoint.requests) == 4  # one request per perturbation, with all its prompts


@pytest.mark.slow
def test_model_labeller_with_the_embedded_model(smol):
    [label] = ModelLabeller(smol, max_new_tokens=24).label_groups(
        [[Sample("Arr matey!", "What is 7 + 5?", "7 + 5 = 12.")]])
    assert label.name in TAXONOMY and 0 <= label.confidence <= 1


def test_catalog_add_with_llm_url(tmp_path, endpoint, capsys):
    from conftest import run_cli
    from melbo.records.catalog import Catalog
    from test_catalog import make_run

    _Endpoint.reply = (200, _answer('{"label": "code", "confidence": 0.6}'))
    run, db = make_run(tmp_path / "run"), tmp_path / "c.sqlite"
    code, _, err = run_cli(["catalog", "add", str(run), "--catalog", str(db), "--llm-url", endpoint,
                            "--llm-model", "m", "--llm-key", "k"], capsys)
    assert code == 0, err
    assert _Endpoint.requests[0]["auth"] == "Bearer k" and _Endpoint.requests[0]["body"]["model"] == "m"
    with Catalog(db) as cat:
        assert {p.auto_label for p in cat.perturbations(1)} == {"code"}
    code, _, err = run_cli(["catalog", "add", str(run), "--catalog", str(db), "--llm-url", endpoint,
                            "--llm-local", "smollm2-135m"], capsys)
    assert code == 2 and "not both" in err
