"""Live generation for the web app: one model per process, one forward at a time, streamed, cancellable.

`Engine` owns the loaded model and the line of waiting requests. A request's work runs in a worker thread
holding the engine's lock (the CPU does one forward at a time, and torch's grad mode is per thread, so the whole
generation stays in one thread); the request's coroutine relays the work's events to the browser and, while it
waits, its place in line. When the browser goes away the coroutine ends, sets the work's cancel flag, and the
generation stops before its next forward.

The model is loaded lazily, on the first request that needs it: `--model` if given (every run must have been
made with it; `Run.attach` says so otherwise), else the model each run records. One model is kept in memory:
a run of another model unloads it and loads its own (seconds from melbo's cache), in line like any request.

Events (one JSON object per line): {"queue": k} (k requests ahead; 0 = running), {"status": text},
{"columns": [names]}, {"delta": [new text per column]}, {"done": true}, {"error": text}.
"""

from __future__ import annotations

import asyncio
import gc
import threading
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable, Optional

import torch

from melbo.errors import MelboError
from melbo.engine.generation import Sampling, stream_rows
from melbo.engine.arithmetic import random_vectors
from melbo.engine.intervention import SteeringVectors
from melbo.engine.models import LoadedModel, load_model
from melbo.engine.prompts import check_context, check_conversation, format_messages, prompt_tokens, tokenize, uses_chat
from melbo.engine.store import Run

Emit = Callable[[dict], None]
Work = Callable[["Engine", Callable[[], bool], Emit], None]


class Engine:
    """The process's model and its queue of generation requests."""

    def __init__(self, model_spec: Optional[str] = None, device: str = "cpu", dtype: str = "float32"):
        self.model_spec, self.device, self.dtype = model_spec, device, dtype
        self._lm: Optional[LoadedModel] = None
        self._lock = threading.Lock()  # held by the worker thread for a whole generation
        self._line: list[object] = []  # waiting and running requests, oldest first (touched on the event loop only)
        self.loads = 0  # how many times a model was loaded (a test checks it is once)

    # ---- the model (called in the worker thread, under the lock)
    def model_for(self, run: Run, emit: Optional[Emit] = None) -> LoadedModel:
        spec = self.model_spec or run.config.model.spec
        if self._lm is None or self._lm.spec != spec:
            if emit:
                emit({"status": f"loading model {spec} …"})
            self._lm = None
            gc.collect()  # one model in memory at a time
            self._lm = load_model(spec, device=self.device, dtype=self.dtype)
            self.loads += 1
        run.attach(self._lm)
        # the run's own system prompt: live generation reads the prompts as the run did (the weights are shared)
        return self._lm.with_system(run.config.model.system)

    def use_model(self, lm: LoadedModel) -> None:
        """Give the engine an already-loaded model (tests and the API reuse one)."""
        self._lm = lm

    def run_sync(self, work: Callable[[], object]) -> object:
        """Run `work` in this thread under the model lock (exports that need the model)."""
        with self._lock:
            return work()

    # ---- a request
    @property
    def waiting(self) -> int:
        return len(self._line)

    async def events(self, work: Work, disconnected: Callable[[], Awaitable[bool]]) -> AsyncIterator[dict]:
        """Wait in line (yielding the place), then run `work` in a thread and yield what it emits."""
        ticket = object()
        self._line.append(ticket)
        cancel = threading.Event()
        try:
            shown = None
            while (place := self._line.index(ticket)) > 0:
                if place != shown:
                    shown = place
                    yield {"queue": place}
                if await disconnected():
                    return
                await asyncio.sleep(0.1)
            yield {"queue": 0}
            async for event in self._run(work, cancel, disconnected):
                yield event
        finally:  # the browser left, or the work ended: stop it before its next forward, free the place
            cancel.set()
            self._line.remove(ticket)

    async def _run(self, work: Work, cancel: threading.Event, disconnected) -> AsyncIterator[dict]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def put(event: Optional[dict]) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:  # the loop is gone (server shutting down): nobody is listening
                cancel.set()

        def worker() -> None:
            try:
                with self._lock:
                    if not cancel.is_set():
                        work(self, cancel.is_set, put)
            except MelboError as exc:
                put({"error": str(exc)})
            except Exception as exc:  # a bug must not hang the page: say what failed
                put({"error": f"generation failed ({type(exc).__name__}: {exc})"})
            finally:
                put(None)

        threading.Thread(target=worker, name="melbo-generate", daemon=True).start()
        while True:
            try:
                event = await asyncio.wait_for(queue.get(), 0.25)
            except asyncio.TimeoutError:
                if await disconnected():
                    return
                continue
            if event is None:
                return
            yield event
            if await disconnected():
                return


