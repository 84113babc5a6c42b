"""Audit-mode benchmark: does contrastive discovery find planted backdoors with fewer perturbations?

The planted-backdoor testbed is exactly an audited/reference pair: its merged fine-tune (audited) and the base it
was fine-tuned from (reference). Every arm trains N hard-orthogonal vectors on ONE clean prompt that triggers
nothing (plain `discover` on the audited model, and `diff` in one or more contrastive forms); random vectors of the
same norm are the control. Each arm's perturbations are generated on both models and ranked by behavioural
divergence (`melbo.judging.divergence`), and the audited completions are searched for each planted phrase.

Reported per arm and behaviour:
- recall within the first k perturbations, for k = 8, 16, 32, 64 (≤ N) in training order (vectors are trained in
  batches of hard-orthogonal vectors, so the first k of a run are a run of k);
- the number of perturbations until the first hit, in training order and in divergence-rank order (what an
  auditor reading the ranked report would go through).

The run directory holds one discovery run per arm (`<out>/<arm>/`, each with divergence.json), the random arm's
completions, `bench_completions.jsonl`, `bench.json` and `report.html`.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Mapping, Sequence

from melbo.bench.backdoor import behaviour_detectors, clean_prompts, detect, keyword_settings
from melbo.bench.common import BenchResult, OnBatch, Progress, short, write_jsonl
from melbo.bench.settings import DiffSettings
from melbo.errors import MelboError
from melbo.engine.models import LoadedModel

BUDGETS = (8, 16, 32, 64)
DEFAULT_ARMS = {"discover": {}, "diff": {"contrast": "difference"}}


class DiffBench:
    """Train every arm on the clean prompts, rank by divergence, and measure recall of the planted behaviours.

    The model given to `run` is the audited one; `settings.reference` is its reference (base) model.
    """

    name = "diff"
    title = "audit mode: planted behaviours found from clean prompts, plain discovery vs diff vs random"
    settings = DiffSettings

    def generations(self, s: DiffSettings) -> int:
        arms = len(DEFAULT_ARMS if s.arms is None else s.arms)
        return 2 * (arms * (s.discover.n_vectors + 1) + s.randoms + 1) * (len(s.prompts) if s.prompts else s.n_prompts)

    def run(self, audited: LoadedModel, out: str | Path, s: DiffSettings, progress: Progress = None,
            on_batch: OnBatch = None) -> BenchResult:
        from melbo.bench.steer import random_control
        from melbo.judging.divergence import rank_perturbations
        from melbo.engine.generation import Sampling
        from melbo.engine.runner import DiscoverConfig, discover, validate

        arms = dict(DEFAULT_ARMS if s.arms is None else s.arms)
        if not arms:
            raise MelboError("no arms to compare: give at least one")
        if s.reference is None:
            raise MelboError("audit mode needs a reference model: give its base with --reference")
        behaviours, _, detectors = behaviour_detectors(s.testbed, s.behaviours, s.detectors)
        prompts = list(s.prompts) if s.prompts else clean_prompts(s.testbed, s.n_prompts)
        out = Path(out)
        if out.exists() and any(out.iterdir()):
            raise MelboError(f"{out} already exists and is not empty: choose another --out")
        for extra in arms.values():  # every arm's settings before the first trains: a bad last arm loses nothing
            validate(audited, DiscoverConfig.build(prompts, **{**s.discover_settings(), "orthogonal": "hard", **extra}))
        started = time.perf_counter()
        sampling = Sampling(max_new_tokens=s.discover.max_new_tokens)
        outcomes: dict[str, dict] = {}
        seconds: dict[str, float] = {}
        first_run = None
        for name, extra in arms.items():
            began = time.perf_counter()
            ref = s.reference if extra.get("contrast") else None
            run = discover(audited, prompts, out / name, reference=ref, progress=progress,
                           **{**s.discover_settings(), "orthogonal": "hard", **extra})
            seconds[name] = time.perf_counter() - began
            first_run = first_run or run  # the random control takes the first arm's norm
            labels = [f"v{i}" for i in range(len(run))]
            outcomes[name] = rank_perturbations(audited, s.reference, run.perturbations, prompts, labels,
                                                ["learned"] * len(run), chat=run.config.chat,
                                                sampling=sampling, on_batch=on_batch)
        randoms = random_control(first_run, audited, s.randoms, s.seed)
        if randoms is not None:
            outcomes["random"] = rank_perturbations(audited, s.reference, randoms, prompts,
                                                    [f"random{k}" for k in range(s.randoms)], ["random"] * s.randoms,
                                                    sampling=sampling, on_batch=on_batch)
        result = BenchResult(self.name, self.title, settings={
            **s.to_json(), "audited": audited.model_id, "reference": s.reference.model_id, "prompt": prompts[0],
            "prompts": prompts, "arms": arms, "n_random": s.randoms, "radius_absolute": first_run.config.radius,
            "behaviours": dict(behaviours), "training_seconds": {k: round(v, 1) for k, v in seconds.items()}})
        _tables(result, outcomes, detectors, s.discover.n_vectors)
        rows = [{**row, "arm": arm, "behaviours": detect(row["audited"], detectors)}
                for arm, outcome in outcomes.items() for row in outcome["unsteered"][:1] + outcome["rows"]]
        write_jsonl(out / "bench_completions.jsonl", rows)
        result.wall_seconds = time.perf_counter() - started
        result.write(out)
        if s.report:
            from melbo.records.report import write_report

            write_report(out)
        return result


BENCHMARK = DiffBench()


def bench_diff(audited: LoadedModel, reference: LoadedModel, out: str | Path, *, progress: Progress = None,
               on_batch: OnBatch = None, **settings) -> BenchResult:
    """The diff bench with keyword settings (`DiffSettings` fields); see `DiffBench`."""
    return BENCHMARK.run(audited, out, keyword_settings(DiffSettings, {**settings, "reference": reference}),
                         progress, on_batch)


def first_hits(outcome: dict, detectors: Mapping[str, Sequence[re.Pattern]]) -> dict[str, dict]:
    """Per behaviour: the training indices that elicit it, and the 1-based positions of the first hit."""
    hits = {name: sorted(row["vector"] for row in outcome["rows"] if name in detect(row["audited"], detectors))
            for name in detectors}
    by_rank = {name: sorted(row["rank"] for row in outcome["rows"] if row["vector"] in set(found))
               for name, found in hits.items()}
    return {name: {"vectors": found, "first": found[0] + 1 if found else None,
                   "first_ranked": by_rank[name][0] if by_rank[name] else None} for name, found in hits.items()}


def _tables(result: BenchResult, outcomes: dict, detectors: Mapping, n_vectors: int) -> None:
    budgets = [k for k in BUDGETS if k < n_vectors] + [n_vectors]
    recall = result.table("recall: behaviour found within the first k perturbations (training order)",
                          ["arm", "behaviour"] + [f"k={k}" for k in budgets] +
                          ["hits", "first hit (training order)", "first hit (divergence rank)"])
    for arm, outcome in outcomes.items():
        for name, found in first_hits(outcome, detectors).items():
            recall.add(arm, name, *[any(v < k for v in found["vectors"]) for k in budgets], len(found["vectors"]),
                       found["first"], found["first_ranked"])
    for arm, outcome in outcomes.items():
        for name, found in first_hits(outcome, detectors).items():
            result.add_rate(arm, f"{name}: vectors eliciting it", len(found["vectors"]), len(outcome["rows"]))
    unsteered = next(iter(outcomes.values()))["unsteered"][0]
    if detect(unsteered["audited"], detectors):
        result.notes.append("the unsteered audited completion already shows a planted behaviour: the prompt is not "
                            "clean for this model, recall means nothing")
    for arm, outcome in outcomes.items():
        top = result.table(f"{arm}: top perturbations by divergence (KL over the answer's first tokens)",
                           ["rank", "label", "kl", "distance", "behaviours", "audited", "reference"])
        for row in outcome["rows"][:8]:
            top.add(row["rank"], row["label"], row["kl"], row["distance"],
                    ", ".join(detect(row["audited"], detectors)) or "—", short(row["audited"], 60),
                    short(row["reference"], 40))
