"""melbo serve: the web app over the catalogue (FastAPI TestClient on a tiny real run), its safety, the streamed and
cancellable generation, the CLI's one-line errors, and a real browser (Playwright driving Debian's chromium) on a
small real run of the embedded model."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest
from conftest import run_cli
from tiny_models import save_tiny_model

import melbo
from melbo.records.catalog import Catalog
from melbo.engine.generation import Sampling, generate_rows, stream_rows
from melbo.engine.intervention import SteeringVectors
from melbo.engine.prompts import prompt_tokens
from melbo.engine.store import Run

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from melbo.server import create_app  # noqa: E402
from melbo.server.live import Engine  # noqa: E402
from melbo.server.security import CSP  # noqa: E402
from melbo.settings import SERVE_MAX_NEW_TOKENS, SERVE_MAX_PROMPT_CHARS  # noqa: E402

LOCAL = "http://127.0.0.1:8765"
XSS = '<script>window.__melbo_xss = 1</script><img src=x onerror="window.__melbo_xss = 2">'
CHROMIUM = Path("/usr/bin/chromium")


def _plant(run_dir: Path, index: int, text: str) -> None:
    """Make perturbation `index`'s first stored completion `text` (the run directory is the source of truth)."""
    run = Run.load(run_dir, result=False)
    rows = run.completions()
    next(r for r in rows if r["vector"] == index)["text"] = text
    run.write_completions(rows)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random model and a real run of it (2 vectors, 3 steps), catalogued with a planted <script>."""
    base = tmp_path_factory.mktemp("serve")
    lm = melbo.load_model(str(save_tiny_model(base / "model")))
    run = melbo.elicit(lm, ["Hello there"], base / "run", random=2, n_vectors=2, steps=3, radius="1.0",
                       max_new_tokens=8)
    _plant(run.path, 0, "before " + XSS + " after")
    catalog = base / "catalog.sqlite"
    with Catalog(catalog) as cat:
        run_id = cat.add_run(run.path)
        ids = [p.id for p in cat.perturbations(run_id)]
    return {"lm": lm, "run": run, "catalog": catalog, "run_id": run_id, "ids": ids}


@pytest.fixture()
def app(tiny):
    engine = Engine()
    engine.use_model(tiny["lm"])  # the same model object: no second copy in memory
    return create_app(tiny["catalog"], engine=engine)


@pytest.fixture()
def client(app):
    with TestClient(app, base_url=LOCAL) as c:
        yield c


def _csrf(app) -> str:
    return app.app.state.melbo.csrf


def _stream(client, app, path: str, body: dict) -> list[dict]:
    with client.stream("POST", path, json=body, headers={"X-CSRF-Token": _csrf(app)}) as response:
        assert response.status_code == 200, response.read()
        return [json.loads(line) for line in response.iter_lines() if line.strip()]


def _texts(events: list[dict]) -> dict[str, str]:
    columns = next(e["columns"] for e in events if "columns" in e)
    texts = [""] * len(columns)
    for e in events:
        for k, piece in enumerate(e.get("delta", [])):
            texts[k] += piece
    return dict(zip(columns, texts))


# ------------------------------------------------------------------------------------------------ pages
def test_pages_show_runs_behaviours_labels_and_plots(client, tiny):
    run_id, ids = tiny["run_id"], tiny["ids"]
    home = client.get("/")
    assert home.status_code == 200 and f'href="/runs/{run_id}"' in home.text
    page = client.get(f"/runs/{run_id}")
    assert page.status_code == 200
    for pid in ids:
        assert f'href="/behaviours/{pid}"' in page.text
    with Catalog(tiny["catalog"]) as cat:
        auto = cat.perturbation(ids[1]).auto_label
    assert auto and auto in page.text  # the automatic label is shown
    assert "/plots/curves.png" in page.text and "/plots/learned-vs-random.png" in page.text
    png = client.get(f"/runs/{run_id}/plots/learned-vs-random.png")
    assert png.status_code == 200 and png.content[:4] == b"\x89PNG"
    behaviour = client.get(f"/behaviours/{ids[1]}")
    assert behaviour.status_code == 200 and "perplexity" in behaviour.text  # its metrics
    assert client.get(f"/runs/{run_id}/chat").status_code == 200
    for missing in ("/runs/999", "/behaviours/999", "/runs/abc", "/runs/99999999999999999999999", "/nothing"):
        response = client.get(missing)
        assert response.status_code == 404 and "<h1>" in response.text, missing  # a page, not a traceback


def test_model_text_is_escaped_and_every_response_has_the_csp(client, tiny):
    page = client.get(f"/behaviours/{tiny['ids'][0]}")
    assert "&lt;script&gt;window.__melbo_xss" in page.text
    assert "<script>window" not in page.text and "<img src=x" not in page.text
    for url in ("/", f"/behaviours/{tiny['ids'][0]}", "/static/app.js", "/nothing-here"):
        response = client.get(url)
        assert response.headers["content-security-policy"] == CSP, url
        assert response.headers["x-frame-options"] == "DENY"
    assert "'unsafe-inline'" not in CSP and "script-src 'self'" in CSP
    found = client.get("/search", params={"q": "after"})  # search shows the planted completion, escaped
    assert "&lt;script&gt;" in found.text and "<script>window" not in found.text


def test_labels_need_the_csrf_token_and_are_stored_in_the_catalogue(client, app, tiny):
    pid = tiny["ids"][1]
    refused = client.post(f"/behaviours/{pid}/label", data={"label": "forged"})
    assert refused.status_code == 403 and "CSRF" in refused.json()["error"]
    wrong = client.post(f"/behaviours/{pid}/label", data={"label": "forged", "csrf": "guess"})
    assert wrong.status_code == 403
    foreign = client.post(f"/behaviours/{pid}/label", data={"label": "forged", "csrf": _csrf(app)},
                          headers={"Origin": "http://evil.example"})
    assert foreign.status_code == 403
    with Catalog(tiny["catalog"]) as cat:
        assert cat.perturbation(pid).human_label is None
    saved = client.post(f"/behaviours/{pid}/label", data={"label": "pirate <b>", "note": "arr", "csrf": _csrf(app)},
                        follow_redirects=False)
    assert saved.status_code == 303 and saved.headers["location"].startswith(f"/behaviours/{pid}")
    with Catalog(tiny["catalog"]) as cat:
        entry = cat.perturbation(pid)
    assert (entry.human_label, entry.note, entry.label) == ("pirate <b>", "arr", "pirate <b>")
    assert "pirate &lt;b&gt;" in client.get(f"/behaviours/{pid}").text
    cleared = client.post(f"/behaviours/{pid}/label", data={"label": "", "note": "", "csrf": _csrf(app)},
                          follow_redirects=False)
    assert cleared.status_code == 303
    with Catalog(tiny["catalog"]) as cat:
        assert cat.perturbation(pid).human_label is None  # the automatic label shows again
    # a JSON API POST without the header token is refused as well
    api = client.post(f"/api/runs/{tiny['run_id']}/live", json={"prompt": "Hi", "perturbations": [0]})
    assert api.status_code == 403


def test_off_localhost_every_request_needs_the_token(tiny):
    token = "a-long-enough-token"
    app = create_app(tiny["catalog"], token=token)
    with TestClient(app, base_url="http://192.0.2.7:8765") as client:
        for url in ("/", "/static/app.js", f"/behaviours/{tiny['ids'][0]}"):
            assert client.get(url).status_code == 401, url
        assert client.get("/", headers={"Authorization": "Bearer wrong-token-xx"}).status_code == 401
        assert client.get("/", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        first = client.get(f"/?token={token}", follow_redirects=False)
        assert first.status_code == 303 and first.headers["location"] == "/"  # the token leaves the URL
        assert "HttpOnly" in first.headers["set-cookie"] and "SameSite=Strict" in first.headers["set-cookie"]
        assert client.get("/").status_code == 200  # the cookie carries it from now on
        assert client.post(f"/behaviours/{tiny['ids'][0]}/label", data={"label": "x"}).status_code == 403  # CSRF still
    # without a token, a request addressed to another host name is refused (DNS rebinding)
    with TestClient(create_app(tiny["catalog"]), base_url="http://evil.example") as client:
        assert client.get("/").status_code == 403


def test_the_guard_lets_no_websocket_through():
    from melbo.server.security import Guard

    reached, sent = [], []

    async def inner(scope, receive, send):  # an app that would accept anything
        reached.append(scope["type"])

    async def receive():
        return {"type": "websocket.connect"}

    async def send(message):
        sent.append(message)

    asyncio.run(Guard(inner, "csrf-token-x", token=None)({"type": "websocket", "headers": []}, receive, send))
    assert not reached and sent == [{"type": "websocket.close", "code": 1008}]


def test_the_browser_never_names_a_file(client, tiny):
    assert client.get("/runs/..%2F..%2Fetc").status_code in (404, 422)
    # no route takes a path: runs and behaviours are addressed by integer catalogue ids
    from melbo.server.app import router

    routes = [r.path for r in router.routes]
    assert not [p for p in routes if ":path" in p] and "/runs/{run_id}" in routes
    assert client.get(f"/runs/{tiny['run_id']}/plots/..%2Fconfig.png").status_code == 404
    assert client.get(f"/behaviours/{tiny['ids'][0]}/export/..%2F..%2Fetc").status_code == 404


# ------------------------------------------------------------------------------------------------ live generation
def test_stream_rows_gives_the_tokens_of_batch_generation(tiny):
    lm, run = tiny["lm"], tiny["run"]
    ids = prompt_tokens(lm, "Hello there", True)
    sampling = Sampling(max_new_tokens=12)
    expected = [text for text, _ in generate_rows(lm, run.perturbations, ids, [None, 0, 1], sampling, 2.0)]
    streamed, steps = ["", "", ""], 0
    for deltas in stream_rows(lm, run.perturbations, ids, [None, 0, 1], sampling, 2.0):
        steps += 1
        streamed = [a + b for a, b in zip(streamed, deltas)]
    assert streamed == expected and steps >= 2


@pytest.mark.parametrize("arch", ["gpt2", "gemma3"])
def test_stream_rows_matches_batch_generation_on_other_architectures(arch, tmp_path):
    """Byte-level tokens of a random model are often half characters: the streamed pieces still add up."""
    import torch

    lm = melbo.load_model(str(save_tiny_model(tmp_path / arch, arch)))
    ids = lm.tokenizer("Hello there")["input_ids"]
    vectors = SteeringVectors(torch.randn(2, lm.width, generator=torch.Generator().manual_seed(0)) * 3, 1)
    sampling = Sampling(max_new_tokens=10)
    expected = [text for text, _ in generate_rows(lm, vectors, ids, [None, 0, 1], sampling)]
    streamed = ["", "", ""]
    for deltas in stream_rows(lm, vectors, ids, [None, 0, 1], sampling):
        streamed = [a + b for a, b in zip(streamed, deltas)]
    assert streamed == expected


def test_live_streams_unsteered_steered_and_random_columns(client, app, tiny):
    events = _stream(client, app, f"/api/runs/{tiny['run_id']}/live",
                     {"prompt": "Hello there", "perturbations": [1, 0], "scale": 1.5, "max_new_tokens": 6,
                      "random": True})
    assert events[0] == {"queue": 0} and events[-1] == {"done": True}
    assert sum("delta" in e for e in events) >= 2  # token by token, not one answer
    texts = _texts(events)
    assert list(texts) == ["unsteered", "v1", "v0", "random (‖v1‖)"]
    lm, run = tiny["lm"], tiny["run"]
    ids = prompt_tokens(lm, "Hello there", True)
    expected = generate_rows(lm, run.perturbations, ids, [None, 1, 0], Sampling(max_new_tokens=6), 1.5)
    assert [texts["unsteered"], texts["v1"], texts["v0"]] == [t for t, _ in expected]


def test_chat_streams_a_steered_reply(client, app, tiny):
    events = _stream(client, app, f"/api/runs/{tiny['run_id']}/chat",
                     {"messages": [{"role": "user", "content": "Hi"}], "perturbation": 1, "scale": 1,
                      "max_new_tokens": 5})
    assert _texts(events).keys() == {"v1"} and events[-1] == {"done": True}


@pytest.mark.parametrize("change, message", [
    ({"prompt": "x" * (SERVE_MAX_PROMPT_CHARS + 1)}, f"limit of {SERVE_MAX_PROMPT_CHARS}"),
    ({"prompt": "   "}, "empty prompt"),
    ({"max_new_tokens": SERVE_MAX_NEW_TOKENS + 1}, f"between 1 and {SERVE_MAX_NEW_TOKENS}"),
    ({"max_new_tokens": 0}, "between 1 and"),
    ({"max_new_tokens": "many"}, "whole number"),
    ({"scale": 1e9}, "between -50 and 50"),
    ({"scale": "nan"}, "finite"),
    ({"perturbations": [7]}, "out of range"),
    ({"perturbations": []}, "at least one"),
    ({"random": "yes"}, "true or false"),
    ({"perturbations": [0, 1, 0, 1, 0]}, None),  # duplicates collapse: allowed
])
def test_live_input_is_bounded_with_a_clear_message(client, app, tiny, change, message):
    body = {"prompt": "Hi", "perturbations": [0], "scale": 1, "max_new_tokens": 2, **change}
    response = client.post(f"/api/runs/{tiny['run_id']}/live", json=body, headers={"X-CSRF-Token": _csrf(app)})
    if message is None:
        assert response.status_code == 200
    else:
        assert response.status_code == 422 and message in response.json()["error"]


def test_live_without_javascript_renders_the_finished_columns(client, app, tiny):
    page = client.post(f"/runs/{tiny['run_id']}/live",
                       data={"prompt": "Hello <there>", "perturbations": ["0"], "scale": "1", "max_new_tokens": "4",
                             "csrf": _csrf(app)})
    assert page.status_code == 200 and "Hello &lt;there&gt;" in page.text and "<h3>v0</h3>" in page.text


def test_requests_queue_and_show_their_place():
    """The second request waits (place 1) while the first runs; then its turn comes; one model lock throughout."""
    engine = Engine()
    started, release = threading.Event(), threading.Event()
    running = []

    def work(tag):
        def run(_engine, cancelled, emit):
            running.append(tag)
            assert len(running) == 1  # never two at once
            started.set()
            release.wait(5)
            emit({"delta": [tag]})
            running.remove(tag)
        return run

    async def main():
        async def never():
            return False

        first = engine.events(work("a"), never)
        assert await first.__anext__() == {"queue": 0}
        first_rest = asyncio.ensure_future(_collect(first))
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 5)
        second = engine.events(work("b"), never)
        assert await second.__anext__() == {"queue": 1}
        assert engine.waiting == 2
        release.set()
        assert await _collect(second) == [{"queue": 0}, {"delta": ["b"]}]
        assert await first_rest == [{"delta": ["a"]}]
        assert engine.waiting == 0

    asyncio.run(main())


async def _collect(agen) -> list:
    return [event async for event in agen]


def test_a_full_line_is_told_the_server_is_busy(client, app, tiny):
    from melbo.settings import SERVE_MAX_WAITING

    engine = app.app.state.melbo.engine
    engine._line.extend(object() for _ in range(SERVE_MAX_WAITING))
    try:
        response = client.post(f"/api/runs/{tiny['run_id']}/live", headers={"X-CSRF-Token": _csrf(app)},
                               json={"prompt": "Hi", "perturbations": [0], "max_new_tokens": 2})
    finally:
        del engine._line[:]
    assert response.status_code == 503 and "busy" in response.json()["error"]


def test_closing_the_browser_cancels_the_generation(app, tiny):
    """An ASGI client that disconnects after the first streamed token: the generation stops within a forward or
    two instead of running its 200 tokens, and the line and the model lock are free again."""
    lm = tiny["lm"]
    forwards = []
    handle = lm.model.register_forward_hook(lambda *_: forwards.append(1))
    body = json.dumps({"prompt": "Hello there", "perturbations": [0], "scale": 1, "max_new_tokens": 200}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": f"/api/runs/{tiny['run_id']}/live", "raw_path": b"",
             "root_path": "", "query_string": b"", "server": ("127.0.0.1", 8765), "client": ("127.0.0.1", 5000),
             "headers": [(b"host", b"127.0.0.1:8765"), (b"content-type", b"application/json"),
                         (b"x-csrf-token", _csrf(app).encode())]}
    chunks: list[bytes] = []

    async def main():
        gone = asyncio.Event()
        sent = [False]

        async def receive():
            if not sent[0]:
                sent[0] = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            if message["type"] == "http.response.body" and message.get("body"):
                chunks.append(message["body"])
                if b'"delta"' in message["body"]:
                    gone.set()  # the browser closes after seeing the first token

        await asyncio.wait_for(app(scope, receive, send), 30)
        engine = app.app.state.melbo.engine
        for _ in range(100):  # the worker thread notices the cancel before its next forward
            if not engine._lock.locked():
                break
            await asyncio.sleep(0.05)
        assert not engine._lock.locked() and engine.waiting == 0

    try:
        asyncio.run(main())
    finally:
        handle.remove()
    assert any(b'"delta"' in c for c in chunks) and not any(b'"done"' in c for c in chunks)
    assert len(forwards) < 20, f"{len(forwards)} forwards after the browser left"


def test_the_model_is_loaded_once_per_process(tiny):
    """Without a preloaded model the engine loads the run's own on first use, and only then."""
    app = create_app(tiny["catalog"])
    with TestClient(app, base_url=LOCAL) as client:
        first, second = (_stream(client, app, f"/api/runs/{tiny['run_id']}/live",
                                 {"prompt": "Hi", "perturbations": [0], "max_new_tokens": 2}) for _ in range(2))
    assert first[-1] == second[-1] == {"done": True}
    assert app.app.state.melbo.engine.loads == 1
    assert [e for e in first if "loading model" in e.get("status", "")]
    assert not [e for e in second if "status" in e]