# ------------------------------------------------------------------------------------------------ what to generate
@dataclass(frozen=True)
class LiveRequest:
    """Try it live: one prompt, the unsteered model beside each chosen perturbation (and a random vector)."""

    prompt: str
    indices: tuple[int, ...]
    scale: float
    max_new_tokens: int
    random: bool = False
    seed: int = 0


@dataclass(frozen=True)
class ChatRequest:
    """One chat turn: the history so far (ending with the user's turn), steered by one perturbation or none."""

    messages: tuple[dict, ...]
    index: Optional[int]
    scale: float
    max_new_tokens: int


def live_work(run: Run, request: LiveRequest) -> Work:
    def work(engine: Engine, cancelled: Callable[[], bool], emit: Emit) -> None:
        lm = engine.model_for(run, emit)
        perturbations, names = _columns(run, request)
        ids = prompt_tokens(lm, request.prompt, uses_chat(lm, run.config.chat))
        check_context(lm, 0, len(ids), request.max_new_tokens)
        emit({"columns": ["unsteered"] + names})
        rows = [None] + list(range(len(names)))
        sampling = Sampling(max_new_tokens=request.max_new_tokens, batch_size=len(rows))
        for deltas in stream_rows(lm, perturbations, ids, rows, sampling, request.scale, cancelled):
            emit({"delta": deltas})
        emit({"done": True})

    return work


def chat_work(run: Run, request: ChatRequest) -> Work:
    def work(engine: Engine, cancelled: Callable[[], bool], emit: Emit) -> None:
        lm = engine.model_for(run, emit)
        uses_chat(lm, True)  # a model without a chat template says so
        ids = tokenize(lm, format_messages(lm, list(request.messages)), templated=True)
        check_conversation(lm, len(ids), request.max_new_tokens, "start a new chat")
        steered = run.perturbations if request.index is not None else None
        emit({"columns": [_name(request.index)]})
        sampling = Sampling(max_new_tokens=request.max_new_tokens, batch_size=1)
        for deltas in stream_rows(lm, steered, ids, [request.index], sampling, request.scale, cancelled):
            emit({"delta": deltas})
        emit({"done": True})

    return work


def _name(index: Optional[int]) -> str:
    return "unsteered" if index is None else f"v{index}"


def _columns(run: Run, request: LiveRequest):
    """The perturbations to stream (selected, plus the random one) and their column names."""
    chosen = run.perturbations.select(list(request.indices))
    names = [f"v{i}" for i in request.indices]
    if not request.random:
        return chosen, names
    if not chosen.supports_random_baseline:
        raise MelboError(f"the random baseline is a random vector, and this run holds {chosen.KIND}: untick 'random'")
    norm = float(chosen.vectors[0].norm())
    random = random_vectors(1, chosen.vectors.shape[-1], norm, chosen.layer, request.seed).vectors
    stacked = SteeringVectors(torch.cat([chosen.vectors, random.to(chosen.vectors.dtype)]), chosen.layer)
    return stacked, names + [f"random (‖v{request.indices[0]}‖)"]
