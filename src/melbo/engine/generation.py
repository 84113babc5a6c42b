"""Steered generation, batched across perturbations.

For every (perturbation, prompt, sample) the perturbation is active on every position, prompt and generated
tokens alike. Rows of one batch have prompts of one token length (the same prompt, or several prompts that
tokenize to equally many tokens, as templated problems often do), so there is no padding and a row's greedy
tokens equal those of generating it alone. The unsteered completion is always the reference row (`vector=None`).
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from melbo.checks import check_fields, check_finite, check_scale
from melbo.errors import MelboError
from melbo.engine.intervention import Perturbations
from melbo.engine.models import LoadedModel
from melbo.engine.prompts import (
    batch_from_ids, check_context, check_prompt_list, check_system_role, prompt_tokens, uses_chat,
)
from melbo.settings import GENERATION_BATCH

# End-of-turn markers of common chat templates; used when the template mentions them.
END_OF_TURN = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "<|endoftext|>", "</s>")


@dataclass
class Completion:
    vector: Optional[int]  # index into the perturbations; None = unsteered
    label: str
    prompt_index: int
    prompt: str
    sample: int
    text: str
    tokens: int

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 48
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    samples: int = 1
    seed: int = 0
    batch_size: int = GENERATION_BATCH
    # "fp32", or "bf16"/"auto" (LoadedModel.at_precision): a bf16 copy on CPUs with bf16 units generates 2-3x the
    # row-tokens/s, and steered greedy texts change where a token's top two logits were within bf16's rounding
    # (benchmarks/generation_precision.py). Exact by default; the audit's scan opts in, its confirmation does not.
    precision: str = "fp32"

    def __post_init__(self):
        check_fields(self)  # whole numbers, finite temperature and top-p
        if self.max_new_tokens <= 0 or self.samples <= 0 or self.batch_size <= 0:
            raise MelboError("max-new-tokens, samples and batch size must be ≥ 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise MelboError("temperature must be ≥ 0 and top-p in (0, 1]")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise MelboError(f"unknown precision {self.precision!r}: use auto, fp32 or bf16")


def end_of_turn_markers(lm: LoadedModel) -> list[str]:
    """The END_OF_TURN markers the model's chat template uses and its vocabulary has, in END_OF_TURN order."""
    template = lm.chat_template or ""
    vocab = lm.tokenizer.get_vocab()
    return [m for m in END_OF_TURN if m in template and m in vocab]


def stop_token_ids(lm: LoadedModel) -> list[int]:
    ids: set[int] = set()
    eos = lm.model.generation_config.eos_token_id
    ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if lm.tokenizer.eos_token_id is not None:
        ids.add(lm.tokenizer.eos_token_id)
    vocab = lm.tokenizer.get_vocab()
    ids.update(vocab[m] for m in end_of_turn_markers(lm))
    return sorted(ids)


def decode_until_stop(lm: LoadedModel, new_tokens: torch.Tensor, stops: list[int]) -> list[tuple[str, int]]:
    """(text, tokens) per row of generated ids [rows, T]: each row up to its first stop token (not included)."""
    decoded = []
    for seq in new_tokens.tolist():
        n = next((i for i, tok in enumerate(seq) if tok in stops), len(seq))
        decoded.append((lm.tokenizer.decode(seq[:n], skip_special_tokens=True), n))
    return decoded


@dataclass
class Greedy:
    """Greedy continuations of prompts of any token lengths (`greedy_continuations`)."""

    new_tokens: torch.Tensor  # [B, K] on the CPU; after a row's stop token, padding
    lengths: list[int]  # per row: tokens before its first stop token
    logprobs: Optional[torch.Tensor]  # [B, K, V]: log P(next token) before each new token, when asked for
    forward_passes: int
    attention_mask: torch.Tensor  # [B, T]: the left-padded prompts' mask
    cache: Any = None  # the key/value cache over prompt + new_tokens[:, :-1], when asked for


def greedy_continuations(lm: LoadedModel, prompt_ids: Sequence[list[int]], max_new_tokens: int,
                         with_logprobs: bool = False, keep_cache: bool = False) -> Greedy:
    """One left-padded batch of unsteered greedy continuations (a row's tokens equal generating it alone, up to
    float rounding in the padded attention), optionally with the log-probabilities of every step."""
    stops = stop_token_ids(lm)
    pad = lm.tokenizer.pad_token_id or 0
    batch = batch_from_ids(prompt_ids, pad)
    with torch.no_grad():
        out = lm.model.generate(input_ids=batch.input_ids.to(lm.device),
                                attention_mask=batch.attention_mask.to(lm.device),
                                max_new_tokens=max_new_tokens, min_new_tokens=0, do_sample=False,
                                eos_token_id=stops, pad_token_id=pad, top_k=None, top_p=None, temperature=None,
                                return_dict_in_generate=True, output_logits=with_logprobs)
    new = out.sequences[:, batch.input_ids.shape[1]:].cpu()
    lengths = [next((i for i, tok in enumerate(row) if tok in stops), len(row)) for row in new.tolist()]
    logprobs = torch.stack(out.logits, 1).float().log_softmax(-1).cpu() if with_logprobs else None
    cache = _cache_of(out) if keep_cache else None
    return Greedy(new, lengths, logprobs, new.shape[1], batch.attention_mask, cache)


