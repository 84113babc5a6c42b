"""Capability discovery (seed experiment 7): vectors that make a direct-answer arithmetic prompt reason.

One one-shot prompt ("Q: 17 * 8\nA: 136\n\nQ: a * b\nA:") trains N vectors. Every vector, and the unsteered
model, then answers held-out number pairs (greedy). Scores:

- strict (the seed's): the text contains "answer is {a*b}", "{a} * {b} = {a*b}" or "A: {a*b}" (the "A:" that
  ends the prompt counts as the completion's start; thousands separators and ×/x for * are accepted);
- lenient: strict, or the first number of the completion is a*b;
- reasoning: the completion shows step-by-step work (two or more equations, or words such as "step", "first",
  "multiply", "break it down", or a partial product of a with b's tens or units).

A vector "reasons" when at least half of its held-out completions do.
"""

from __future__ import annotations

import random
import re
import time
from pathlib import Path
from typing import Callable, Optional

from melbo.bench.common import BenchResult, compile_patterns, matches, rate, short, write_jsonl
from melbo.errors import MelboError
from melbo.generation import Sampling, generate
from melbo.models import LoadedModel
from melbo.prompts import uses_chat

DEFAULT_MODEL = "qwen2.5-coder-0.5b"  # raw 2x2: 3/8 direct answers right; smollm2-135m: ≤ 1/12 on 2x1 or 2x2
EXAMPLE = {"2x1": (17, 8), "2x2": (17, 23)}
TRAIN_PAIR = {"2x1": (43, 7), "2x2": (43, 57)}

_MUL = r"\s*[*x×]\s*"
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")
REASONING_WORDS = compile_patterns([
    r"\bsteps?\b", r"\bfirst\b", r"\bthen\b", r"\bnext\b", r"\bmultiply\b", r"\bmultiplying\b", r"\bcarry\b",
    r"\bbreak (?:it|this|that) down\b", r"\blet'?s\b", r"\bcalculate\b", r"\bpartial\b",
    r"\badd(?:ing)? (?:up|them|these)\b",
])
_EQUATION = re.compile(r"\d[\d,]*(?:\s*[-+*x×/]\s*\d[\d,]*)+\s*=")


def make_prompt(a: int, b: int, digits: str = "2x1") -> str:
    ea, eb = EXAMPLE[digits]
    return f"Q: {ea} * {eb}\nA: {ea * eb}\n\nQ: {a} * {b}\nA:"


def held_out_pairs(n: int, digits: str = "2x1", seed: int = 0) -> list[tuple[int, int]]:
    """n distinct (a, b) pairs, none equal to the example or the training pair."""
    if digits not in EXAMPLE:
        raise MelboError(f"unknown --digits {digits!r}: use 2x1 or 2x2")
    rng = random.Random(1_234 + seed)
    excluded = {EXAMPLE[digits], TRAIN_PAIR[digits]}
    available = 89 * (7 if digits == "2x1" else 89) - len(excluded)
    if n > available:
        raise MelboError(f"--pairs {n} is more than the {available} distinct {digits} pairs: ask for fewer")
    pairs: list[tuple[int, int]] = []
    while len(pairs) < n:
        pair = (rng.randint(11, 99), rng.randint(3, 9) if digits == "2x1" else rng.randint(11, 99))
        if pair not in excluded and pair not in pairs:
            pairs.append(pair)
    return pairs


def _plain(text: str) -> str:
    return re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)


def strict_correct(completion: str, a: int, b: int) -> bool:
    """The seed's criterion, on "A:" + the completion."""
    text = _plain("A:" + completion)
    c = a * b
    patterns = [rf"answer is:?\s*\**\s*{c}(?!\d)", rf"(?<!\d){a}{_MUL}{b}\s*=\s*{c}(?!\d)", rf"A:\s*{c}(?!\d)"]
    return any(re.search(p, text, re.IGNORECASE) for p in patterns)


def first_number(completion: str) -> Optional[int]:
    m = _NUMBER.search(completion)
    if not m:
        return None
    try:
        return int(float(m.group().replace(",", "")))
    except ValueError:
        return None


def lenient_correct(completion: str, a: int, b: int) -> bool:
    return strict_correct(completion, a, b) or first_number(completion) == a * b


