"""The web app: server-rendered pages over the catalogue, live steered generation, label editing, exports.

Runs and behaviours are addressed by catalogue id only: the browser never names a file. Pages are Jinja2
templates with autoescaping; the one script (static/app.js) streams generation with fetch and writes model text
with textContent. Security (host, token, CSRF, CSP) lives in `melbo.server.security`, in front of every route.
"""

from __future__ import annotations

import io
import json
import math
import tempfile
import threading
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Annotated, Optional

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from jinja2 import Environment, FileSystemLoader

from melbo.errors import MelboError
from melbo.server.bodies import BadBody, ChatBody, LiveBody
from melbo.server.live import ChatRequest, Engine, LiveRequest, chat_work, live_work
from melbo.server.security import CSRF_FIELD, Guard, new_secret
from melbo.settings import (SERVE_MAX_COLUMNS, SERVE_MAX_NEW_TOKENS, SERVE_MAX_PROMPT_CHARS, SERVE_MAX_SCALE,
                            SERVE_MAX_WAITING)

HERE = Path(__file__).parent
MAX_LABEL = 200
MAX_NOTE = 5000
EXPORTS = {"safetensors": "the perturbation as a melbo safetensors file",
           "gguf": "a llama.cpp control vector (--control-vector)",
           "peft": "a PEFT LoRA adapter directory, zipped"}
PLOT_CACHE_BYTES = 32 * 1024 * 1024  # rendered PNGs kept: a few hundred runs' plots, not every name ever asked for


def create_app(catalog_path: Optional[str | Path] = None, model_spec: Optional[str] = None, *,
               token: Optional[str] = None, device: str = "cpu", dtype: str = "float32",
               engine: Optional[Engine] = None) -> Guard:
    """The ASGI app for `melbo serve`: the catalogue at `catalog_path` (None: melbo's default), live generation with
    `model_spec` (None: each run's own model). With `token`, every request must carry it (serving beyond localhost);
    without, only requests addressed to localhost are answered."""
    from melbo.records.catalog import Catalog

    with Catalog(catalog_path):  # a bad path fails now, as one line, not on the first page
        pass
    state = _State(catalog_path, engine or Engine(model_spec, device, dtype), new_secret())
    app = FastAPI(title="melbo", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.melbo = state
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.include_router(router)
    app.add_exception_handler(MelboError, _melbo_error)
    app.add_exception_handler(BadBody, _bad_body)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _bad_address)
    return Guard(app, state.csrf, token)


class _State:
    """What every request of one app shares: the catalogue's path, the engine, the CSRF token, templates, caches."""

    def __init__(self, catalog_path, engine: Engine, csrf: str):
        self.catalog_path, self.engine, self.csrf = catalog_path, engine, csrf
        self.templates = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=True,
                                     trim_blocks=True, lstrip_blocks=True)
        self.runs: dict[int, tuple] = {}  # catalogue id -> (its run_key, the loaded Run): one version per run
        self.plots = PngCache(PLOT_CACHE_BYTES)  # PNG per (run_key, plot name)

    def catalog(self):
        """A connection per request: opening one is cheap, and none is shared by the threads requests run on."""
        from melbo.records.catalog import Catalog

        return Catalog(self.catalog_path)

    def page(self, name: str, status: int = 200, **context) -> HTMLResponse:
        context.update(csrf=self.csrf, csrf_field=CSRF_FIELD, limits=LIMITS)
        return HTMLResponse(self.templates.get_template(name).render(**context), status_code=status)

    def run(self, entry):
        """The run directory behind a catalogue entry, loaded once per version of its config.json."""
        from melbo.engine.store import Run

        key = self.run_key(entry)
        known = self.runs.get(entry.id)
        if known is None or known[0] != key:  # a rewritten config.json replaces the old Run, never piles up
            known = self.runs[entry.id] = (key, Run.load(entry.path))
        return known[1]

    @staticmethod
    def run_key(entry) -> tuple:
        from melbo.engine.store import CONFIG

        config = Path(entry.path) / CONFIG
        return entry.id, str(entry.path), config.stat().st_mtime_ns if config.exists() else None

    def readable_run(self, entry):
        """(run, None), or (None, why) when its directory cannot be read: pages still show the catalogue's data."""
        try:
            return self.run(entry), None
        except MelboError as exc:
            return None, str(exc)