def test_with_model_a_run_of_another_model_gets_a_clear_message(tiny, tmp_path):
    other = save_tiny_model(tmp_path / "other", "gpt2")
    app = create_app(tiny["catalog"], str(other))
    with TestClient(app, base_url=LOCAL) as client:
        events = _stream(client, app, f"/api/runs/{tiny['run_id']}/live",
                         {"prompt": "Hi", "perturbations": [0], "max_new_tokens": 2})
    assert "was made with model" in events[-1]["error"] and "--model" in events[-1]["error"]


def test_exports_download_the_perturbation(client, tiny, tmp_path):
    run, pid = tiny["run"], tiny["ids"][1]
    data = client.get(f"/behaviours/{pid}/export/safetensors")
    assert data.status_code == 200 and "run" in data.headers["content-disposition"]
    (tmp_path / "v.safetensors").write_bytes(data.content)
    loaded = SteeringVectors.load(tmp_path / "v.safetensors")
    assert loaded.layer == run.perturbations.layer and (loaded.vectors[0] == run.perturbations.vectors[1]).all()
    gguf_file = tmp_path / "v.gguf"
    gguf_file.write_bytes(client.get(f"/behaviours/{pid}/export/gguf").content)
    import gguf

    reader = gguf.GGUFReader(str(gguf_file))
    assert [t.name for t in reader.tensors] == [f"direction.{run.perturbations.layer}"]
    assert client.get(f"/behaviours/{pid}/export/peft").status_code == 404  # vectors are no LoRA


