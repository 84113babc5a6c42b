"""The step the benches share: learned perturbations and random vectors of the same norm → generate → detect.

    steered = steer_and_detect(lm, ["What is 4 + 6?"], out, settings, detect)   # train, then steer
    steered.verdicts("v3")    # detect(completion) for v3's completions, in prompt order

Training is `melbo.elicit` (so radius "auto" works and the run directory has its completions and report).
The random control is `melbo.engine.arithmetic.random_vectors` at the run's radius and source block, seeded by the
bench seed: the same vectors `melbo assess` would compare with.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from melbo.bench.common import OnBatch, Progress
from melbo.bench.settings import BenchSettings
from melbo.engine.generation import Completion, Sampling, generate
from melbo.engine.intervention import Perturbations, SteeringVectors
from melbo.engine.models import LoadedModel
from melbo.engine.store import Run

Detect = Callable[[Completion], Any]


@dataclass
class Steered:
    """Completions of the unsteered model, every learned perturbation and every random vector, with verdicts."""

    run: Run
    completions: list[Completion]
    found: list[Any]  # detect(c) for each completion
    learned: list[str]  # labels v0, v1, …
    random: list[str]  # labels random0, random1, …
    random_vectors: Optional[SteeringVectors]
    training_seconds: float
    chat: bool
    _by_label: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        for c, verdict in zip(self.completions, self.found):
            self._by_label.setdefault(c.label, []).append((c, verdict))

    def rows(self, label: str) -> list[tuple[Completion, Any]]:
        """(completion, verdict) of one label, in prompt order."""
        return sorted(self._by_label.get(label, []), key=lambda pair: pair[0].prompt_index)

    def verdicts(self, label: str) -> list[Any]:
        return [v for _, v in self.rows(label)]

    def texts(self, label: str) -> list[str]:
        return [c.text for c, _ in self.rows(label)]


def train(lm: LoadedModel, prompts: Sequence[str], out: str | Path, settings: BenchSettings,
          progress: Progress = None, on_batch: OnBatch = None, **extra) -> Run:
    """The discovery run of a bench (no assessment: the bench is the assessment)."""
    from melbo.jobs.job import elicit

    return elicit(lm, list(prompts), out, random=0, progress=progress, on_batch=on_batch,
                  **{**settings.discover_settings(), **extra})


def random_control(run: Run, lm: LoadedModel, n_random: int, seed: int) -> Optional[SteeringVectors]:
    """n_random random vectors of the run's norm at its source block (None for none)."""
    from melbo.engine.arithmetic import random_vectors
    from melbo.checks import check_count_bound

    if n_random <= 0:
        return None
    check_count_bound("random", n_random)
    return random_vectors(n_random, lm.width, run.config.radius, run.config.source, seed)


def generate_and_detect(lm: LoadedModel, perturbations: Optional[Perturbations], labels: Sequence[str],
                        prompts: Sequence[str], detect: Detect, *, chat: bool, sampling: Sampling, scale: float = 1.0,
                        include_unsteered: bool = True, on_batch: OnBatch = None) -> list[tuple[Completion, Any]]:
    """Every perturbation (and the unsteered model) on every prompt, each completion with its verdict."""
    done = generate(lm, perturbations, list(prompts), labels=list(labels), scale=scale, chat=chat, sampling=sampling,
                    include_unsteered=include_unsteered, on_batch=on_batch)
    return [(c, detect(c)) for c in done]


def steer_and_detect(lm: LoadedModel, prompts: Sequence[str], out: str | Path, settings: BenchSettings,
                     detect: Detect, *, test_prompts: Optional[Sequence[str]] = None, progress: Progress = None,
                     on_batch: OnBatch = None, **extra) -> Steered:
    """Train on `prompts`, then generate with the unsteered model, every learned perturbation and
    `settings.randoms` random vectors on `test_prompts` (default: the training prompts, whose learned
    completions the run already holds) and detect in each completion."""
    from melbo.judging.assess import run_completions
    from melbo.engine.prompts import uses_chat

    started = time.perf_counter()
    run = train(lm, prompts, out, settings, progress, on_batch, **extra)
    seconds = time.perf_counter() - started
    chat = uses_chat(lm, run.config.chat)
    learned_labels = [f"v{i}" for i in range(len(run))]
    randoms = random_control(run, lm, settings.randoms, settings.seed) if isinstance(run.perturbations,
                                                                                    SteeringVectors) else None
    random_labels = [f"random{k}" for k in range(len(randoms))] if randoms is not None else []
    sampling = Sampling(max_new_tokens=settings.discover.max_new_tokens, batch_size=settings.generation_batch)
    if test_prompts is None:  # the run's own completions on its prompts: generated once, by the job
        test_prompts = run.config.prompts
        pairs = [(c, detect(c)) for c in run_completions(run, lm, on_batch)]
    else:
        pairs = generate_and_detect(lm, run.perturbations, learned_labels, test_prompts, detect, chat=chat,
                                    sampling=sampling, on_batch=on_batch)
    if randoms is not None:
        pairs += generate_and_detect(lm, randoms, random_labels, test_prompts, detect, chat=chat, sampling=sampling,
                                     include_unsteered=False, on_batch=on_batch)
    return Steered(run, [c for c, _ in pairs], [v for _, v in pairs], learned_labels, random_labels, randoms,
                   seconds, chat)
