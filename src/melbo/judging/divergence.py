"""Behavioural divergence: a run's perturbations ranked by how differently two models behave under them.

`melbo.diff(audited, reference, prompts, out)` (the job, in `melbo.jobs.job`) trains perturbations with a contrastive
objective (`melbo.engine.contrastive`); `rank_run` here generates with every perturbation on *both* models, and ranks the
perturbations by how differently the two models behave under the same perturbation:

- **kl**: the mean KL(p_aud ‖ p_ref) of the two steered models' next-token distributions over the first
  `KL_TOKENS` tokens of the audited model's completion (teacher-forced: both models read the same tokens).
  It is the ranking key: it is continuous, needs no embedding model, and is large exactly when the reference
  finds the audited model's steered answer unlikely.
- **distance**: 1 − cosine of the sentence embeddings of the paired completions (all-MiniLM-L6-v2).

Random vectors of the run's norm go through the same path, so their divergences are the baseline. The result is
`divergence.json` in the run directory, read by the report:

    {"kl_tokens": K, "unsteered": {...}, "rows": [{"label", "vector", "kind": "learned"|"random",
      "prompt_index", "audited", "reference", "kl", "distance", "rank"}, ...]}   (rows sorted by kl, descending)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from melbo.engine.arithmetic import random_vectors
from melbo.engine.contrastive import kl_divergence
from melbo.errors import MelboError
from melbo.engine.generation import Completion, Sampling, generate
from melbo.engine.intervention import Perturbations, SteeringVectors
from melbo.engine.models import LoadedModel
from melbo.engine.prompts import prompt_tokens, uses_chat
from melbo.engine.runner import Progress
from melbo.settings import DIFF_RANDOM
from melbo.io.files import read_json, write_json
from melbo.io.jsonfields import SQLITE_MAX, Fields
from melbo.engine.store import DIVERGENCE, Run

KL_TOKENS = 16  # teacher-forced positions the KL is averaged over: the start of the answer, where behaviours begin


def rank_run(run: Run, audited: LoadedModel, reference: LoadedModel, random: int = DIFF_RANDOM,
             progress: Optional[Progress] = None, on_batch: Optional[Callable[[int], None]] = None) -> dict:
    """Generate with the run's perturbations (and `random` random vectors) on both models; write
    divergence.json."""
    settings = run.settings
    perturbations, labels, kinds = _with_random(run, audited, random)
    if progress:  # both models generate once per (perturbation or unsteered, prompt)
        progress({"stage": "generate", "total": 2 * (len(perturbations) + 1) * len(settings.prompts)})
    sampling = Sampling(max_new_tokens=settings.max_new_tokens)  # the training batch is no generation batch
    result = rank_perturbations(audited, reference, perturbations, settings.prompts, labels, kinds,
                                chat=settings.chat, sampling=sampling, on_batch=on_batch)
    run.write_completions(_audited_rows(result))
    write_json(run.path / DIVERGENCE, result)
    return result


@dataclass
class DivergenceRow:
    """One (perturbation or unsteered, prompt) pair of completions, and how far apart the two models are."""

    label: str
    vector: Optional[int]
    kind: str  # KINDS
    prompt_index: int
    prompt: str
    audited: str
    reference: str
    tokens: int = 0
    kl: Optional[float] = None  # None: written as NaN (strict JSON has no NaN)
    distance: Optional[float] = None
    rank: Optional[int] = None  # 1 = the most divergent; None for the unsteered rows

    @classmethod
    def from_fields(cls, f: Fields) -> "DivergenceRow":
        return cls(label=f.text("label"), vector=f.whole("vector", 0, SQLITE_MAX, None),
                   kind=f.text("kind", choices=KINDS), prompt_index=f.whole("prompt_index", 0),
                   prompt=f.text("prompt", ""), audited=f.text("audited"), reference=f.text("reference"),
                   tokens=f.whole("tokens", 0, default=0), kl=f.real("kl", 0, default=None),
                   distance=f.real("distance", default=None), rank=f.whole("rank", 1, SQLITE_MAX, None))


@dataclass
class Divergence:
    """divergence.json (module docstring), read once with every field checked."""

    kl_tokens: int
    unsteered: list[DivergenceRow] = field(default_factory=list)
    rows: list[DivergenceRow] = field(default_factory=list)  # most divergent first

    @classmethod
    def from_dict(cls, raw: object, file: Path | str = DIVERGENCE) -> "Divergence":
        f = Fields(raw, file, "run `melbo diff` again to rewrite it")
        return cls(f.whole("kl_tokens", 1, 1_000_000, default=KL_TOKENS),
                   [DivergenceRow.from_fields(r) for r in f.objects("unsteered", [])],
                   [DivergenceRow.from_fields(r) for r in f.objects("rows", [])])

    @classmethod
    def load(cls, run_dir: str | Path) -> Optional["Divergence"]:
        """The run's divergence.json, or None when it has none (a run that is not a diff)."""
        file = Path(run_dir) / DIVERGENCE
        return cls.from_dict(read_json(file), file) if file.is_file() else None

    def learned(self) -> list[DivergenceRow]:
        return [r for r in self.rows if r.kind == "learned"]

    def random(self) -> list[DivergenceRow]:
        return [r for r in self.rows if r.kind == "random"]

    def to_dict(self) -> dict:
        return asdict(self)


KINDS = ("learned", "random", "unsteered")