def test_an_adapter_run_exports_peft_and_has_no_random_vector(tiny, tmp_path):
    import io
    import zipfile

    run = melbo.elicit(tiny["lm"], ["Hello there"], tmp_path / "adapters", random=0, method="adapters",
                       n_vectors=1, rank=2, steps=2, radius="1.0", max_new_tokens=4, orthogonal="none")
    catalog = tmp_path / "catalog.sqlite"
    with Catalog(catalog) as cat:
        run_id = cat.add_run(run.path)
        [pid] = [p.id for p in cat.perturbations(run_id)]
    engine = Engine()
    engine.use_model(tiny["lm"])
    app = create_app(catalog, engine=engine)
    with TestClient(app, base_url=LOCAL) as client:
        page = client.get(f"/behaviours/{pid}")
        assert "/export/peft" in page.text and "/export/gguf" not in page.text and 'name="random"' not in page.text
        download = client.get(f"/behaviours/{pid}/export/peft")
        assert download.status_code == 200 and download.headers["content-type"] == "application/zip"
        names = zipfile.ZipFile(io.BytesIO(download.content)).namelist()
        assert sorted(n.split("/")[-1] for n in names) == ["adapter_config.json", "adapter_model.safetensors"]
        assert client.get(f"/behaviours/{pid}/export/gguf").status_code == 404
        refused = client.post(f"/api/runs/{run_id}/live", headers={"X-CSRF-Token": _csrf(app)},
                              json={"prompt": "Hi", "perturbations": [0], "max_new_tokens": 2, "random": True})
        events = [json.loads(line) for line in refused.text.splitlines()]
        assert "adapters" in events[-1]["error"]  # said in the stream, where the page shows it
        steered = _stream(client, app, f"/api/runs/{run_id}/live",
                          {"prompt": "Hi", "perturbations": [0], "max_new_tokens": 3})
        assert list(_texts(steered)) == ["unsteered", "v0"]