def greedy_answers(lm: LoadedModel, prompts: list[str], templated: bool, max_new_tokens: int = 48,
                   batch_size: int = 32) -> list[str]:
    """Greedy completions of many different prompts (left-padded batches), as text."""
    texts = []
    for start in range(0, len(prompts), batch_size):
        ids = [prompt_tokens(lm, p, templated) for p in prompts[start : start + batch_size]]
        greedy = greedy_continuations(lm, ids, max_new_tokens)
        texts += [lm.tokenizer.decode(row[:n], skip_special_tokens=True)
                  for row, n in zip(greedy.new_tokens.tolist(), greedy.lengths)]
    return texts


def generate_rows(
    lm: LoadedModel,
    perturbations: Optional[Perturbations],
    prompt_ids: list[int],
    rows: Sequence[Optional[int]],
    sampling: Sampling,
    scale: float = 1.0,
    on_batch: Optional[Callable[[int], None]] = None,
) -> list[tuple[str, int]]:
    """Generate once per row from one tokenized prompt; row k steered by perturbations[rows[k]] (None: not).

    Returns (text, number of generated tokens) per row.
    """
    return _generate_equal_length(lm, perturbations, [prompt_ids] * len(rows), rows, sampling, scale, on_batch)


def _generate_equal_length(
    lm: LoadedModel,
    perturbations: Optional[Perturbations],
    row_prompts: Sequence[list[int]],
    rows: Sequence[Optional[int]],
    sampling: Sampling,
    scale: float,
    on_batch: Optional[Callable[[int], None]],
) -> list[tuple[str, int]]:
    """`generate_rows` with a prompt per row; every prompt has the same number of tokens (so: no padding)."""
    check_finite("scale", scale)
    if len({len(ids) for ids in row_prompts}) > 1:
        raise ValueError("rows of one generation batch need prompts of one token length")
    prompt_length = len(row_prompts[0]) if row_prompts else 0
    lm = lm.at_precision(sampling.precision)
    stops = stop_token_ids(lm)
    out: list[tuple[str, int]] = []
    for start in range(0, len(rows), sampling.batch_size):
        chunk = list(rows[start : start + sampling.batch_size])
        steer = (
            perturbations.apply(lm, chunk, scale) if perturbations is not None else contextlib.nullcontext()
        )
        input_ids = torch.tensor(list(row_prompts[start : start + sampling.batch_size]), device=lm.device)
        if sampling.temperature > 0:
            mode = {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p}
        else:
            mode = {"do_sample": False}
        with steer, torch.no_grad(), _seeded(lm, sampling.seed + start):
            generated = lm.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=sampling.max_new_tokens,
                eos_token_id=stops,
                pad_token_id=lm.tokenizer.pad_token_id,
                top_k=None,
                **mode,
            )
        out += decode_until_stop(lm, generated[:, prompt_length:], stops)
        if on_batch:
            on_batch(len(chunk))
    return out


@contextlib.contextmanager
def _seeded(lm: LoadedModel, seed: int):
    """Seed sampling without touching the caller's RNG: `model.generate` takes no generator, so it samples from
    the global one, which is forked here (saved, seeded, restored on exit) on the CPU and the model's GPU."""
    # device_map="auto" may sample on any GPU: fork them all (a model on the CPU forks none).
    gpus = list(range(torch.cuda.device_count())) if lm.device.type == "cuda" else []
    with torch.random.fork_rng(devices=gpus):
        torch.manual_seed(seed)
        yield