def load_divergence(run_dir: str | Path) -> Divergence:
    """A diff run's ranking, as `rank_run` wrote it (module docstring)."""
    found = Divergence.load(run_dir)
    if found is None:
        raise MelboError(f"{run_dir} holds no {DIVERGENCE}: run `melbo diff` (or resume it) first")
    return found


def _with_random(run: Run, lm: LoadedModel, random: int) -> tuple[Perturbations, list[str], list[str]]:
    learned = run.perturbations
    labels = [f"v{i}" for i in range(len(learned))]
    if not random or not learned.supports_random_baseline:
        return learned, labels, ["learned"] * len(labels)
    baseline = random_vectors(random, lm.width, run.config.radius, run.config.source, run.config.seed)
    both = SteeringVectors(torch.cat([learned.vectors, baseline.vectors]), learned.layer)
    return both, labels + [f"random{k}" for k in range(random)], ["learned"] * len(labels) + ["random"] * random


def rank_perturbations(
    audited: LoadedModel,
    reference: LoadedModel,
    perturbations: Perturbations,
    prompts: Sequence[str],
    labels: Sequence[str],
    kinds: Sequence[str],
    *,
    chat: Optional[bool] = None,
    sampling: Sampling = Sampling(),
    on_batch: Optional[Callable[[int], None]] = None,
) -> dict:
    """Paired completions, KL and embedding distance per (perturbation, prompt); rows sorted by KL (descending)."""
    from melbo.judging.evaluation import embed

    templated = uses_chat(audited, chat)
    pair = [generate(lm, perturbations, prompts, labels=labels, chat=templated, sampling=sampling,
                     on_batch=on_batch) for lm in (audited, reference)]
    kl = np.concatenate([
        paired_kl(audited, reference, perturbations, prompt_tokens(audited, prompt, templated),
                  [c for c in pair[0] if c.prompt_index == i], sampling.batch_size)
        for i, prompt in enumerate(prompts)])
    vectors = embed([c.text for c in pair[0]] + [c.text for c in pair[1]])
    n = len(pair[0])
    distance = 1.0 - (vectors[:n] * vectors[n:]).sum(-1)
    rows = [_row(a, r, float(k), float(d), kinds) for a, r, k, d in zip(*pair, kl, distance)]
    unsteered = [row for row in rows if row["vector"] is None]
    ranked = sorted((row for row in rows if row["vector"] is not None), key=lambda row: -row["kl"])
    for position, row in enumerate(ranked):
        row["rank"] = position + 1
    return {"kl_tokens": KL_TOKENS, "unsteered": unsteered, "rows": ranked}


def _row(audited: Completion, reference: Completion, kl: float, distance: float, kinds: Sequence[str]) -> dict:
    kind = "unsteered" if audited.vector is None else kinds[audited.vector]
    return {"label": audited.label, "vector": audited.vector, "kind": kind, "prompt_index": audited.prompt_index,
            "prompt": audited.prompt, "audited": audited.text, "reference": reference.text,
            "tokens": audited.tokens, "kl": kl, "distance": distance}


def _audited_rows(result: dict) -> list[dict]:
    """The audited model's completions as completions.jsonl rows (unsteered, then learned), for the run's other tools."""
    learned = [r for r in result["rows"] if r["kind"] == "learned"]
    rows = result["unsteered"] + sorted(learned, key=lambda r: (r["vector"], r["prompt_index"]))
    return [{"vector": r["vector"], "label": r["label"], "prompt_index": r["prompt_index"], "prompt": r["prompt"],
             "sample": 0, "text": r["audited"], "tokens": r["tokens"]} for r in rows]


def paired_kl(audited: LoadedModel, reference: LoadedModel, perturbations: Perturbations, prompt_ids: list[int],
              completions: Sequence[Completion], batch_size: int = 16) -> np.ndarray:
    """Mean KL(p_aud ‖ p_ref) over the first KL_TOKENS answer positions of each completion, both steered alike.

    Row k reads the prompt plus the audited completion's first tokens; position len(prompt) − 1 predicts the
    first answer token, so even an empty answer has one position.
    """
    values = []
    for start in range(0, len(completions), batch_size):
        chunk = completions[start:start + batch_size]
        answers = [audited.tokenizer(c.text, add_special_tokens=False)["input_ids"][:KL_TOKENS - 1] for c in chunk]
        rows = [c.vector for c in chunk]
        logp = [_answer_logprobs(lm, perturbations, rows, prompt_ids, answers) for lm in (audited, reference)]
        kl = kl_divergence(*logp)  # [rows, T]
        counts = torch.tensor([len(a) + 1 for a in answers])
        mask = torch.arange(kl.shape[1])[None] < counts[:, None]
        values.append(((kl * mask).sum(-1) / counts).numpy())
    return np.concatenate(values) if values else np.zeros(0)


def _answer_logprobs(lm: LoadedModel, perturbations: Perturbations, rows, prompt_ids: list[int],
                     answers: list[list[int]]) -> torch.Tensor:
    """Log-probabilities at the answer positions [rows, 1 + longest answer, vocab] (right-padded: causal)."""
    longest = max(len(a) for a in answers)
    pad = lm.tokenizer.pad_token_id or 0
    ids = torch.tensor([prompt_ids + a + [pad] * (longest - len(a)) for a in answers], device=lm.device)
    with perturbations.apply(lm, rows), torch.no_grad():
        logits = lm.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
    first = len(prompt_ids) - 1
    return logits[:, first:first + longest + 1].float().log_softmax(-1).cpu()