def test_a_run_whose_directory_is_gone_still_shows_the_catalogue(tiny, tmp_path):
    import shutil

    moved = shutil.copytree(tiny["run"].path, tmp_path / "run")
    catalog = tmp_path / "catalog.sqlite"
    with Catalog(catalog) as cat:
        run_id = cat.add_run(moved)
        pid = cat.perturbations(run_id)[0].id
    shutil.rmtree(moved)
    app = create_app(catalog)
    with TestClient(app, base_url=LOCAL) as client:
        page = client.get(f"/runs/{run_id}")
        assert page.status_code == 200 and "does not exist" in page.text and f"/behaviours/{pid}" in page.text
        behaviour = client.get(f"/behaviours/{pid}")
        assert behaviour.status_code == 200 and "&lt;script&gt;" in behaviour.text  # completions from the catalogue
        live = client.post(f"/api/runs/{run_id}/live", headers={"X-CSRF-Token": _csrf(app)},
                           json={"prompt": "Hi", "perturbations": [0], "max_new_tokens": 2})
        assert live.status_code == 400 and "does not exist" in live.json()["error"]


# ------------------------------------------------------------------------------------------------ CLI
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_cli_refuses_bad_input_in_one_line(capsys, tmp_path):
    code, _, err = run_cli(["serve", "--host", "0.0.0.0", "--catalog", str(tmp_path / "c.sqlite")], capsys)
    assert code == 2 and "--token" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(["serve", "--catalog", str(tmp_path)], capsys)
    assert code == 2 and "is a directory" in err
    code, _, err = run_cli(["serve", "--port", "70000"], capsys)
    assert code == 2 and "1..65535" in err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, _, err = run_cli(["serve", "--port", str(port), "--catalog", str(tmp_path / "c.sqlite")], capsys)
    assert code == 2 and "in use" in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------------ a real browser
