"""Capability discovery (seed experiment 7): vectors that make a direct-answer arithmetic prompt reason.

One one-shot prompt ("Q: 17 * 8\nA: 136\n\nQ: a * b\nA:") trains N vectors. The seed's protocol, at a fair budget
(256 new tokens, enough to finish the reasoning): every learned vector, K random vectors of the same norm and the
unsteered model answer a few selection problems; the best learned and the best random vector (most strict hits)
are then scored with the unsteered model on ≥ 50 other problems, with Wilson intervals, and compared pairwise on
the same problems (exact McNemar). Scores:

- strict (the seed's): the text contains "answer is {a*b}", "{a} * {b} = {a*b}" or "A: {a*b}" (the "A:" that
  ends the prompt counts as the completion's start; thousands separators and ×/x for * are accepted);
- lenient: strict, or the first number of the completion is a*b;
- reasoning: the completion shows step-by-step work (two or more equations, or words such as "step", "first",
  "multiply", "break it down", or a partial product of a with b's tens or units).

"""

from __future__ import annotations

import random
import re
import time
from pathlib import Path
from typing import Optional

import torch

from melbo.bench.common import (BenchResult, OnBatch, Progress, compile_patterns, keyword_settings, matches, short,
                                write_jsonl)
from melbo.bench.settings import ArithmeticSettings
from melbo.errors import MelboError
from melbo.engine.models import LoadedModel

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
MEASURES = ("strict", "lenient", "reasoning")
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


def _verdict(pairs: list[tuple[int, int]]):
    def verdict(c) -> dict[str, bool]:
        a, b = pairs[c.prompt_index]
        return {"strict": strict_correct(c.text, a, b), "lenient": lenient_correct(c.text, a, b),
                "reasoning": is_reasoning(c.text, a, b)}
    return verdict


def _best(steered, labels: list[str]) -> Optional[str]:
    """The label with the most strict, then lenient, then reasoning hits on the selection problems (first wins)."""
    def score(label: str) -> tuple:
        found = steered.verdicts(label)
        return tuple(sum(v[k] for v in found) for k in MEASURES)
    return max(labels, key=score) if labels else None


