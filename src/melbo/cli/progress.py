"""Live progress displays on stderr: training bars, generation bars, the testbed's fine-tuning bar, and
`JobDisplay`, which follows the stages of `melbo.elicit` (and of the benches built on it)."""

from __future__ import annotations

import time
from typing import Callable, Optional

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from melbo.cli.app import err, shown


def training_progress() -> tuple[Progress, Callable[[dict], None]]:
    bar = Progress(
        TextColumn("[bold]batch {task.fields[batch]}"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
        TextColumn("{task.fields[rate]:.1f} vector-steps/s"), TextColumn("objective {task.fields[objective]:.4g}"),
        TimeElapsedColumn(), console=err, transient=False,
    )
    state: dict = {}

    def update(event: dict) -> None:
        key = event["batch"]
        if key not in state:
            state[key] = (bar.add_task("", total=event["steps"], batch=f"{key + 1}/{event['batches']}",
                                       rate=0.0, objective=0.0), time.perf_counter())
        task, started = state[key]
        elapsed = max(time.perf_counter() - started, 1e-9)
        bar.update(task, completed=event["step"], objective=event["objective"],
                   rate=event["step"] * event["n"] / elapsed)

    return bar, update


def generation_progress(total: int) -> tuple[Progress, Callable[[int], None]]:
    bar = Progress(TextColumn("[bold]generating"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TimeElapsedColumn(), console=err)
    task = bar.add_task("", total=total)
    return bar, lambda n: bar.advance(task, n)


def plant_progress() -> tuple[Progress, Callable[[dict], None]]:
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TextColumn("loss {task.fields[loss]:.3f}"), TimeElapsedColumn(), console=err)
    state: dict = {}

    def update(event: dict) -> None:
        if "task" not in state:
            state["task"] = bar.add_task("fine-tuning the testbed", total=event.get("steps", 1), loss=float("nan"))
        if event["stage"] == "train":
            bar.update(state["task"], completed=event["step"], loss=event["loss"])
        else:
            bar.update(state["task"], description="merging and verifying")

    return bar, update


class JobDisplay:
    """One live display at a time for a job's stages: a spinner, the training bars, the generation bar.

    `event` takes `melbo.elicit`'s progress events, `advance` its generation counts. A bench passes the total
    of all its generations, which go on after the job's own: the generation bar then stays up to the end.
    """

    def __init__(self, generations: Optional[int] = None):
        self.generations = generations
        self.live = None
        self.training: Optional[Callable[[dict], None]] = None
        self.generated: Optional[Callable[[int], None]] = None

    def __enter__(self) -> "JobDisplay":
        return self

    def __exit__(self, *exc) -> None:
        self._show(None)

    def _show(self, live) -> None:
        if self.live is not None:
            self.live.stop()
        self.live = live
        if live is not None:
            live.start()

    def event(self, event: dict) -> None:
        stage = event.get("stage")
        if stage is None:
            self._train(event)
        elif stage == "sweep":
            self._show(err.status(f"radius auto: sweeping R into {shown(event['out'])} …"))
        elif stage == "radius":
            self._show(None)
            err.print(f"radius auto: chose R = {event['radius']} (details in {shown(event['out'])})")
        elif stage == "generate":
            self._generation_bar(event["total"])
        elif stage == "assess":
            self._show(err.status("assessing: random baseline, diversity, fluency, clusters …"))
        elif stage == "check":
            self._show(err.status(f"checking every completion with {shown(str(event['checker']))} …"))
        elif stage == "report" and self.generations is None:
            self._show(None)

    def advance(self, n: int) -> None:
        self._generation_bar(0)
        self.generated(n)

    def _train(self, event: dict) -> None:
        if self.training is None:
            bar, self.training = training_progress()
            self._show(bar)
        self.training(event)

    def _generation_bar(self, total: int) -> None:
        if self.generated is None:
            bar, self.generated = generation_progress(self.generations or total)
            self._show(bar)


class AuditDisplay(JobDisplay):
    """`melbo.jobs.auditing`'s stages: one line per stage and arm, a training bar per arm, the generation bars."""

    def event(self, event: dict) -> None:
        stage = event.get("stage")
        if stage == "arm":
            self._show(None)
            self.training = None  # a fresh bar per arm: batch numbers start again
            what = "random vectors" if event.get("random") else "training"
            err.print(f"arm {shown(event['arm'])}: {what}, {event['n']} perturbations at R = {event['radius']}")
        elif stage in ("calibrate", "probe", "confirm", "findings"):
            self.generated = None
            words = {"calibrate": "calibrating R …", "probe": "measuring the training speed …",
                     "confirm": f"confirming {event.get('candidates', 0)} candidates on {event.get('prompts', 0)} prompts …",
                     "findings": "grouping, labelling, writing the findings …"}
            self._show(err.status(words[stage]))
        elif stage == "generate":
            self.generated = None
            super().event(event)
        else:
            super().event(event)
