"""Assessing a finished run: are the learned perturbations more diverse than random ones of the same norm?

`assess_run(run, lm, random=K)` scores the run's stored completions (generating and storing them first if the
run has none), groups the learned perturbations into behaviours (`melbo.clustering`), generates with K random
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

from typing import Callable, Optional

from melbo import evaluation
from melbo.arithmetic import random_vectors
from melbo.errors import MelboError
from melbo.generation import Completion, Sampling, generate
from melbo.intervention import SteeringVectors
from melbo.models import LoadedModel
from melbo.settings import DEFAULT_RANDOM
from melbo.numbers import jsonable
from melbo.files import write_json
from melbo.store import METRICS, Run



def run_completions(run: Run, lm: LoadedModel, on_batch: Optional[Callable[[int], None]] = None) -> list[Completion]:
    """The run's completions on its training prompts: the stored ones, or generated now and stored."""
    rows = run.completions()
    if rows:
        return [Completion(**row) for row in rows]
    if run.perturbations is None:
        raise MelboError(f"run {run.path} is not finished: resume it with `melbo discover --resume {run.path}`")
    settings = run.config["settings"]
    completions = generate(lm, run.perturbations, settings["prompts"], chat=settings["chat"],
                           sampling=Sampling(max_new_tokens=settings["max_new_tokens"]), on_batch=on_batch)
    run.write_completions([c.to_json() for c in completions])
    return completions


def learned_and_random(run: Run, lm: LoadedModel, random: int, seed: int = 0,
                       on_batch: Optional[Callable[[int], None]] = None) -> tuple[list[Completion], list[Completion]]:
    """The run's completions on its training prompts, and those of `random` random vectors of its radius.

    The random rows (labels random0, random1, …) have no unsteered row of their own: with greedy decoding it
    would repeat the learned list's. Runs whose result is not vectors get no random rows.
    """
    learned = run_completions(run, lm, on_batch)
    if not random or not isinstance(run.perturbations, SteeringVectors):
        return learned, []
    settings = run.settings
    vectors = random_vectors(random, lm.width, float(run.config["radius"]), int(run.config["source"]), seed)
    randoms = generate(lm, vectors, settings["prompts"], labels=[f"random{k}" for k in range(random)],
                       include_unsteered=False, chat=settings["chat"],
                       sampling=Sampling(max_new_tokens=settings["max_new_tokens"]), on_batch=on_batch)
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
    settings = run.config["settings"]
    chat = settings["chat"]
    learned_completions, randoms = learned_and_random(run, lm, random, seed, on_batch)
    learned = evaluation.score(lm, learned_completions, chat=chat)

    from melbo.clustering import cluster_behaviours

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
