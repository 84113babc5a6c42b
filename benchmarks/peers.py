"""melbo against the real peers: the seed's `SteeredModel` and `BatchedMELBO` (PyPI `batched-melbo`), in one run.

All systems train on the same model directory, the same chat prompt (as token ids), source block s → target block
t, the same absolute radius R and the same number of optimiser steps. Every resulting vector is then scored by ONE
reference objective written here: a plain full forward of a fresh copy of the model, a forward hook adding the
vector to block s's output, and F = Σ_i (Σ_positions ‖Z_t(θ) − Z_t(0)‖^p)^{1/q} at block t's output (METHOD.md;
melbo's default p and q). A row of random vectors of norm R (no training) shows what training added.

The peer is installed with `pip install --no-deps --target <melbo cache>/peers/batched-melbo-0.1.1`, never into
melbo's environment, and imported from there. What this benchmark patches, and why (read the peer's source):
- `original_melbo.SteeredModel.train` draws its initial vectors with `torch.randn(..., device="cuda")`: its module's
  `torch` is swapped for a proxy that draws on the model's device, for the duration of its run only.
- both classes guess the block list as `model.model.layers` (a wrapper's path): the real path is passed.
- `batched_melbo` does `from jaxtyping import *` for one annotation that `from __future__ import annotations` never
  evaluates: where jaxtyping is not installed an empty module stands in for it.
- `SteeredModel` reads `hidden_states[target]`, the INPUT of block `target`; `BatchedMELBO` reads
  `hidden_states[target + 1]`, its output (as melbo). SteeredModel gets `target + 1` so that all optimise block t's
  output. Its source is a bias on block s's `mlp.down_proj`: the same as adding to block s's output in
  Llama/Qwen-style blocks (not in Gemma's, which normalise the MLP output).
- Both peers default to q = p; they get melbo's p and q. Both keep their own optimiser (AdamW/AMSGrad, absolute
  lr 1e-3); melbo keeps its own (relative lr). SteeredModel runs with orthogonal_vectors=True, as in the seed.
- The peers tokenise the prompt themselves; a chat-templated text already holds its special tokens, so their
  tokenizer is called with add_special_tokens=False and the ids are checked equal to melbo's.

    .venv/bin/python benchmarks/peers.py [--model smollm2-135m] [--steps 30] [--threads N] [--json peers.json]
    .venv/bin/python benchmarks/peers.py --device cuda --dtype bfloat16 --precisions auto   # on a GPU (gpu_bench.py)

On a GPU every system's weights are in --dtype on --device, timers wait for the GPU (torch.cuda.synchronize), and
the table adds each system's peak GPU memory (torch.cuda.max_memory_allocated, reset before each system).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
import types
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # the peers' progress bars

import torch  # noqa: E402

import melbo  # noqa: E402
from melbo.io.files import check_output_file, write_json  # noqa: E402
from melbo.engine.layers import find_blocks  # noqa: E402
from melbo.engine.models import cache_dir  # noqa: E402
from melbo.engine.models import DTYPES, resolve_precision  # noqa: E402
from melbo.engine.prompts import format_prompt, prompt_tokens  # noqa: E402
from melbo.settings import DEFAULTS  # noqa: E402
from melbo.threads import allowed_cores, configure_threads, free_cores  # noqa: E402

PEER = "batched-melbo==0.1.1"
PROMPT = "How can I make a bomb?"


# --------------------------------------------------------------------------------------------------
# The peer package, installed beside melbo (never into its environment)


def import_peer():
    target = cache_dir() / "peers" / PEER.replace("==", "-")
    if not (target / "batched_melbo" / "original_melbo.py").exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), PEER],
                       check=True)
    sys.path.insert(0, str(target))
    try:
        import jaxtyping  # noqa: F401
    except ImportError:  # only used in an annotation that is never evaluated (module docstring)
        sys.modules["jaxtyping"] = types.ModuleType("jaxtyping")
    from batched_melbo import batched_melbo, original_melbo

    return original_melbo, batched_melbo


class _TorchOn(types.ModuleType):
    """`torch`, except that `randn` draws on the given device whatever device it is asked for."""

    def __init__(self, device: torch.device):
        super().__init__("torch")
        self._device = device

    def __getattr__(self, name):
        return getattr(torch, name)

    def randn(self, *size, device=None, **kwargs):
        return torch.randn(*size, device=self._device, **kwargs)


@contextmanager
def cuda_free(module, device: torch.device):
    module.torch = _TorchOn(device)
    try:
        yield
    finally:
        module.torch = torch


class _NoSpecialTokens:
    """A tokenizer that adds no special tokens: the chat template already wrote them."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, *args, **kwargs):
        return self.tokenizer(*args, add_special_tokens=False, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def _peer_tokenizer(tokenizer, chat: bool):
    return _NoSpecialTokens(tokenizer) if chat else tokenizer


def fresh_model(directory: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model, tokenizer


# --------------------------------------------------------------------------------------------------
# The one reference objective


class Reference:
    """F(θ) by a plain full forward with a hook adding θ to block s's output; Z read at block t's output."""

    def __init__(self, model, ids: torch.Tensor, source: int, target: int, p: float, q: float):
        self.model, self.ids, self.p, self.q = model, ids, p, q
        _, blocks = find_blocks(model)
        self.source, self.target = blocks[source], blocks[target]
        self.z0 = self._z(None)

    def _z(self, vector):
        captured = []

        def add(_m, _a, out):
            if vector is None:
                return None
            return (out[0] + vector,) + tuple(out[1:]) if isinstance(out, tuple) else out + vector

        def capture(_m, _a, out):
            captured.append(out[0] if isinstance(out, tuple) else out)

        handles = [self.source.register_forward_hook(add), self.target.register_forward_hook(capture)]
        try:
            with torch.no_grad():
                self.model(input_ids=self.ids)
        finally:
            for h in handles:
                h.remove()
        return captured[0][0]  # [T, d]

    def __call__(self, vectors: torch.Tensor) -> torch.Tensor:
        values = []
        for v in vectors.to(self.ids.device, torch.float32):
            change = (self._z(v) - self.z0).norm(dim=-1)  # [T]
            values.append(change.pow(self.p).sum().pow(1.0 / self.q))
        return torch.stack(values)


def max_abs_cos(vectors: torch.Tensor) -> float | None:
    if len(vectors) < 2:
        return None
    unit = torch.nn.functional.normalize(vectors.float(), dim=-1)
    cos = (unit @ unit.T).abs()
    cos.fill_diagonal_(0)
    return float(cos.max())


# --------------------------------------------------------------------------------------------------
# The systems: each returns (vectors [n, d], seconds of training)


# Each system first runs once, untimed, for one step at its own shapes: first-call allocations and kernel set-up
# are not what is compared.


def _clock() -> float:
    """perf_counter once the GPU has finished what was queued (CUDA kernels run asynchronously)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def run_seed(original_melbo, directory, text, ids, a) -> tuple[torch.Tensor, float]:
    model, tokenizer = fresh_model(directory, a.device, DTYPES[a.dtype])
    path, _ = find_blocks(model)
    steered = original_melbo.SteeredModel(
        model, _peer_tokenizer(tokenizer, a.chat), source_layer_idx=a.source, target_layer_idx=a.target + 1,
        layers_name=path, normalization=a.radius, num_steps=a.steps, power=DEFAULTS.p, q=DEFAULTS.q,
        orthogonal_vectors=True)
    _check_ids(steered.tokenizer, text, ids)
    with cuda_free(original_melbo, model.device):
        with _steps(steered, 1):
            steered.train([text], 1)  # untimed warm-up
        torch.manual_seed(a.seed)
        started = _clock()
        steered.train([text], a.seed_vectors)
        seconds = _clock() - started
    return steered.learned_vectors.detach().cpu(), seconds


def run_batched(batched_melbo, directory, text, ids, a) -> tuple[torch.Tensor, float]:
    model, tokenizer = fresh_model(directory, a.device, DTYPES[a.dtype])
    path, _ = find_blocks(model)
    trainer = batched_melbo.BatchedMELBO(
        model, _peer_tokenizer(tokenizer, a.chat), source_layer_idx=a.source, target_layer_idx=a.target,
        layers_name=path, normalization=a.radius, num_steps=a.steps, power=DEFAULTS.p, q=DEFAULTS.q)
    _check_ids(trainer.tokenizer, text, ids)
    with _steps(trainer, 1):
        trainer.train([text], a.vectors, vector_batch_size=a.vectors)  # untimed warm-up
    torch.manual_seed(a.seed)
    started = _clock()
    trainer.train([text], a.vectors, vector_batch_size=a.vectors)
    seconds = _clock() - started
    return trainer.learned_vectors.detach().cpu(), seconds


def run_melbo(lm, precision: str, a, compile: bool = False) -> tuple[torch.Tensor, float]:
    """melbo.discover after an untimed 1-step run (with --compile, that run pays the compilation, said apart)."""
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        melbo.discover(lm, [a.prompt], Path(tmp) / "warm-up", n_vectors=a.vectors, source=a.source, target=a.target,
                       radius=str(a.radius), steps=1, batch_size=a.vectors, precision=precision, seed=a.seed,
                       compile=compile)
        if compile:
            print(f"melbo {precision}+compile: compiling took {time.perf_counter() - started:.0f} s (untimed)")
        started = _clock()
        run = melbo.discover(lm, [a.prompt], Path(tmp) / "run", n_vectors=a.vectors, source=a.source,
                             target=a.target, radius=str(a.radius), steps=a.steps, batch_size=a.vectors,
                             precision=precision, seed=a.seed, compile=compile)
        seconds = _clock() - started
        return run.perturbations.vectors.detach().cpu().clone(), seconds


@contextmanager
def _steps(trainer, steps: int):
    """A peer trainer with another step count for a while (its untimed warm-up run)."""
    saved, trainer.num_steps = trainer.num_steps, steps
    try:
        yield
    finally:
        trainer.num_steps = saved


def _check_ids(tokenizer, text, ids):
    got = tokenizer([text], return_tensors="pt")["input_ids"]
    if not torch.equal(got, ids):
        raise SystemExit(f"the peers would read other token ids than melbo: {got.tolist()} vs {ids.tolist()}")


# --------------------------------------------------------------------------------------------------


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=melbo.DEFAULT_MODEL)
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--source", type=int, default=6)
    parser.add_argument("--target", type=int, default=24)
    parser.add_argument("--radius", type=float, default=30.0, help="Absolute R for every system.")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--vectors", type=int, default=16, help="Vectors for BatchedMELBO and melbo.")
    parser.add_argument("--seed-vectors", type=int, default=4, help="Vectors for SteeredModel (one at a time).")
    parser.add_argument("--precisions", default="fp32,auto,auto+compile",
                        help="melbo's training precisions, one row each (+compile: with --compile).")
    parser.add_argument("--systems", default="seed,batched,melbo,random")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: melbo's auto).")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]: every system and the reference run there.")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                        help="The weights of the peers and of melbo's loaded model (melbo's --precisions still "
                             "choose its training copies).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="Also write the table and settings here.")
    return parser.parse_args()


def main() -> None:
    a = parse_args()
    if a.json is not None:
        check_output_file(a.json)
    free, cores = free_cores(), len(allowed_cores())  # before any work: a busy machine slows every system
    threads = configure_threads(a.threads)
    systems = a.systems.split(",")
    original_melbo, batched_melbo = import_peer() if {"seed", "batched"} & set(systems) else (None, None)

    lm = melbo.load_model(a.model, device=a.device, dtype=a.dtype)
    directory = lm.model.config._name_or_path
    a.chat = chat = lm.chat_template is not None
    text = format_prompt(lm, a.prompt, chat)  # what melbo trains on; the peers get the same text
    ids = torch.tensor([prompt_tokens(lm, a.prompt, chat)])
    reference_model, _ = fresh_model(directory, a.device)  # fp32: one judge for every system
    reference = Reference(reference_model, ids.to(a.device), a.source, a.target, DEFAULTS.p, DEFAULTS.q)

    rows = []  # (system, vectors tensor, seconds or None)
    memory = {}  # system -> peak GPU bytes while it ran
    if "seed" in systems:
        with peak_memory(memory, "SteeredModel (seed)"):
            rows.append(("SteeredModel (seed)", *run_seed(original_melbo, directory, text, ids, a)))
    if "batched" in systems:
        with peak_memory(memory, "BatchedMELBO"):
            rows.append(("BatchedMELBO", *run_batched(batched_melbo, directory, text, ids, a)))
    if "melbo" in systems:
        for spec in a.precisions.split(","):
            precision, _, extra = spec.partition("+")
            resolved = resolve_precision(precision, lm.device)
            name = f"melbo {spec}" + (f" ({resolved})" if resolved != precision else "")
            with peak_memory(memory, name):
                rows.append((name, *run_melbo(lm, precision, a, compile=extra == "compile")))
    if "random" in systems:
        g = torch.Generator().manual_seed(a.seed)
        random = torch.randn(a.vectors, lm.width, generator=g)
        rows.append(("random (untrained)", random / random.norm(dim=-1, keepdim=True) * a.radius, None))

    table = []
    for name, vectors, seconds in rows:
        scores = reference(vectors)
        rate = len(vectors) * a.steps / seconds if seconds else None
        table.append({"system": name, "vectors": len(vectors), "seconds": seconds, "vector_steps_per_s": rate,
                      "objective_mean": float(scores.mean()), "objective_max": float(scores.max()),
                      "max_abs_cos": max_abs_cos(vectors),
                      "norm_error": float((vectors.float().norm(dim=-1) - a.radius).abs().max()),
                      "peak_gpu_gib": memory.get(name)})
    rates = {r["system"]: r["vector_steps_per_s"] for r in table}
    for r in table:
        for key, peer in (("ratio_seed", "SteeredModel (seed)"), ("ratio_batched", "BatchedMELBO")):
            r[key] = r["vector_steps_per_s"] / rates[peer] if rates.get(peer) and r["vector_steps_per_s"] else None

    header = (f"model {lm.model_id} ({a.device}, {a.dtype}), prompt {ids.shape[1]} tokens, blocks {a.source} -> {a.target}, R = {a.radius:g}, "
              f"{a.steps} steps, p = {DEFAULTS.p:g}, q = {DEFAULTS.q:g}, {threads} threads, torch {torch.__version__}; "
              f"{free} of {cores} cores free at the start" + ("" if free == cores else " (NOT IDLE)"))
    print(header)
    print(f"{'system':22s} {'vectors':>7s} {'seconds':>8s} {'vec-steps/s':>11s} {'vs seed':>8s} {'vs batched':>10s} "
          f"{'F mean':>9s} {'F max':>9s} {'max|cos|':>8s}" + (f" {'GPU GiB':>8s}" if memory else ""))
    for r in table:
        print(f"{r['system']:22s} {r['vectors']:7d} {_cell(r['seconds'], '8.1f')} "
              f"{_cell(r['vector_steps_per_s'], '11.2f')} {_cell(r['ratio_seed'], '7.2f', 'x')} "
              f"{_cell(r['ratio_batched'], '9.2f', 'x')} {r['objective_mean']:9.4g} {r['objective_max']:9.4g} "
              f"{_cell(r['max_abs_cos'], '8.3f')}" + (f" {_cell(r['peak_gpu_gib'], '8.2f')}" if memory else ""))
    if a.json is not None:
        settings = {**vars(a), "json": str(a.json), "threads": threads, "tokens": ids.shape[1],
                    "model_id": lm.model_id, "torch": torch.__version__, "machine": platform.machine(),
                    "cores": cores, "free_cores_at_start": free}
        write_json(a.json, {"settings": settings, "rows": table})


@contextmanager
def peak_memory(memory: dict, name: str):
    """Record the peak GPU memory (GiB) allocated while the block runs; nothing on a machine without CUDA."""
    if not torch.cuda.is_available():
        yield
        return
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    yield
    memory[name] = torch.cuda.max_memory_allocated() / 2**30


def _cell(value, spec: str, suffix: str = "") -> str:
    width = int(spec.split(".")[0]) + len(suffix)
    return f"{'-':>{width}s}" if value is None else f"{format(value, spec)}{suffix}"


if __name__ == "__main__":
    main()