LIMITS = {"prompt_chars": SERVE_MAX_PROMPT_CHARS, "max_new_tokens": SERVE_MAX_NEW_TOKENS,
          "columns": SERVE_MAX_COLUMNS, "scale": SERVE_MAX_SCALE}


async def _melbo_error(request: Request, exc: MelboError):
    return _error(request, 400, str(exc))


async def _bad_body(request: Request, exc: BadBody):
    return _error(request, 422, str(exc))


async def _http_error(request: Request, exc: StarletteHTTPException):
    return _error(request, exc.status_code, str(exc.detail))


async def _bad_address(request: Request, exc: RequestValidationError):
    """A path or query FastAPI cannot parse (/runs/abc): runs and behaviours are addressed by whole-number ids."""
    return _error(request, 404, f"no such page: {request.url.path} (runs and behaviours have whole-number ids)")


def _error(request: Request, status: int, message: str):
    """A user's mistake: JSON for the API (the page's script shows it), an error page otherwise."""
    if request.url.path.startswith("/api/"):
        return JSONResponse({"error": message}, status_code=status)
    return request.app.state.melbo.page("error.html", status, message=message)


def _state(request: Request) -> _State:
    return request.app.state.melbo


State = Annotated[_State, Depends(_state)]  # every route reads the app's state through this
router = APIRouter()


@router.get("/favicon.ico")
def favicon():
    return Response(status_code=204)


@router.get("/", response_class=HTMLResponse)
def runs_page(state: State):
    with state.catalog() as catalog:
        return state.page("runs.html", runs=catalog.runs())


@router.get("/runs/{run_id}", response_class=HTMLResponse)
def run_page(run_id: int, state: State):
    with state.catalog() as catalog:
        entry = _run_entry(catalog, run_id)
        perturbations = catalog.perturbations(run_id)
        samples = {p.id: next(iter(catalog.completions(p.id)), None) for p in perturbations}
        unsteered = catalog.unsteered(run_id)
    run, problem = state.readable_run(entry)
    if entry.kind == "diff":  # most divergent first: the order an auditor reads a diff in
        perturbations = sorted(perturbations, key=lambda p: -(p.metrics or {}).get("kl", float("-inf")))
    return state.page("run.html", run=entry, perturbations=perturbations, clusters=_clusters(perturbations),
                      samples=samples, unsteered=unsteered, plots=_available_plots(run),
                      live=_live_context(entry, perturbations, run), problem=problem,
                      audit=_audit_dir(entry) is not None)


@router.get("/runs/{run_id}/findings", response_class=HTMLResponse)
def findings_page(run_id: int, state: State):
    """The findings of the audit a run belongs to (an audit's arms are its runs), each linked to its behaviour."""
    from melbo.jobs.auditing import load as load_audit
    from melbo.errors import MelboError
    from melbo.jobs.trigger_search import load_triggers

    with state.catalog() as catalog:
        entry = _run_entry(catalog, run_id)
        where = _audit_dir(entry)
        if where is None:
            raise HTTPException(404, f"run {run_id} is not part of a finished audit")
        result = load_audit(where)
        links = {}
        for f in result.findings:
            arm = catalog.run_by_path(where / "runs" / f["example"]["arm"])
            if arm is not None:
                links[f["rank"]] = catalog.perturbation_at(arm.id, f["example"]["index"]).id
    triggers, damaged = {}, None
    try:  # `melbo triggers AUDIT` writes its rankings into the audit (AUDIT/triggers) unless told otherwise
        found = load_triggers(where / "triggers")
        triggers = {t["finding"]: t for t in found["findings"]} if found else {}
    except MelboError as exc:  # the findings stand without their triggers: the page says what to fix
        damaged = str(exc)
    return state.page("findings.html", run=entry, findings=result.findings, dropped=len(result.candidates),
                      settings=result.state["settings"], links=links, triggers=triggers, triggers_error=damaged)


@router.get("/runs/{run_id}/plots/{name}.png")
def plot(run_id: int, name: str, state: State):
    if name not in PLOTS:  # before any lookup or cache entry: the names a client can invent are endless
        raise HTTPException(404, f"no plot named {name[:40]!r}: runs have {' and '.join(PLOTS)}")
    with state.catalog() as catalog:
        entry = _run_entry(catalog, run_id)
    key = (state.run_key(entry), name)
    png = state.plots.get(key)
    if png is None:
        png = _plot_png(state.run(entry), name, run_id)
        if png is None:  # not cached: the run may still be writing its metrics
            raise HTTPException(404, f"run {run_id} has no {name} plot")
        state.plots.put(key, png)
    return Response(png, media_type="image/png")