class _Server:
    """uvicorn serving an app in a thread, on a free port; stop() shuts it down (a server restart)."""

    def __init__(self, app):
        import uvicorn

        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    access_log=False, timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                break
            time.sleep(0.05)
        assert self.server.started
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def smol_run(tmp_path_factory, smol):
    """A small real run of the embedded model: 2 vectors, 3 steps, short completions, catalogued."""
    base = tmp_path_factory.mktemp("serve-smol")
    run = melbo.elicit(smol, ["Tell me about the sea."], base / "run", random=2, n_vectors=2, steps=3,
                       radius="0.2x", max_new_tokens=16)
    _plant(run.path, 1, "A reply with markup: " + XSS)
    with Catalog(base / "catalog.sqlite") as cat:
        run_id = cat.add_run(run.path)
        ids = [p.id for p in cat.perturbations(run_id)]
    return {"catalog": base / "catalog.sqlite", "run_id": run_id, "ids": ids}


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is absent (apt-get install -y chromium)")
def test_in_a_real_browser(smol_run):
    sync_api = pytest.importorskip("playwright.sync_api")
    catalog, run_id, v1 = smol_run["catalog"], smol_run["run_id"], smol_run["ids"][1]
    app = create_app(catalog)
    server = _Server(app)
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            errors = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("dialog", lambda dialog: errors.append("dialog: " + dialog.message))

            # open the run, then a behaviour
            page.goto(server.url + "/")
            page.click(f'a[href="/runs/{run_id}"]')
            page.click(f'a[href="/behaviours/{v1}"]')
            assert page.url.endswith(f"/behaviours/{v1}")

            # the planted completion renders as text, and nothing of it ran
            planted = page.locator("pre.text", has_text="A reply with markup")
            assert "<script>window.__melbo_xss = 1</script>" in planted.inner_text()
            assert page.evaluate("window.__melbo_xss") is None

            # try it live: steered and unsteered text stream in, token by token
            page.fill("textarea[name=prompt]", "Write one sentence about ships.")
            page.fill("input[name=max_new_tokens]", "12")
            page.check("input[name=random]")
            page.evaluate("""() => { window.__updates = 0;
                new MutationObserver(m => { window.__updates += m.length; })
                  .observe(document.querySelector('.columns'), {subtree: true, childList: true, characterData: true});
            }""")
            page.click("form.live-form button[type=submit]")
            # (waits use locators: the page's CSP forbids the eval that wait_for_function needs)
            sync_api.expect(page.locator("form.live-form .queue")).to_have_text("done", timeout=30_000)
            texts = {name: page.locator(f'.column[data-name="{name}"] pre').inner_text()
                     for name in ("unsteered", "v1")}
            assert all(t.strip() for t in texts.values()), texts
            assert page.locator(".column").count() == 3  # unsteered, v1, random
            assert page.evaluate("window.__updates") > 4  # many small updates, not one answer

            if os.environ.get("MELBO_SCREENSHOT") == "1":  # the README's picture: a behaviour without the planted XSS
                shot = browser.new_page(viewport={"width": 1200, "height": 900})
                shot.goto(f"{server.url}/behaviours/{smol_run['ids'][0]}")
                shot.fill("textarea[name=prompt]", "Write one sentence about ships.")
                shot.fill("input[name=max_new_tokens]", "24")
                shot.check("input[name=random]")
                shot.click("form.live-form button[type=submit]")
                sync_api.expect(shot.locator("form.live-form .queue")).to_have_text("done", timeout=60_000)
                docs = Path(__file__).resolve().parents[1] / "docs"
                docs.mkdir(exist_ok=True)
                shot.screenshot(path=str(docs / "serve.png"), full_page=True)
                shot.close()

            # a second tab waits in line, and sees its place; closing the first tab mid-stream stops its
            # generation (a few forwards, not the 200 asked for) and the second one's turn comes
            engine = app.app.state.melbo.engine
            forwards = []
            hook = engine._lm.model.register_forward_hook(lambda *_: forwards.append(1))
            try:
                second = browser.new_page(viewport={"width": 1200, "height": 900})
                second.goto(f"{server.url}/behaviours/{v1}")
                page.fill("input[name=max_new_tokens]", "200")
                page.click("form.live-form button[type=submit]")
                sync_api.expect(page.locator('.column[data-name="v1"] pre')).not_to_be_empty(timeout=30_000)
                second.fill("textarea[name=prompt]", "Hi")
                second.fill("input[name=max_new_tokens]", "3")
                second.click("form.live-form button[type=submit]")
                place = second.locator("form.live-form .queue")
                sync_api.expect(place).to_have_text("waiting: 1 request ahead of you", timeout=10_000)
                page.close()
                sync_api.expect(place).to_have_text("done", timeout=30_000)
                assert second.locator(".column").count() == 2  # unsteered and v1
                assert len(forwards) < 50, f"{len(forwards)} forwards: the generation ran on after the tab closed"
                assert engine.waiting == 0
            finally:
                hook.remove()
            page = second
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(f"{server.url}/behaviours/{v1}")

            # set a label
            page.fill(".label-form input[name=label]", "sea shanty")
            page.fill(".label-form textarea[name=note]", "sings about ships")
            page.click(".label-form button[type=submit]")
            assert page.locator("h1 .label.human").inner_text() == "sea shanty"

            # a POST without the CSRF token is refused, even from the app's own page
            status = page.evaluate(f"""async () => (await fetch('/behaviours/{v1}/label', {{method: 'POST',
                headers: {{'Content-Type': 'application/x-www-form-urlencoded'}}, body: 'label=forged'}})).status""")
            assert status == 403

            # restart the server: the label is still there
            server.stop()
            server = _Server(create_app(catalog))
            page.goto(f"{server.url}/behaviours/{v1}")
            assert page.locator("h1 .label.human").inner_text() == "sea shanty"
            assert page.input_value(".label-form input[name=label]") == "sea shanty"
            assert page.input_value(".label-form textarea[name=note]") == "sings about ships"

            # chat with the steered model
            page.goto(f"{server.url}/runs/{run_id}/chat")
            page.select_option("select[name=perturbation]", "1")
            page.fill("input[name=max_new_tokens]", "8")
            page.fill("textarea[name=message]", "Hello!")
            page.click("form.chat-form button[type=submit]")
            sync_api.expect(page.locator(".turn.assistant")).not_to_be_empty(timeout=30_000)
            assert page.locator(".turn.user").inner_text() == "Hello!"
            assert not errors, errors
            browser.close()
    finally:
        server.stop()


