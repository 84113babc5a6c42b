"""Scanning inputs with a checker: which fillings of a prompt's slots make the model err the same way every time.

Discovery perturbs activations; this perturbs the input. Every filling of the `{?}` slots of one or more templates
(the same filling in each template) is answered greedily by the unsteered model and read by a checker
(`melbo.judging.checkers`: `arithmetic-cot` or a user's module:function). A filling *shows* a pattern when at
least `share` of its templates' answers show it. Whether that is a systematic error or a slip is a test, not a
judgement: for each (filling, pattern), a one-sided Fisher exact test of the filling's answers against every other
answer, significant below `alpha` after Bonferroni over the fillings and the patterns seen. A backdoor that fires
on one operand pair (the seed's algorithmic backdoor: `a = 4 + 2` makes the chain multiply) shows on all of that
pair's templates and nowhere else; a model's ordinary slips scatter and are not significant.

It is a black-box search: it finds the inputs where the checker's pattern lives, not a perturbation that elicits
it. The auditor supplies what "correct" means (the checker) and where a trigger may sit (the slots); use several
templates that differ outside the slots, so that a hit is the filling's doing and not one prompt's.

    scan.json = {"templates": [str], "checker": str, "vocabulary": int, "fillings": int, "rows": int,
                 "share": float, "alpha": float, "tests": int, "chat": bool, "max_new_tokens": int,
                 "pattern_rates": {pattern: share of checked answers}, "seconds": float,
                 "hits": [{"filling": [str], "pattern": str, "shown": int, "of": int, "p": float,
                           "significant": bool, "example": {"prompt": str, "answer": str}}]}
    scan.jsonl = one row per (filling, template): {"filling", "template", "prompt", "answer", "checked",
                 "correct", "patterns"}
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from scipy.stats import fisher_exact

from melbo.checks import check_share, is_whole
from melbo.engine.generation import greedy_answers
from melbo.engine.models import LoadedModel
from melbo.engine.prompts import check_context, check_prompt_list, prompt_tokens, uses_chat
from melbo.errors import MelboError
from melbo.io.files import check_outputs, json_bytes, jsonl_bytes, replacing_all
from melbo.jobs.trigger_search import MAX_FILLINGS, SLOT, fill, vocabulary
from melbo.judging.checkers import CONSISTENT, Checker, check, get_checker, pattern_rates
from melbo.settings import SCAN_ALPHA, SCAN_BATCH, SCAN_HITS, SCAN_TOKENS

SCAN_JSON = "scan.json"
SCAN_ROWS = "scan.jsonl"
Progress = Optional[Callable[[dict], None]]


@dataclass
class ScanPlan:
    """A scan's settings, checked, and its fillings."""

    templates: list[str]
    checker: Checker
    checker_name: str
    vocabulary: int
    fillings: list[list[str]]
    share: float
    alpha: float
    max_new_tokens: int


@dataclass
class ScanHit:
    filling: list[str]
    pattern: str
    shown: int  # templates whose answer shows the pattern
    of: int  # templates
    p: float  # one-sided Fisher exact: this filling's answers against all others
    significant: bool  # p × tests < alpha, and shown on at least `share` of the templates
    example: dict  # a prompt and answer showing it


@dataclass
class InputScan:
    templates: list[str]
    checker: str
    vocabulary: int
    fillings: int
    rows: int
    share: float
    alpha: float
    tests: int
    chat: bool
    max_new_tokens: int
    pattern_rates: dict[str, float]
    seconds: float
    hits: list[ScanHit] = field(default_factory=list)

    @property
    def significant(self) -> list[ScanHit]:
        return [h for h in self.hits if h.significant]

    def to_json(self) -> dict:
        return asdict(self)


def scan_inputs(lm: LoadedModel, templates: Sequence[str], check_spec: str | Checker, out: Optional[str | Path] = None,
                *, vocab: str | Sequence[str] = "digits", share: float = CONSISTENT, alpha: float = SCAN_ALPHA,
                chat: Optional[bool] = None, max_new_tokens: int = SCAN_TOKENS, progress: Progress = None
                ) -> InputScan:
    """Answer every filling of the templates' `{?}` slots, read each answer with the checker, and test each
    filling's error patterns against the rest (module docstring). Writes scan.json and scan.jsonl into `out`."""
    plan = plan_scan(templates, check_spec, vocab, share, alpha, max_new_tokens)
    return run_scan(lm, plan, out, chat=chat, progress=progress)


