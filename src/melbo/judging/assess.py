"""Assessing a finished run: are the learned perturbations more diverse than random ones of the same norm?

`assess_run(run, lm, random=K)` scores the run's stored completions (generating and storing them first if the
run has none), groups the learned perturbations into behaviours (`melbo.judging.clustering`), generates with K random
vectors of the run's radius at the run's source layer on the training prompts (same chat setting, same
max_new_tokens, greedy, the seed's baseline), scores those too, and writes `metrics.json` into the run:

    {"learned": score dict (evaluation.score) whose "perturbations" entries also carry
                "cluster", "cluster_name", "no_change" (None for the unsteered row),
     "random": score dict, or null,
     "clusters": [{"id", "name", "members": [labels], "no_change": bool}],
     "random_completions": [completion dicts]}

Runs whose result is adapters (`--method adapters`) have no random-vector baseline of matched kind: for them the random part
is skipped ("random": null, "random_completions": []). So is it when random=0.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

from melbo.judging import evaluation
from melbo.engine.arithmetic import random_vectors
from melbo.errors import MelboError
from melbo.engine.generation import Completion, Sampling, generate
from melbo.engine.models import LoadedModel
from melbo.settings import DEFAULT_RANDOM
from melbo.numbers import jsonable
from melbo.io.files import write_json
from melbo.io.jsonfields import SQLITE_MAX, Fields
from melbo.engine.store import METRICS, Run, completion_from

METRICS_FIX = "run `melbo assess` again to rewrite it"


# ------------------------------------------------------------------------------------------------ metrics.json, typed
@dataclass
class ScoreRow:
    """One perturbation's scores (or the unsteered row's: `vector` None), with its behaviour cluster."""

    label: str
    vector: Optional[int]
    distance_from_unsteered: Optional[float] = None
    perplexity: Optional[float] = None
    repetition: Optional[float] = None
    mean_tokens: Optional[float] = None
    cluster: Optional[int] = None
    cluster_name: Optional[str] = None
    no_change: Optional[bool] = None

    @classmethod
    def from_fields(cls, f: Fields) -> "ScoreRow":
        number = {k: f.real(k, default=None) for k in ("distance_from_unsteered", "perplexity", "repetition",
                                                        "mean_tokens")}
        return cls(label=f.text("label"), vector=f.whole("vector", 0, SQLITE_MAX, None), **number,
                   cluster=f.whole("cluster", default=None), cluster_name=f.text("cluster_name", None),
                   no_change=f.flag("no_change", None))


@dataclass
class Scores:
    """A set of perturbations scored together (evaluation.score): per perturbation, and for the set."""

    perturbations: list[ScoreRow]
    diversity: Optional[float] = None
    mean_distance_from_unsteered: Optional[float] = None
    median_perplexity: Optional[float] = None
    mean_repetition: Optional[float] = None

    @classmethod
    def from_fields(cls, f: Fields) -> "Scores":
        summary = {k: f.real(k, default=None) for k in ("diversity", "mean_distance_from_unsteered",
                                                         "median_perplexity", "mean_repetition")}
        return cls([ScoreRow.from_fields(p) for p in f.objects("perturbations", [])], **summary)

    @property
    def steered(self) -> list[ScoreRow]:
        return [p for p in self.perturbations if p.vector is not None]

    @property
    def unsteered(self) -> Optional[ScoreRow]:
        return next((p for p in self.perturbations if p.vector is None), None)


@dataclass
class Cluster:
    id: int
    name: str
    members: list[str] = field(default_factory=list)
    no_change: bool = False

    @classmethod
    def from_fields(cls, f: Fields) -> "Cluster":
        return cls(f.whole("id"), f.text("name"), f.texts("members", []), bool(f.flag("no_change", None)))


@dataclass
class Metrics:
    """metrics.json (module docstring), read once with every field checked: learned and random scores, clusters."""

    learned: Scores
    random: Optional[Scores] = None
    clusters: list[Cluster] = field(default_factory=list)
    random_completions: list[Completion] = field(default_factory=list)

    @classmethod
    def from_dict(cls, raw: object, file: Path | str = METRICS) -> "Metrics":
        f = Fields(raw, file, METRICS_FIX)
        random = f.object("random", None)
        return cls(Scores.from_fields(f.object("learned")), Scores.from_fields(random) if random else None,
                   [Cluster.from_fields(c) for c in f.objects("clusters", [])],
                   [completion_from(c) for c in f.objects("random_completions", [])])

    @classmethod
    def load(cls, run_dir: Path) -> Optional["Metrics"]:
        """The run's metrics.json, or None when it has none (the job skipped the assessment)."""
        from melbo.io.files import read_json

        file = Path(run_dir) / METRICS
        return cls.from_dict(read_json(file), file) if file.is_file() else None

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------------ assessing