def generate(
    lm: LoadedModel,
    perturbations: Optional[Perturbations],
    prompts: Sequence[str],
    *,
    indices: Optional[Sequence[int]] = None,
    labels: Optional[Sequence[str]] = None,
    scale: float = 1.0,
    include_unsteered: bool = True,
    chat: Optional[bool] = None,
    sampling: Sampling = Sampling(),
    on_batch: Optional[Callable[[int], None]] = None,
    system: Optional[str] = None,
) -> list[Completion]:
    """Completions for every (perturbation, prompt, sample), unsteered first, in batches across perturbations;
    `system` opens every conversation."""
    prompts = check_prompt_list(prompts)
    check_scale(scale)  # far past ±100 a model writes nothing: an empty reply would look like a result
    if not isinstance(sampling, Sampling):
        raise MelboError(f"sampling must be a melbo.engine.generation.Sampling, got {type(sampling).__name__}: "
                         "pass e.g. Sampling(max_new_tokens=48)")
    if perturbations is not None:
        perturbations.check(lm)
    count = len(perturbations) if perturbations is not None else 0
    chosen = list(range(count)) if indices is None else list(indices)
    for i in chosen:
        if not 0 <= i < count:
            raise MelboError(f"vector index {i} is out of range: there are {count} (0..{count - 1})")
    names = list(labels) if labels is not None else [f"v{i}" for i in chosen]
    templated = uses_chat(lm, chat)
    if system:
        check_system_role(lm, templated)
    samples = sampling.samples if sampling.temperature > 0 else 1  # greedy samples would be identical
    vectors: list[Optional[int]] = ([None] if include_unsteered else []) + chosen
    row_labels = (["unsteered"] if include_unsteered else []) + names
    encoded = [prompt_tokens(lm, prompt, templated, system) for prompt in prompts]
    for p_index, ids in enumerate(encoded):  # every prompt fits, or nothing is generated
        check_context(lm, p_index, len(ids), sampling.max_new_tokens)
    # (prompt, vector, sample) in output order; prompts of one token length share batches (no padding needed).
    work = [(p, v, k) for p in range(len(prompts)) for v in range(len(vectors)) for k in range(samples)]
    by_length: dict[int, list[tuple[int, int, int]]] = {}
    for w in work:
        by_length.setdefault(len(encoded[w[0]]), []).append(w)
    texts: dict[tuple[int, int, int], tuple[str, int]] = {}
    for group in by_length.values():
        done = _generate_equal_length(lm, perturbations, [encoded[p] for p, _, _ in group],
                                      [vectors[v] for _, v, _ in group], sampling, scale, on_batch)
        texts.update(zip(group, done))
    return [Completion(vectors[v], row_labels[v], p, prompts[p], k, *texts[(p, v, k)]) for p, v, k in work]


def stream_rows(
    lm: LoadedModel,
    perturbations: Optional[Perturbations],
    prompt_ids: list[int],
    rows: Sequence[Optional[int]],
    sampling: Sampling,
    scale: float = 1.0,
    cancelled: Optional[Callable[[], bool]] = None,
) -> Iterator[list[str]]:
    """`generate_rows` for one batch, one token at a time: after each forward, yield the new text of every row.

    Rows share the prompt (no padding), so greedy rows give the tokens `generate_rows` gives (logits are used as
    they are: processors a generation config may add, such as a repetition penalty, are not applied). A row stops
    at its first stop token ('' from then on); the stream ends when every row has stopped, after max_new_tokens, or
    as soon as `cancelled()` is true (checked before each forward, so a closed browser costs at most one more).
    """
    check_finite("scale", scale)
    lm = lm.at_precision(sampling.precision)
    stops = set(stop_token_ids(lm))
    steer = perturbations.apply(lm, rows, scale) if perturbations is not None else contextlib.nullcontext()
    texts = [_TextStream(lm.tokenizer) for _ in rows]
    stopped = [False] * len(rows)
    step_input = torch.tensor([prompt_ids] * len(rows), device=lm.device)
    cache = None
    with steer, torch.no_grad(), _seeded(lm, sampling.seed):
        for _ in range(sampling.max_new_tokens):
            if cancelled is not None and cancelled():
                return
            logits, cache = forward_cached(lm, step_input, cache)
            chosen = _next_tokens(logits[:, -1, :].float(), sampling)
            for k, token in enumerate(chosen.tolist()):
                stopped[k] = stopped[k] or token in stops
                if not stopped[k]:
                    texts[k].add(token)
            yield [t.new_text() for t in texts]
            if all(stopped):
                break
            step_input = chosen[:, None]
    tail = [t.new_text(final=True) for t in texts]
    if any(tail):
        yield tail


class _TextStream:
    """A row's tokens decoded as they come. A byte-level token can be part of a character: while the text decodes
    to a trailing U+FFFD it is held back (it may still become a character); whole text never changes when tokens
    are added, so the pieces add up to the row's full decode."""

    def __init__(self, tokenizer):
        self.tokenizer, self.tokens, self.shown = tokenizer, [], ""

    def add(self, token: int) -> None:
        self.tokens.append(token)

    def new_text(self, final: bool = False) -> str:
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if not final and (text.endswith("\ufffd") or not text.startswith(self.shown)):
            return ""
        new, self.shown = text[len(self.shown):], text
        return new


def forward_cached(lm: LoadedModel, input_ids: torch.Tensor, cache, **inputs):
    """One forward with the key/value cache → (logits, cache). transformers 5.24 renamed past_key_values to cache."""
    import inspect

    name = "cache" if "cache" in inspect.signature(lm.model.forward).parameters else "past_key_values"
    out = lm.model(input_ids=input_ids, use_cache=True, **({name: cache} if cache is not None else {}), **inputs)
    return out.logits, _cache_of(out)


def _cache_of(out):
    """The key/value cache of a model or generate output, under either name."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def _next_tokens(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """Greedy (temperature 0) or nucleus sampling over logits [rows, vocab] → token ids [rows]."""
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    outside = sorted_probs.cumsum(dim=-1) - sorted_probs > sampling.top_p  # keep the smallest set ≥ top_p
    picked = torch.multinomial(sorted_probs.masked_fill(outside, 0.0), 1)
    return order.gather(-1, picked)[:, 0]