@router.get("/behaviours/{perturbation_id}", response_class=HTMLResponse)
def behaviour_page(perturbation_id: int, state: State, saved: int = 0):
    with state.catalog() as catalog:
        item = _perturbation(catalog, perturbation_id)
        entry = _run_entry(catalog, item.run_id)
        completions = catalog.completions(perturbation_id)
        similar = _similar(catalog, item)
        siblings = catalog.perturbations(item.run_id)
    run, problem = state.readable_run(entry)
    return state.page("behaviour.html", run=entry, item=item, completions=completions, similar=similar,
                      metrics=_metric_rows(item.metrics), exports=_exports_for(run), saved=bool(saved),
                      live=_live_context(entry, siblings, run, chosen=item.index), problem=problem)


@router.post("/behaviours/{perturbation_id}/label")
async def set_label(perturbation_id: int, request: Request, state: State):
    form = await request.form()
    # an empty field clears the human label (the automatic one shows again) or the note
    label = _bounded_text(form.get("label"), "label", MAX_LABEL)
    note = _bounded_text(form.get("note"), "note", MAX_NOTE)
    with state.catalog() as catalog:
        _perturbation(catalog, perturbation_id)
        catalog.set_label(perturbation_id, label=label, note=note)
    return RedirectResponse(f"/behaviours/{perturbation_id}?saved=1", status_code=303)


@router.get("/behaviours/{perturbation_id}/export/{fmt}")
def export(perturbation_id: int, fmt: str, state: State):
    with state.catalog() as catalog:
        item = _perturbation(catalog, perturbation_id)
        entry = _run_entry(catalog, item.run_id)
    run = state.run(entry)
    if fmt not in _exports_for(run):
        raise HTTPException(404, f"this run cannot be exported as {fmt}: use one of {', '.join(_exports_for(run))}")
    name, data, media = _export(state, run, item.index, fmt, entry.id)
    return Response(data, media_type=media, headers={"content-disposition": f'attachment; filename="{name}"'})


@router.get("/runs/{run_id}/chat", response_class=HTMLResponse)
def chat_page(run_id: int, state: State):
    with state.catalog() as catalog:
        entry = _run_entry(catalog, run_id)
        perturbations = catalog.perturbations(run_id)
    return state.page("chat.html", run=entry, perturbations=perturbations)


@router.get("/search", response_class=HTMLResponse)
def search_page(state: State, q: str = ""):
    query = _bounded_text(q, "query", 200).strip()
    with state.catalog() as catalog:
        hits = catalog.search(query, limit=50) if query else []
    return state.page("search.html", query=query, hits=hits)


@router.post("/api/runs/{run_id}/live")
async def live_stream(run_id: int, request: Request, state: State):
    run, body = await _run_and_json(state, run_id, request)
    work = live_work(run, _live_request(body, len(run)))
    return _ndjson(_in_line(state, work, request))


@router.post("/api/runs/{run_id}/chat")
async def chat_stream(run_id: int, request: Request, state: State):
    run, body = await _run_and_json(state, run_id, request)
    work = chat_work(run, _chat_request(body, len(run)))
    return _ndjson(_in_line(state, work, request))


@router.post("/runs/{run_id}/live", response_class=HTMLResponse)
async def live_form(run_id: int, request: Request, state: State):
    """Try it live without JavaScript: the same generation, rendered when it is complete."""
    with state.catalog() as catalog:
        entry = _run_entry(catalog, run_id)
    run = state.run(entry)
    form = await request.form()
    # the form's text fields as they came: the body model reads "4" as 4 and says what is wrong with "abc"
    body = {k: form.get(k) for k in ("prompt", "scale", "max_new_tokens") if form.get(k) is not None}
    body.update(perturbations=form.getlist("perturbations"), random=form.get("random") == "on")
    asked = _live_request(body, len(run))
    columns, texts = [], []
    async for event in _in_line(state, live_work(run, asked), request):
        if "error" in event:
            raise MelboError(event["error"])
        columns = event.get("columns", columns)
        texts = texts or [""] * len(columns)
        for k, delta in enumerate(event.get("delta", [])):
            texts[k] += delta
    return state.page("live_result.html", run=entry, prompt=asked.prompt, columns=list(zip(columns, texts)))