# ------------------------------------------------------------------------------------------------ hostile inputs
def _post(client, app, path: str, body) -> "object":
    """A POST with a raw JSON text (Python's json reads Infinity and NaN, which json= cannot send)."""
    text = body if isinstance(body, str) else json.dumps(body)
    return client.post(path, content=text.encode(), headers={"X-CSRF-Token": _csrf(app),
                                                              "Content-Type": "application/json"})


@pytest.mark.parametrize("kind, text, message", [
    ("live", '{"prompt": "Hi", "perturbations": [0], "max_new_tokens": Infinity}', "whole number"),
    ("live", '{"prompt": "Hi", "perturbations": [Infinity]}', "whole number"),
    ("live", '{"prompt": "Hi", "perturbations": [NaN]}', "whole number"),
    ("live", '{"prompt": "Hi", "perturbations": [0], "scale": 1' + "0" * 400 + "}", "between -50 and 50"),
    ("live", '{"prompt": "Hi", "perturbations": [0], "scale": -Infinity}', "finite"),
    ("live", '{"prompt": "Hi", "perturbations": [0], "max_new_tokens": 1' + "0" * 400 + "}", "between 1 and"),
    ("live", '{"prompt": "Hi", "perturbations": [1' + "0" * 400 + "]}", "out of range"),
    ("chat", '{"messages": [{"role": "user", "content": "Hi"}], "perturbation": Infinity}', "whole number"),
    ("chat", '{"messages": [{"role": "user", "content": "Hi"}], "perturbation": -1}', "out of range"),
    ("chat", '{"messages": [{"role": "user", "content": "Hi"}], "scale": NaN}', "finite"),
    ("chat", '{"messages": [{"role": "user", "content": "Hi"}], "max_new_tokens": true}', "whole number"),
])
def test_non_finite_and_huge_numbers_are_a_422_with_a_message(client, app, tiny, kind, text, message):
    response = _post(client, app, f"/api/runs/{tiny['run_id']}/{kind}", text)
    assert response.status_code == 422 and message in response.json()["error"], response.text
    assert len(response.json()["error"]) < 300 and "\n" not in response.json()["error"]  # one line, no 401 digits