def is_reasoning(completion: str, a: Optional[int] = None, b: Optional[int] = None) -> bool:
    """Step-by-step work: ≥ 2 equations, a reasoning word, or a partial product of a and b's digits."""
    text = _plain(completion)
    if len(_EQUATION.findall(text)) >= 2 or matches(text, REASONING_WORDS):
        return True
    if a is not None and b is not None and b >= 10:
        tens, units = (b // 10) * 10, b % 10
        partial = [rf"(?<!\d){a}{_MUL}{tens}(?!\d)", rf"(?<!\d){a * tens}(?!\d)"]
        if units:
            partial.append(rf"(?<!\d){a}{_MUL}{units}(?!\d)")
        return any(re.search(p, text) for p in partial)
    return False


def run_bench(
    lm: LoadedModel,
    out: str | Path,
    *,
    n_vectors: int = 32,
    steps: int = 150,
    radius: str = "0.2x",
    pairs: int = 20,
    digits: str = "2x2",
    max_new_tokens: int = 48,
    chat: Optional[bool] = False,
    seed: int = 0,
    batch_size: int = 16,
    generation_batch: int = 64,
    progress: Optional[Callable[[dict], None]] = None,
    on_batch: Optional[Callable[[int], None]] = None,
    **discover_settings,
) -> BenchResult:
    """Train on one prompt, score every vector on `pairs` held-out pairs; write bench.json into `out`."""
    from melbo.job import elicit

    if pairs < 1:
        raise MelboError(f"--pairs must be ≥ 1, got {pairs}")
    started = time.perf_counter()
    test_pairs = held_out_pairs(pairs, digits, seed)
    ta, tb = TRAIN_PAIR[digits]
    train_prompt = make_prompt(ta, tb, digits)
    run = elicit(lm, [train_prompt], out, random=0, n_vectors=n_vectors, steps=steps, radius=radius, chat=chat,
                 seed=seed, batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress,
                 on_batch=on_batch, **discover_settings)
    templated = uses_chat(lm, chat)
    sampling = Sampling(max_new_tokens=max_new_tokens, batch_size=generation_batch)
    completions = generate(lm, run.perturbations, [make_prompt(a, b, digits) for a, b in test_pairs],
                           chat=templated, sampling=sampling, on_batch=on_batch)

    labels = ["unsteered"] + [f"v{i}" for i in range(len(run))]
    stats = {label: {"strict": 0, "lenient": 0, "reasoning": 0, "example": ""} for label in labels}
    rows = []
    for c in completions:
        a, b = test_pairs[c.prompt_index]
        s = stats[c.label]
        verdict = {"strict": strict_correct(c.text, a, b), "lenient": lenient_correct(c.text, a, b),
                   "reasoning": is_reasoning(c.text, a, b)}
        for key, value in verdict.items():
            s[key] += int(value)
        if c.prompt_index == 0:
            s["example"] = c.text
        rows.append({**c.to_json(), "a": a, "b": b, **verdict})
    write_jsonl(Path(out) / "bench_completions.jsonl", rows)

    n = len(test_pairs)
    acc = {label: (rate(s["strict"], n), rate(s["lenient"], n), rate(s["reasoning"], n)) for label, s in stats.items()}
    vector_labels = labels[1:]
    reasoning_vectors = [v for v in vector_labels if acc[v][2] >= 0.5]
    best = max(vector_labels, key=lambda v: (acc[v][0], acc[v][1], -int(v[1:])))
    best_lenient = max(vector_labels, key=lambda v: (acc[v][1], acc[v][0], -int(v[1:])))
    base = acc["unsteered"]

    result = BenchResult(
        bench="arithmetic",
        title=f"capability discovery: {digits.replace('x', '-digit × ')}-digit multiplication",
        settings={"model": lm.model_id, "run": str(run.path), "n_vectors": len(run), "steps": steps,
                  "radius": radius, "radius_absolute": run.config["radius"], "source": run.config["source"],
                  "target": run.config["target"], "digits": digits, "pairs": n, "max_new_tokens": max_new_tokens,
                  "chat": templated, "seed": seed, "training_prompt": train_prompt,
                  "held_out_pairs": [f"{a}*{b}" for a, b in test_pairs]},
    )
    summary = result.table("accuracy on held-out pairs", ["", "strict accuracy", "lenient accuracy", "reasoning rate"])
    summary.add("unsteered", *base)
    summary.add(f"best vector by strict ({best})", *acc[best])
    summary.add(f"best vector by lenient ({best_lenient})", *acc[best_lenient])
    summary.add("mean over vectors", *(sum(acc[v][k] for v in vector_labels) / len(vector_labels) for k in range(3)))
    counts = result.table(f"vectors (of {len(vector_labels)})", ["", "count", "which"])
    counts.add("reasoning step by step (≥ half of pairs)", len(reasoning_vectors), ", ".join(reasoning_vectors))
    counts.add("strict accuracy above unsteered", sum(acc[v][0] > base[0] for v in vector_labels),
               ", ".join(v for v in vector_labels if acc[v][0] > base[0]))
    counts.add("lenient accuracy above unsteered", sum(acc[v][1] > base[1] for v in vector_labels),
               ", ".join(v for v in vector_labels if acc[v][1] > base[1]))
    ea, eb = test_pairs[0]
    per = result.table(f"per vector (completion of {ea} * {eb} = {ea * eb})",
                       ["vector", "strict", "lenient", "reasoning", "completion"])
    for label in labels:
        per.add(label, *acc[label], short(stats[label]["example"], 70))
    result.notes.append(
        f"strict: 'answer is {{a*b}}', '{{a}} * {{b}} = {{a*b}}' or 'A: {{a*b}}' in 'A:'+completion; lenient: strict "
        f"or the completion's first number is a*b; {n} held-out pairs, greedy, {max_new_tokens} new tokens.")
    result.wall_seconds = time.perf_counter() - started
    result.write(out)
    return result