# ------------------------------------------------------------------------------------------------ lookups
def _run_entry(catalog, run_id: int):
    try:
        return catalog.run(run_id)
    except (LookupError, OverflowError, MelboError):  # OverflowError: an id beyond SQLite's integers
        raise HTTPException(404, f"no run {run_id} in the catalogue") from None


def _perturbation(catalog, perturbation_id: int):
    try:
        return catalog.perturbation(perturbation_id)
    except (LookupError, OverflowError, MelboError):
        raise HTTPException(404, f"no behaviour {perturbation_id} in the catalogue") from None


def _similar(catalog, item) -> list:
    try:
        return catalog.similar(item.run_id, item.index, k=5)
    except MelboError:  # e.g. no other run of this model: the page shows none
        return []


def _audit_dir(entry) -> Optional[Path]:
    """AUDIT when the run lives at AUDIT/runs/ARM of a finished audit (melbo.audit), else None."""
    from melbo.jobs.auditing import FINDINGS

    path = Path(entry.path)
    audit = path.parent.parent
    return audit if path.parent.name == "runs" and (audit / FINDINGS).is_file() else None


def _clusters(perturbations) -> list[tuple[str, list]]:
    groups: dict[str, list] = {}
    for p in perturbations:
        groups.setdefault("no cluster" if p.cluster is None else str(p.cluster), []).append(p)
    return sorted(groups.items(), key=lambda kv: (kv[0] == "no cluster", kv[0]))


def _metric_rows(metrics: Optional[dict]) -> list[tuple[str, str]]:
    rows = []
    for key, value in sorted((metrics or {}).items()):
        if isinstance(value, float):
            value = f"{value:.4g}" if math.isfinite(value) else "—"
        elif isinstance(value, (dict, list)):
            value = json.dumps(value)[:200]
        rows.append((str(key).replace("_", " "), str(value)))
    return rows


def _live_context(entry, perturbations, run, chosen: Optional[int] = None) -> dict:
    return {"run_id": entry.id, "choices": [(p.index, p.name) for p in perturbations],
            "chosen": chosen if chosen is not None else (perturbations[0].index if perturbations else None),
            "random": run is not None and run.perturbations is not None
                      and run.perturbations.supports_random_baseline,
            "ready": run is not None and run.perturbations is not None, "readable": run is not None}


# ------------------------------------------------------------------------------------------------ input
def _bounded_text(value, what: str, limit: int) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise MelboError(f"{what} must be text")
    if len(value) > limit:
        raise MelboError(f"the {what} has {len(value)} characters, more than the limit of {limit}: shorten it")
    return value


def _live_request(body: dict, count: int) -> LiveRequest:
    live = LiveBody.parse(body, count)
    return LiveRequest(live.prompt, tuple(live.perturbations), live.scale, live.max_new_tokens, random=live.random)


def _chat_request(body: dict, count: int) -> ChatRequest:
    chat = ChatBody.parse(body, count)
    messages = tuple({"role": m.role, "content": m.content} for m in chat.messages)
    return ChatRequest(messages, chat.perturbation, chat.scale, chat.max_new_tokens)


async def _run_and_json(state: _State, run_id: int, request: Request):
    with state.catalog() as catalog:
        entry = _run_entry(catalog, run_id)
    run = state.run(entry)
    if run.perturbations is None:
        raise MelboError(f"run {run_id} is not finished: resume it with `melbo discover --resume`")
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise MelboError("the request body is not JSON") from None
    except RecursionError:  # [[[[…]]]] a thousand deep: json gives up before any field is read
        raise BadBody("the request body nests too deeply: send a flat JSON object") from None
    if not isinstance(body, dict):
        raise MelboError("the request body must be a JSON object")
    return run, body


def _in_line(state: _State, work, request: Request):
    """The request's place in the engine's line, or 503 when the line is full (a flood must not queue forever)."""
    if state.engine.waiting >= SERVE_MAX_WAITING:
        raise HTTPException(503, f"the server is busy: {state.engine.waiting} requests are waiting; try again soon")
    return state.engine.events(work, request.is_disconnected)


def _ndjson(events) -> StreamingResponse:
    async def lines():
        async for event in events:
            yield json.dumps(event) + "\n"

    # no-transform / X-Accel-Buffering: proxies must pass each line on as it comes
    return StreamingResponse(lines(), media_type="application/x-ndjson",
                             headers={"cache-control": "no-store, no-transform", "x-accel-buffering": "no"})


# ------------------------------------------------------------------------------------------------ plots, exports
PLOTS = ("learned-vs-random", "curves")