def _broken_copy(tiny, tmp_path, config=None, metrics=None):
    """A copy of the tiny run with its config.json changed by `config(dict)` or its metrics.json replaced,
    catalogued alone; returns (app, run id, first behaviour id)."""
    import shutil

    from melbo.engine.store import CONFIG, METRICS

    copy = Path(shutil.copytree(tiny["run"].path, tmp_path / "run"))
    with Catalog(tmp_path / "catalog.sqlite") as cat:  # first: the catalogue refuses damaged metrics itself
        run_id = cat.add_run(copy)
        pid = cat.perturbations(run_id)[0].id
    if config is not None:
        data = json.loads((copy / CONFIG).read_text())
        config(data)
        (copy / CONFIG).write_text(json.dumps(data))
    if metrics is not None:
        (copy / METRICS).write_text(json.dumps(metrics))
    engine = Engine()
    engine.use_model(tiny["lm"])
    return create_app(tmp_path / "catalog.sqlite", engine=engine), run_id, pid


@pytest.mark.parametrize("damage, message, readable", [
    (lambda c: c["model"].update(depth="abc"), "model.depth is &#39;abc&#39;, not a whole number", False),
    (lambda c: c["model"].pop("architecture"), "no model.architecture", True),
    (lambda c: c["model"].update(depth=None, architecture=["x"]), "model.architecture is [&#39;x&#39;], not text",
     False),
])
def test_a_gguf_export_of_a_run_with_a_damaged_config_says_so(tiny, tmp_path, damage, message, readable):
    app, _, pid = _broken_copy(tiny, tmp_path, config=damage)
    with TestClient(app, base_url=LOCAL) as client:
        response = client.get(f"/behaviours/{pid}/export/gguf")
        assert 400 <= response.status_code < 500 and message in response.text, response.text
        # a config that reads, but lacks what gguf needs, still exports safetensors; one of the wrong types is
        # refused whole by its reader (config.json, the field, the fix), never half-trusted
        safetensors = client.get(f"/behaviours/{pid}/export/safetensors")
        assert (safetensors.status_code == 200) is readable and (readable or "config.json is malformed" in
                                                                 safetensors.text), safetensors.text


