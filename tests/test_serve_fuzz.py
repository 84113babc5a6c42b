"""A seeded fuzz of melbo serve's POST bodies: hostile values (401-digit numbers, Infinity, NaN, text where numbers
belong, nested lists, missing and unknown fields, broken JSON) for every POST route. None may give a 500; the API
answers JSON (an error object, or NDJSON events whose every line parses), the form routes a page or a redirect.

A few hundred requests on the tiny model: about 20 s on a busy 2-core machine."""

from __future__ import annotations

import json
import random

import pytest
from test_serve import LOCAL, _csrf, tiny  # noqa: F401  (tiny: the module's run, used as a fixture here)

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from melbo.server import create_app  # noqa: E402
from melbo.server.live import Engine  # noqa: E402

SEED = 23
CASES = 160  # per route kind; every case is logged with its body when it fails

HOSTILE = [10 ** 400, -10 ** 400, 2 ** 63, 2 ** 64 + 1, -1, 0, 1, 2, 7, 256, 257, 1.5, -0.0, 1e308, -1e308,
           float("inf"), float("-inf"), float("nan"), True, False, None, "", " ", "1", "0", "none", "abc", "nan",
           "-Infinity", "1e999", "9" * 500, "x" * 3000, "\u0000", "<script>", "💥", [], [0], [[0]], [[[[[1]]]]],
           {}, {"role": "user"}, {"a": [1, {"b": None}]}]
FIELDS = {"live": ["prompt", "perturbations", "scale", "max_new_tokens", "random"],
          "chat": ["messages", "perturbation", "scale", "max_new_tokens"]}
RAW = [b"", b"[", b"null", b"[]", b'"text"', b"42", b"{", b'{"prompt": }', b"\xff\xfe\x00", b"NaN",
       b"[" * 5000 + b"]" * 5000, b'{"prompt": ' + b"[" * 900 + b"]" * 900 + b"}",
       b'{"messages": [' + b'{"role": "user", "content": "x"},' * 300 + b'{"role": "user", "content": "Hi"}]}']


def _value(rng: random.Random, depth: int = 0):
    """A hostile value: mostly from the list above, sometimes a random list of them, or a plausible value."""
    roll = rng.random()
    if roll < 0.6 or depth > 2:
        return rng.choice(HOSTILE)
    if roll < 0.8:
        return [_value(rng, depth + 1) for _ in range(rng.randint(0, 6))]
    return rng.choice([rng.randint(-3, 300), rng.uniform(-80, 80), "Hi", [0, 1], [1]])


def _message(rng: random.Random):
    if rng.random() < 0.5:
        return {"role": rng.choice(["user", "assistant"]), "content": rng.choice(["Hi", "", "  ", "x" * 900])}
    return {k: _value(rng) for k in rng.sample(["role", "content", "extra"], rng.randint(0, 3))}


def _body(rng: random.Random, kind: str) -> dict:
    """A plausible body with some fields dropped, some replaced by hostile values, sometimes an unknown one."""
    body = ({"prompt": "Hi", "perturbations": [0], "scale": 1.0, "max_new_tokens": 2, "random": False}
            if kind == "live" else {"messages": [{"role": "user", "content": "Hi"}], "perturbation": 0,
                                    "scale": 1.0, "max_new_tokens": 2})
    for field in FIELDS[kind]:
        roll = rng.random()
        if roll < 0.15:
            del body[field]
        elif roll < 0.55:
            body[field] = _value(rng)
    if kind == "chat" and rng.random() < 0.3:
        body["messages"] = [_message(rng) for _ in range(rng.randint(0, 4))]
    if rng.random() < 0.1:
        body[rng.choice(["extra", "Prompt", "__class__", ""])] = _value(rng)
    if "max_new_tokens" not in body or body.get("max_new_tokens") not in range(1, 9):
        body.setdefault("max_new_tokens", 2)  # a valid body generates: keep it short, the fuzz is about input
    return body


@pytest.fixture()
def fuzz_client(tiny):  # noqa: F811
    engine = Engine()
    engine.use_model(tiny["lm"])
    app = create_app(tiny["catalog"], engine=engine)
    with TestClient(app, base_url=LOCAL, raise_server_exceptions=False) as client:
        yield client, app


def _check_api(response, sent) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:300], sent)
    kind = response.headers["content-type"]
    if response.status_code == 200:
        assert kind.startswith("application/x-ndjson"), sent
        events = [json.loads(line) for line in response.text.splitlines() if line.strip()]
        assert events and all(isinstance(e, dict) for e in events), sent
    else:
        assert kind.startswith("application/json"), (kind, sent)
        error = response.json()["error"]
        assert isinstance(error, str) and "\n" not in error and len(error) < 400, (error, sent)


@pytest.mark.parametrize("kind", ["live", "chat"])
def test_fuzzed_json_bodies_never_give_a_500(fuzz_client, tiny, kind):  # noqa: F811
    client, app = fuzz_client
    rng = random.Random(f"{SEED}-{kind}")
    url = f"/api/runs/{tiny['run_id']}/{kind}"
    headers = {"X-CSRF-Token": _csrf(app), "Content-Type": "application/json"}
    statuses = set()
    for _ in range(CASES):
        body = _body(rng, kind)
        text = json.dumps(body)  # Python writes Infinity and NaN, as a hostile client would
        response = client.post(url, content=text.encode(), headers=headers)
        _check_api(response, text[:300])
        statuses.add(response.status_code)
    for raw in RAW:
        response = client.post(url, content=raw, headers=headers)
        _check_api(response, raw[:60])
        statuses.add(response.status_code)
    assert 422 in statuses and 200 in statuses  # both refusals and real generations were exercised


def test_fuzzed_forms_never_give_a_500(fuzz_client, tiny):  # noqa: F811
    client, app = fuzz_client
    rng = random.Random(f"{SEED}-forms")
    texts = ["", "0", "1", "-1", "2", "1.5", "nan", "inf", "-Infinity", "1e999", "9" * 500, "abc", "on", "none",
             "x" * 6000, "<script>", "\u0000", "💥"]
    live, label = f"/runs/{tiny['run_id']}/live", f"/behaviours/{tiny['ids'][0]}/label"
    for _ in range(CASES // 2):
        form = {k: rng.choice(texts) for k in ("prompt", "scale", "max_new_tokens", "random")
                if rng.random() < 0.8}
        form["perturbations"] = [rng.choice(texts) for _ in range(rng.randint(0, 6))]
        if form.get("max_new_tokens") not in ("1", "2"):
            form["max_new_tokens"] = rng.choice(["1", "2", "0", "abc", "1e999"])
        response = client.post(live, data={**form, "csrf": _csrf(app)})
        assert response.status_code < 500 and response.headers["content-type"].startswith("text/html"), form
        note = {k: rng.choice(texts) for k in ("label", "note") if rng.random() < 0.8}
        response = client.post(label, data={**note, "csrf": _csrf(app)}, follow_redirects=False)
        assert response.status_code in (303, 400), (response.status_code, note)