def _available_plots(run) -> list[str]:
    from melbo.engine.store import METRICS

    found = []
    if run is None:
        return found
    if (run.path / METRICS).exists():
        found.append("learned-vs-random")
    if run.curves is not None:
        found.append("curves")
    return found


def _plot_png(run, name: str, run_id: int) -> Optional[bytes]:
    """The report's own plots (melbo.io.plots), as PNG bytes; None when the run has no data for it."""
    import base64

    from melbo.io import plots
    from melbo.judging.assess import Metrics
    from melbo.engine.store import METRICS

    try:
        metrics = Metrics.load(run.path) if name == "learned-vs-random" else None
        if metrics is not None:
            figure = plots.learned_vs_random_figure(metrics.to_dict())
        elif name == "curves" and run.curves is not None:
            figure = plots.curves_figure(run.curves.tolist())
        else:
            return None
        encoded = plots.png(figure)
    except MelboError as exc:  # a damaged metrics.json, named by its reader
        raise HTTPException(422, str(exc)) from None
    except (AttributeError, KeyError, IndexError, TypeError, ValueError) as exc:
        # the run's files are the user's to edit: a shape the plotting code does not expect is their mistake
        raise HTTPException(422, f"run {run_id}'s {METRICS if name == 'learned-vs-random' else 'curves'} cannot "
                                 f"be plotted ({type(exc).__name__}): re-run `melbo report` on it") from None
    return base64.b64decode(encoded) if encoded else None


class PngCache:
    """Rendered plots, least recently used first out, within a byte budget. Routes run in a thread pool: locked."""

    def __init__(self, budget: int):
        self.budget, self.size = budget, 0
        self._items: OrderedDict[tuple, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: tuple) -> Optional[bytes]:
        with self._lock:
            if key not in self._items:
                return None
            self._items.move_to_end(key)
            return self._items[key]

    def put(self, key: tuple, png: bytes) -> None:
        if len(png) > self.budget:  # served once, never kept: it would push out everything else
            return
        with self._lock:
            old = self._items.pop(key, None)
            self.size -= len(old) if old is not None else 0
            self._items[key] = png
            self.size += len(png)
            while self.size > self.budget:
                _, dropped = self._items.popitem(last=False)
                self.size -= len(dropped)


def _exports_for(run) -> dict[str, str]:
    if run is None or run.perturbations is None:
        return {}
    return {k: EXPORTS[k] for k in run.perturbations.export_formats}


def _export(state: _State, run, index: int, fmt: str, run_id: int) -> tuple[str, bytes, str]:
    """(file name, bytes, media type) of one perturbation exported with melbo.records.export."""
    from melbo.records import export as exporting

    stem = f"run{run_id}-v{index}"
    with tempfile.TemporaryDirectory(prefix="melbo-export-") as tmp:
        out = Path(tmp)
        if fmt == "safetensors":
            one = run.perturbations.select([index])
            one.save(out / "x.safetensors", {"model": run.config.model.id, "method": run.config.method,
                                             "index": index})
            return f"{stem}.safetensors", (out / "x.safetensors").read_bytes(), "application/octet-stream"
        if fmt == "gguf":
            architecture, depth = _gguf_model(run, run_id)
            [path] = exporting.export_llamacpp(run.perturbations, out, architecture, depth, [index])
            return f"{stem}.gguf", path.read_bytes(), "application/octet-stream"
        engine = state.engine
        lm = engine.run_sync(lambda: engine.model_for(run))
        [directory] = exporting.export_peft(run.perturbations, lm, out, [index])
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for file in sorted(directory.iterdir()):
                archive.write(file, f"{stem}/{file.name}")
        return f"{stem}-peft.zip", buffer.getvalue(), "application/zip"


def _gguf_model(run, run_id: int) -> tuple[str, int]:
    """The model's architecture and depth from the run's config.json, which a user may have edited or damaged."""
    architecture, depth = run.config.model.architecture, run.config.model.depth  # typed as the run loaded
    fix = "restore the run's config.json as `melbo discover` wrote it, or export safetensors instead"
    if architecture is None or not architecture.strip():
        raise HTTPException(422, f"run {run_id}'s config.json has no model.architecture (got "
                                 f"{str(architecture)[:40]!r}), which a gguf file needs: {fix}")
    if depth is None:
        raise HTTPException(422, f"run {run_id}'s config.json has no usable model.depth (got {str(depth)[:40]!r}), "
                                 f"which a gguf file needs: {fix}")
    return architecture, depth