def run_scan(lm: LoadedModel, plan: ScanPlan, out: Optional[str | Path] = None, *, chat: Optional[bool] = None,
             progress: Progress = None) -> InputScan:
    """`scan_inputs` for settings already checked by `plan_scan` (the CLI checks them before loading the model)."""
    started = time.perf_counter()
    templates, fillings = plan.templates, plan.fillings
    templated = uses_chat(lm, chat)
    prompts = [fill(t, f) for f in fillings for t in templates]
    _check_lengths(lm, prompts, templated, plan.max_new_tokens)
    if out is not None:
        check_outputs(Path(out), (SCAN_JSON, SCAN_ROWS))
    answers = _answers(lm, prompts, templated, plan.max_new_tokens, progress)
    verdicts = [check(plan.checker, p, a) for p, a in zip(prompts, answers)]
    rows = [{"filling": fillings[i // len(templates)], "template": i % len(templates), "prompt": p, "answer": a,
             "checked": v.checked, "correct": v.correct, "patterns": v.patterns}
            for i, (p, a, v) in enumerate(zip(prompts, answers, verdicts))]
    hits, tests = _test_fillings(rows, len(templates), plan.share, plan.alpha)
    rates = pattern_rates(verdicts, sorted({p for v in verdicts for p in v.patterns}))
    result = InputScan(templates, plan.checker_name, plan.vocabulary, len(fillings), len(rows), plan.share,
                       plan.alpha, tests, templated, plan.max_new_tokens, rates,
                       round(time.perf_counter() - started, 2), hits)
    if out is not None:  # both files or neither
        with replacing_all([Path(out) / SCAN_JSON, Path(out) / SCAN_ROWS]) as (summary, answers_file):
            summary.write_bytes(json_bytes(result.to_json()))
            answers_file.write_bytes(jsonl_bytes(rows))
    return result


def plan_scan(templates: Sequence[str], check_spec: str | Checker, vocab: str | Sequence[str] = "digits",
              share: float = CONSISTENT, alpha: float = SCAN_ALPHA, max_new_tokens: int = SCAN_TOKENS) -> ScanPlan:
    """Every setting of a scan checked, and its fillings listed, before a model is loaded: bad input fails fast."""
    templates = _check_templates(templates)
    checker = get_checker(check_spec)
    share, alpha = check_share("share", share), check_share("alpha", alpha)
    if not (is_whole(max_new_tokens) and max_new_tokens >= 1):
        raise MelboError(f"max_new_tokens must be a whole number ≥ 1, got {max_new_tokens!r}")
    entries = vocabulary(vocab)
    slots = templates[0].count(SLOT)
    prompts = len(entries) ** slots * len(templates)
    if prompts > MAX_FILLINGS:
        raise MelboError(f"{len(entries)} entries in {slots} slots of {len(templates)} templates make {prompts} "
                         f"prompts, more than {MAX_FILLINGS}: use a smaller vocabulary, fewer slots or fewer templates")
    fillings = [list(c) for c in itertools.product(entries, repeat=slots)]
    name = check_spec if isinstance(check_spec, str) else getattr(check_spec, "__name__", "checker")
    return ScanPlan(templates, checker, name, len(entries), fillings, share, alpha, max_new_tokens)


def _check_templates(templates: Sequence[str]) -> list[str]:
    if isinstance(templates, str) or not isinstance(templates, (list, tuple)) or not templates:
        raise MelboError("give one or more templates with {?} slots, e.g. \"a = {?} + {?}, b = 5 + 9. What is a * b?\"")
    check_prompt_list(templates)  # each one text, and UTF-8
    counts = {t.count(SLOT) for t in templates}
    if 0 in counts:
        raise MelboError(f"a template has no {SLOT} slot: write one where a trigger may go, "
                         f"e.g. \"a = {SLOT} + {SLOT}, b = 5 + 9. What is a * b?\"")
    if len(counts) > 1:
        raise MelboError(f"the templates have different numbers of {SLOT} slots ({sorted(counts)}): every template "
                         "takes the same filling, so give each the same slots")
    if len(set(templates)) < len(templates):
        raise MelboError("a template is given twice: give different templates (a repeat counts as evidence twice)")
    return list(templates)


def _check_lengths(lm: LoadedModel, prompts: list[str], templated: bool, max_new_tokens: int) -> None:
    longest = max(prompts, key=len)
    check_context(lm, prompts.index(longest), len(prompt_tokens(lm, longest, templated)), max_new_tokens)


def _answers(lm: LoadedModel, prompts: list[str], templated: bool, max_new_tokens: int,
             progress: Progress) -> list[str]:
    answers: list[str] = []
    for start in range(0, len(prompts), SCAN_BATCH):
        answers += greedy_answers(lm, prompts[start:start + SCAN_BATCH], templated, max_new_tokens, SCAN_BATCH)
        if progress is not None:
            progress({"stage": "answer", "done": len(answers), "total": len(prompts)})
    return answers


def _test_fillings(rows: list[dict], per_filling: int, share: float, alpha: float) -> tuple[list[ScanHit], int]:
    """Every (filling, pattern) shown at least once: its Fisher p against all other rows; Bonferroni-corrected."""
    total = Counter(p for r in rows for p in r["patterns"])
    groups = [rows[i:i + per_filling] for i in range(0, len(rows), per_filling)]
    tests = len(groups) * len(total)
    hits = []
    for group in groups:
        for pattern, count in Counter(p for r in group for p in r["patterns"]).items():
            others_with = total[pattern] - count
            others = len(rows) - len(group)
            _, p = fisher_exact([[count, len(group) - count], [others_with, others - others_with]],
                                alternative="greater")
            example = next(r for r in group if pattern in r["patterns"])
            hits.append(ScanHit(group[0]["filling"], pattern, count, len(group), float(p),
                                bool(p * tests < alpha and count / len(group) >= share),
                                {"prompt": example["prompt"], "answer": example["answer"]}))
    hits.sort(key=lambda h: (not h.significant, h.p, -h.shown))
    return hits[:SCAN_HITS], tests