def run_completions(run: Run, lm: LoadedModel, on_batch: Optional[Callable[[int], None]] = None) -> list[Completion]:
    """The run's completions on its training prompts: the stored ones, or generated now and stored."""
    rows = run.completions()
    if rows:
        return [Completion(**row) for row in rows]
    if run.perturbations is None:
        raise MelboError(f"run {run.path} is not finished: resume it with `melbo discover --resume {run.path}`")
    settings = run.settings
    completions = generate(lm, run.perturbations, settings.prompts, chat=settings.chat,
                           sampling=Sampling(max_new_tokens=settings.max_new_tokens), on_batch=on_batch)
    run.write_completions([c.to_json() for c in completions])
    return completions


def learned_and_random(run: Run, lm: LoadedModel, random: int, seed: int = 0,
                       on_batch: Optional[Callable[[int], None]] = None) -> tuple[list[Completion], list[Completion]]:
    """The run's completions on its training prompts, and those of `random` random vectors of its radius.

    The random rows (labels random0, random1, …) have no unsteered row of their own: with greedy decoding it
    would repeat the learned list's. Runs whose result is not vectors get no random rows.
    """
    learned = run_completions(run, lm, on_batch)
    if not random or not run.perturbations.supports_random_baseline:
        return learned, []
    settings = run.settings
    vectors = random_vectors(random, lm.width, run.config.radius, run.config.source, seed)
    randoms = generate(lm, vectors, settings.prompts, labels=[f"random{k}" for k in range(random)],
                       include_unsteered=False, chat=settings.chat,
                       sampling=Sampling(max_new_tokens=settings.max_new_tokens), on_batch=on_batch)
    return learned, randoms


def assess_run(run: Run, lm: LoadedModel, random: int = DEFAULT_RANDOM, seed: int = 0,
               on_batch: Optional[Callable[[int], None]] = None) -> dict:
    """Score, cluster and compare a run with K random vectors of its radius; write and return metrics.json.

    Adapter runs skip the random baseline ("random": null): random vectors are no baseline for adapters.
    """
    if random < 0:
        raise MelboError(f"--random must be ≥ 0, got {random}")
    if run.model is None:
        run.attach(lm)
    chat = run.settings.chat
    learned_completions, randoms = learned_and_random(run, lm, random, seed, on_batch)
    learned = evaluation.score(lm, learned_completions, chat=chat)

    from melbo.judging.clustering import cluster_behaviours

    distance = {p["label"]: p["distance_from_unsteered"] for p in learned["perturbations"]}
    grouping = cluster_behaviours(learned_completions, evaluation.embed([c.text for c in learned_completions]),
                                  distance)
    by_label = {p["label"]: p for p in grouping["perturbations"]}
    for entry in learned["perturbations"]:
        found = by_label.get(entry["label"])
        entry["cluster"] = found["cluster"] if found else None
        entry["cluster_name"] = found["cluster_name"] if found else None
        entry["no_change"] = found["no_change"] if found else None

    random_score = None
    if randoms:
        # greedy decoding: the stored unsteered completions are the reference rows for the random ones too
        reference = [c for c in learned_completions if c.vector is None]
        random_score = evaluation.score(lm, reference + randoms, chat=chat)

    metrics = jsonable({"learned": learned, "random": random_score, "clusters": grouping["clusters"],
                         "random_completions": [c.to_json() for c in randoms]})
    write_json(run.path / METRICS, metrics)
    return metrics