class ArithmeticBench:
    """Train on one prompt; choose the best learned and the best random vector on `select` problems; score
    them and the unsteered model on `problems` other problems (greedy), with intervals and paired tests."""

    name = "arithmetic"
    title = "capability discovery: multiplication, vector chosen on other problems than it is scored on"
    settings = ArithmeticSettings

    def generations(self, s: ArithmeticSettings) -> int:
        return (s.discover.n_vectors + s.randoms + 1) * s.select + 3 * s.problems

    def run(self, lm: LoadedModel, out: str | Path, s: ArithmeticSettings, progress: Progress = None,
            on_batch: OnBatch = None) -> BenchResult:
        from melbo.bench.steer import generate_and_detect, steer_and_detect
        from melbo.engine.generation import Sampling
        from melbo.engine.intervention import SteeringVectors

        for name in ("problems", "select"):
            if getattr(s, name) < 1:
                raise MelboError(f"--{name} must be ≥ 1, got {getattr(s, name)}")
        started = time.perf_counter()
        # The problems do not depend on the discovery seed: --seeds then measures discovery's spread alone.
        everything = held_out_pairs(s.select + s.problems, s.digits)
        selection, scored = everything[: s.select], everything[s.select:]
        ta, tb = TRAIN_PAIR[s.digits]
        train_prompt = make_prompt(ta, tb, s.digits)
        steered = steer_and_detect(lm, [train_prompt], out, s, _verdict(selection),
                                   test_prompts=[make_prompt(a, b, s.digits) for a, b in selection],
                                   progress=progress, on_batch=on_batch, chat=s.discover.chat)
        run = steered.run
        best, best_random = _best(steered, steered.learned), _best(steered, steered.random)
        chosen = [label for label in (best, best_random) if label is not None]
        rows = [steered.run.vectors[int(best[1:])]] + ([steered.random_vectors.vectors[int(best_random[6:])]]
                                                       if best_random else [])
        final = generate_and_detect(lm, SteeringVectors(torch.stack(rows), run.config.source), chosen,
                                    [make_prompt(a, b, s.digits) for a, b in scored], _verdict(scored),
                                    chat=steered.chat, on_batch=on_batch,
                                    sampling=Sampling(max_new_tokens=s.discover.max_new_tokens, batch_size=s.generation_batch))
        outcome = {label: [v for c, v in sorted(((c, v) for c, v in final if c.label == label),
                                                 key=lambda cv: cv[0].prompt_index)] for label in ["unsteered"] + chosen}
        write_jsonl(Path(out) / "bench_completions.jsonl",
                    [{**c.to_json(), "set": "selection", "a": selection[c.prompt_index][0],
                      "b": selection[c.prompt_index][1], **v} for c, v in zip(steered.completions, steered.found)] +
                    [{**c.to_json(), "set": "scored", "a": scored[c.prompt_index][0], "b": scored[c.prompt_index][1],
                      **v} for c, v in final])

        result = BenchResult(self.name, self.title, settings={
            **s.to_json(), "model": lm.model_id, "run": str(run.path), "n_vectors": len(run),
            "n_random": len(steered.random), "radius_absolute": run.config.radius, "source": run.config.source,
            "target": run.config.target, "chat": steered.chat, "training_prompt": train_prompt,
            "best_learned": best, "best_random": best_random,
            "selection_problems": [f"{a}*{b}" for a, b in selection], "scored_problems": [f"{a}*{b}" for a, b in scored],
            "training_seconds": round(steered.training_seconds, 1)})
        arms = {"unsteered": "unsteered", "best learned": best, "best random": best_random}
        for arm, label in arms.items():
            for measure in MEASURES:
                if label is not None:
                    result.add_rate(arm, measure, sum(v[measure] for v in outcome[label]), len(scored))
        for first, second in (("best learned", "unsteered"), ("best random", "unsteered"),
                              ("best learned", "best random")):
            if arms[first] is not None and arms[second] is not None:
                for measure in MEASURES:
                    result.add_paired(first, second, measure, [v[measure] for v in outcome[arms[first]]],
                                      [v[measure] for v in outcome[arms[second]]], seed=s.seed)
        _selection_table(result, steered, selection, s)
        result.notes.append(
            f"strict: 'answer is {{a*b}}', '{{a}} * {{b}} = {{a*b}}' or 'A: {{a*b}}' in 'A:'+completion; lenient: strict "
            f"or the completion's first number is a*b; reasoning: step-by-step work. The best learned and the best "
            f"random vector were chosen on {len(selection)} selection problems (strict, then lenient, then reasoning "
            f"hits) and scored on {len(scored)} others; greedy, {s.discover.max_new_tokens} new tokens.")
        result.notes.append(f"chosen: learned {best}, random {best_random}")
        result.wall_seconds = time.perf_counter() - started
        result.write(out)
        return result


def _selection_table(result: BenchResult, steered, selection: list, s: ArithmeticSettings) -> None:
    ea, eb = selection[0]
    per = result.table(f"selection problems: hits of {len(selection)} per vector (completion of {ea} * {eb})",
                       ["vector", *MEASURES, "completion"])
    for label in ["unsteered"] + steered.learned + steered.random:
        found = steered.verdicts(label)
        per.add(label, *(sum(v[k] for v in found) for k in MEASURES), short(steered.texts(label)[0], 70))


BENCHMARK = ArithmeticBench()


def run_bench(lm: LoadedModel, out: str | Path, *, progress: Progress = None, on_batch: OnBatch = None,
              **settings) -> BenchResult:
    """The arithmetic bench with keyword settings (`ArithmeticSettings` fields); see `ArithmeticBench`."""
    return BENCHMARK.run(lm, out, keyword_settings(ArithmeticSettings, settings), progress, on_batch)