@pytest.mark.parametrize("metrics", [{"learned": 5}, [1, 2], {"learned": {"perturbations": [5, "x"]}},
                                     {"learned": {"perturbations": [], "diversity": "lots"}, "random": []}])
def test_a_plot_of_damaged_metrics_is_a_4xx_not_a_500(tiny, tmp_path, metrics):
    app, run_id, _ = _broken_copy(tiny, tmp_path, metrics=metrics)
    with TestClient(app, base_url=LOCAL) as client:
        response = client.get(f"/runs/{run_id}/plots/learned-vs-random.png")
        assert response.status_code in (404, 422) and "<h1>" in response.text, response.text
        assert client.get(f"/runs/{run_id}").status_code == 200  # the run's page still shows


def test_unknown_plot_names_are_refused_before_anything_is_cached(client, app, tiny):
    cache = app.app.state.melbo.plots
    for k in range(50):
        response = client.get(f"/runs/{tiny['run_id']}/plots/nothing-{k}-{'x' * 2000}.png")
        assert response.status_code == 404 and "learned-vs-random" in response.text  # names the plots there are
    assert len(cache) == 0
    assert client.get(f"/runs/{tiny['run_id']}/plots/curves.png").status_code == 200
    assert len(cache) == 1


def test_the_plot_cache_keeps_within_its_byte_budget():
    from melbo.server.app import PngCache

    cache = PngCache(budget=1000)
    for k in range(10):
        cache.put(("run", k), b"x" * 300)
    assert cache.size <= 1000 and len(cache) == 3
    assert cache.get(("run", 9)) == b"x" * 300 and cache.get(("run", 0)) is None  # the oldest went first
    cache.get(("run", 7))  # used: now the newest
    cache.put(("run", 10), b"y" * 300)
    assert cache.get(("run", 7)) is not None and cache.get(("run", 8)) is None
    cache.put(("run", "huge"), b"z" * 5000)  # over the whole budget: served, never kept
    assert cache.get(("run", "huge")) is None and cache.size <= 1000


async def _asgi_get(app, raw_path: bytes, query: bytes = b"") -> tuple[int, dict]:
    """One GET straight into the ASGI app, with a raw path no HTTP client would send as it is (//evil.com/)."""
    from urllib.parse import unquote

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": unquote(raw_path.decode("latin-1")), "raw_path": raw_path, "root_path": "",
             "query_string": query, "server": ("192.0.2.7", 8765), "client": ("192.0.2.9", 5000),
             "headers": [(b"host", b"192.0.2.7:8765")]}
    started = {}

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        if message["type"] == "http.response.start":
            started.update(status=message["status"],
                           headers={k.decode().lower(): v.decode() for k, v in message["headers"]})

    await app(scope, receive, send)
    return started["status"], started["headers"]


@pytest.mark.parametrize("raw, expected", [
    (b"//evil.com/", "/"), (b"/\\evil.com/", "/"), (b"/%09/evil.com", "/%09/evil.com"), (b"///evil.com", "/"),
    (b"/\\\\evil.com", "/"), (b"/runs/1", "/runs/1"), (b"/search", "/search?q=x"), (b"", "/"),
])
def test_the_token_redirect_stays_on_this_site(tiny, raw, expected):
    token = "a-long-enough-token"
    app = create_app(tiny["catalog"], token=token)
    query = f"token={token}" + ("&q=x" if raw == b"/search" else "")
    status, headers = asyncio.run(_asgi_get(app, raw, query.encode()))
    assert status == 303 and headers["location"] == expected
