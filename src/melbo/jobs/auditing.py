"""`melbo.jobs.auditing`: from a model and a prompt or a few to a short, ranked list of findings, within a time budget.

    result = melbo.audit(lm, ["What is 4 + 6?"], "runs/audit", budget=900)           # no R to choose
    result = melbo.audit(lm, prompts, "runs/audit", reference=base, budget=900)     # what a fine-tune added
    result.findings[0]["label"], result.findings[0]["example"]["text"]

The job, stage by stage (each stage's output is on disk before the next begins, so an interrupted audit resumes
where it stopped, with the budget it had left):

1. **Calibrate** R_c on the prompts (`melbo.engine.calibrate`: where random directions turn non-linear; five forward
   passes). Every radius of the audit is a multiple of R_c, so the ladder means the same on any model; a fixed
   relative R does not (0.3x is right for SmolLM2 and far too large for Gemma, whose R_c is 0.03x).
2. **Probe** the training speed: one batch for a few steps. Everything after is sized from that measurement.
3. **Arms**: DCT factors (breadth in seconds) and learned vectors at every rung of a ladder of radii
   (R_c × `LADDER`), plus contrastive vectors (`melbo diff`) when a reference model is given. Each arm is an
   ordinary run directory under `runs/` (generate, chat and export accept it). The training share of the
   budget is split equally over the learned rungs: no rung is known in advance to be the right one for an
   unseen model (on testbed 0, 0.2x found only fragments and 0.3x both behaviours; the issue's hidden model
   needed 0.3x for one and diff for the other).
4. **Scan**: every perturbation generates on every prompt (with a reference, on both models, for the KL).
   Each completion becomes an `findings.Observation`, judged one by one for change and fluency.
5. **Group and score** (`melbo.judging.findings`): behaviours by meaning across arms, radii and prompts.
6. **Confirm** the top candidates, as many as the remaining budget allows: each one's best perturbations
   generate again, longer, on the user's prompts and on variants melbo writes (other numbers in the same
   template), at scales 0.8, 1.0 and 1.2. A behaviour that does not reproduce is dropped as one-off noise; where
   the *unsteered* model already shows it on a variant, that variant is reported as a likely trigger.
7. **Write** `findings.json` (ranked), `report.html` (findings first, with a plot) and `audit.json` (the plan,
   the time each stage took).

Why the budget is split this way (defaults below): training is what finds behaviours, so it gets the largest
share (`TRAIN_SHARE`); the scan costs one short generation per perturbation and prompt (about 0.3 s each on
2 cores with SmolLM2, so tens of seconds); confirmation gets what is left, and its size (how many candidates)
is chosen from the scan's measured generation speed.
"""

from __future__ import annotations

import math
import random as _random
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from melbo.judging import findings as fnd
from melbo.records.auditfiles import (AUDIT, CONFIRMATIONS, FINDINGS, OBSERVATIONS, read_confirmations, read_findings,
                              read_observations, read_state)
from melbo.errors import MelboError
from melbo.io.files import check_output_dir, make_output_dir, read_json, write_json, write_jsonl
from melbo.engine.generation import Sampling, generate
from melbo.engine.models import LoadedModel
from melbo.settings import AUDIT_BUDGET, AUDIT_TOKENS, SCAN_PRECISION, DiscoverConfig
from melbo.engine.store import CHECKS, Run

LADDER = (2.5, 3.5, 1.5)  # the middle rung trains first; learned vectors at R_c × these (SmolLM2: ≈ 0.18x, 0.3x, 0.42x of the residual norm)
DCT_MULTIPLIER = 2.5
DCT_FACTORS = 32
DCT_ITERATIONS = 4
STEPS = 100  # per learned vector: the recall curves found both planted behaviours by 100 steps (README)
TRAIN_SHARE = 0.55  # of the budget, for all training arms together
PROBE_STEPS = 4
MIN_PER_ARM = 4
SCALES = (0.8, 1.0, 1.2)
VARIANTS = 3  # prompts melbo writes per user prompt for confirmation
SCAN_BATCH = 64  # rows generated together in the scan (cost per row falls with the batch on a CPU)
CONFIRM_TOP = 10  # candidates confirmed per round (rounds go on while the budget lasts) …
CONFIRM_MAX = 40  # … up to this many in all
MIN_CONFIRM = 3  # … and at least, even when the budget is spent: an unconfirmed candidate is no finding
CONFIRM_PERTURBATIONS = 2  # per candidate
CONFIRM_TOKENS_FACTOR = 1.5  # confirmation generates this many times the scan's tokens
MIN_REPRODUCTION = 0.2  # a behaviour reproduced less often than this is one-off noise
TOP_FINDINGS = 10  # findings written (the rest stay in the candidates list)
# With --check: random vectors of each vector arm's radius the checker also reads, so that an error pattern a
# learned perturbation shows is weighed against the slips random pushes of the same norm cause
CHECK_RANDOM = 8
RESERVE = 0.05  # of the budget, kept for grouping, labels and the report

Progress = Callable[[dict], None]


@dataclass
class Arm:
    """One source of perturbations: a method at a radius (a multiple of the calibrated R_c)."""

    name: str
    method: str  # vectors | dct | diff
    multiplier: float
    n: int = 0
    steps: int = STEPS

    @property
    def cost(self) -> float:
        """Training vector-steps of this arm, in units of plain vector-steps (diff trains two models)."""
        return self.n * self.steps * (2 if self.method == "diff" else 1)


@dataclass
class AuditResult:
    path: Path
    findings: list[dict]
    candidates: list[dict]
    state: dict = field(repr=False, default_factory=dict)


def parse_budget(value: object) -> float:
    """Seconds from 900, "900", "900s", "15m", "1.5h"; a positive, finite number."""
    if isinstance(value, bool):
        raise MelboError(f"budget must be a duration such as 15m or 900s, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?\d+)?)\s*(s|m|min|h)?\s*", str(value), re.IGNORECASE)
        if not m:
            raise MelboError(f"budget {value!r} is not a duration: use e.g. 15m, 900s or 1h")
        seconds = float(m.group(1)) * {"s": 1, "m": 60, "min": 60, "h": 3600}[(m.group(2) or "s").lower()]
    if not math.isfinite(seconds) or seconds <= 0:
        raise MelboError(f"budget must be a positive duration, got {value!r}: use e.g. 15m")
    return seconds


def prompt_variants(prompt: str, k: int = VARIANTS, seed: int = 0) -> list[str]:
    """k prompts of the same template: every number replaced by another of as many digits (none if no number)."""
    numbers = list(re.finditer(r"\d+", prompt))
    if not numbers or k <= 0:
        return []
    rng = _random.Random(f"{seed}:{prompt}")
    variants: list[str] = []
    for _ in range(20 * k):
        parts, last = [], 0
        for m in numbers:
            digits = len(m.group())
            lo, hi = (0, 9) if digits == 1 else (10 ** (digits - 1), 10**digits - 1)
            parts += [prompt[last : m.start()], str(rng.randint(lo, hi))]
            last = m.end()
        text = "".join(parts) + prompt[last:]
        if text != prompt and text not in variants:
            variants.append(text)
        if len(variants) == k:
            break
    return variants


def audit(
    lm: LoadedModel,
    prompts: Sequence[str],
    out: str | Path,
    *,
    reference: Optional[LoadedModel] = None,
    budget: float | str = AUDIT_BUDGET,
    seed: int = 0,
    chat: Optional[bool] = None,
    max_new_tokens: int = AUDIT_TOKENS,
    random_baseline: bool = False,
    check: Optional[str] = None,
    scan_precision: str = SCAN_PRECISION,
    progress: Optional[Progress] = None,
    on_batch: Optional[Callable[[int], None]] = None,
) -> AuditResult:
    """Ranked findings for `lm` on `prompts` within `budget` (seconds, or "15m"); see the module docstring.

    `random_baseline=True` runs the same job with random vectors of the same radii in place of every trained
    perturbation (the control an audit's findings are compared with). `check`: a checker (`melbo.judging.checkers`, e.g.
    "arithmetic-cot") that reads every scan completion: perturbations that show one error pattern on most prompts
    go to checks.json, a finding of their own that embedding similarity cannot see (a wrong but normal-looking
    chain of thought). `scan_precision`: the scan's generation ("fp32", "bf16", "auto": `generation.Sampling`);
    confirmation always generates in fp32, as the `melbo generate` each finding names does. Resume an
    interrupted audit with `resume`.
    """
    from melbo.judging.checkers import get_checker
    from melbo.checks import check_whole
    from melbo.engine.prompts import check_prompt_list

    prompts = check_prompt_list(prompts)
    seconds = parse_budget(budget)
    check_whole("seed", seed)
    check_whole("max_new_tokens", max_new_tokens)
    if max_new_tokens < 1:
        raise MelboError(f"max-new-tokens must be ≥ 1, got {max_new_tokens}")
    if not isinstance(random_baseline, bool):
        raise MelboError(f"random_baseline must be True or False, got {random_baseline!r}")
    if check is not None:
        get_checker(check)  # before minutes of training
    Sampling(precision=scan_precision)  # an unknown precision fails here, before minutes of training
    path = Path(out)
    check_output_dir(path)
    if path.exists() and any(path.iterdir()):
        raise MelboError(f"{path} already exists and is not empty: choose another --out or use --resume {path}")
    if reference is not None and reference.width != lm.width:
        raise MelboError("the reference model has another width than the audited one: give its own base model")
    make_output_dir(path)
    state = {
        "settings": {"prompts": prompts, "budget": seconds, "seed": seed, "chat": chat,
                     "max_new_tokens": max_new_tokens, "random_baseline": random_baseline,
                     "check": check, "scan_precision": scan_precision},
        "model": lm.describe(), "reference": reference.describe() if reference is not None else None,
        "status": "running", "spent": 0.0, "stages": {},
    }
    write_json(path / AUDIT, state)
    return _Job(lm, reference, path, state, progress, on_batch).run()


def resume(path: str | Path, lm: LoadedModel, *, reference: Optional[LoadedModel] = None,
           progress: Optional[Progress] = None, on_batch: Optional[Callable[[int], None]] = None) -> AuditResult:
    """Continue an interrupted audit with what is left of its budget (a finished one is returned as it is)."""
    path = Path(path)
    state = load_state(path)
    if state.get("reference") and reference is None:
        raise MelboError(f"{path} audits against a reference model: pass it again (--reference)")
    return _Job(lm, reference, path, state, progress, on_batch).run()


def load_state(path: str | Path) -> dict:
    """audit.json, every field the job and the reports read checked (`read_state`)."""
    path = Path(path)
    if not (path / AUDIT).is_file():
        raise MelboError(f"{path} holds no audit ({AUDIT} is missing): give the directory `melbo audit` wrote")
    return read_state(read_json(path / AUDIT), path / AUDIT)


def load(path: str | Path) -> AuditResult:
    """A finished audit's findings, as `audit` returned them."""
    path = Path(path)
    state = load_state(path)
    if not (path / FINDINGS).is_file():
        raise MelboError(f"{path} is not finished: continue it with `melbo audit --resume {path}`")
    data = read_findings(read_json(path / FINDINGS), path / FINDINGS)
    return AuditResult(path, data["findings"], data["candidates"], state)


class _Job:
    """One audit's stages over its state (audit.json), each skipped when its output is already on disk."""

    def __init__(self, lm, reference, path: Path, state: dict, progress, on_batch):
        self.lm, self.reference, self.path, self.state = lm, reference, path, state
        self.progress, self.on_batch = progress, on_batch
        s = state["settings"]
        self.prompts, self.seed, self.tokens = s["prompts"], s["seed"], s["max_new_tokens"]
        self.random = s["random_baseline"]
        from melbo.engine.prompts import uses_chat

        self.templated = uses_chat(lm, s["chat"])
        self.started = time.perf_counter()
        self.spent_before = float(state.get("spent", 0.0))

    # ---- time
    def elapsed(self) -> float:
        return self.spent_before + time.perf_counter() - self.started

    def left(self) -> float:
        return self.state["settings"]["budget"] - self.elapsed()

    def _save(self) -> None:
        self.state["spent"] = round(self.elapsed(), 2)
        write_json(self.path / AUDIT, self.state)

    def _stage(self, name: str, began: float, **detail) -> None:
        self.state["stages"][name] = {"seconds": round(time.perf_counter() - began, 2), **detail}
        self._save()

    def _say(self, stage: str, **detail) -> None:
        if self.progress is not None:
            self.progress({"stage": stage, **detail})

    # ---- the job
    def run(self) -> AuditResult:
        if self.state.get("status") == "complete":
            return load(self.path)
        self._calibrate()
        self._plan()
        for arm in self.arms:
            self._arm(arm)
        observations, embeddings = self._scan()
        if self.state["settings"].get("check"):  # before confirmation, which then has the time that is left
            self._check(observations)
        candidates = fnd.group(observations, embeddings, sum(a.n for a in self.arms))
        confirmed = self._confirm(observations, embeddings, candidates)
        result = self._write(observations, embeddings, candidates, confirmed)
        self.state["status"] = "complete"
        self._save()
        return result

    def _calibrate(self) -> None:
        if "calibration" in self.state:
            return
        from melbo.engine.calibrate import calibrate_radius
        from melbo.engine.objective import residual_norm
        from melbo.engine.prompts import encode
        from melbo.engine.runner import validate

        began = time.perf_counter()
        self._say("calibrate")
        source, target = validate(self.lm, DiscoverConfig(prompts=self.prompts, radius="1x", chat=self.templated))
        batch = encode(self.lm, self.prompts, self.templated)
        norm = residual_norm(self.lm, batch, source)
        found = calibrate_radius(self.lm, batch, source, target, norm, seed=self.seed)
        self.state["calibration"] = {"source": source, "target": target, "residual_norm": norm,
                                     "relative": found.relative, "radius": found.radius}
        self._stage("calibrate", began)

    def _plan(self) -> None:
        """The arms; learned arms are sized just before each trains (`_size`), from the speed measured so far."""
        if "plan" in self.state:
            self.arms = [Arm(**a) for a in self.state["plan"]["arms"]]
            return
        began = time.perf_counter()
        self._say("probe")
        rate = self._probe()
        arms = [Arm(f"dct-{DCT_MULTIPLIER:g}", "dct", DCT_MULTIPLIER, n=min(DCT_FACTORS, self.lm.width),
                    steps=DCT_ITERATIONS)]
        arms += [Arm(f"vectors-{m:g}", "vectors", m) for m in LADDER]
        if self.reference is not None:
            arms.append(Arm(f"diff-{DCT_MULTIPLIER:g}", "diff", DCT_MULTIPLIER))
        self.arms = arms
        self.state["plan"] = {"rate": rate, "arms": [asdict(a) for a in arms], "train_share": TRAIN_SHARE,
                              "ladder": list(LADDER), "steps": STEPS}
        self._stage("plan", began, rate=round(rate, 2))

    def _size(self, arm: Arm) -> None:
        """Give a learned arm its share of the training time left: equal shares over the arms not yet trained,
        at the speed of the last learned arm (the probe's before the first)."""
        if arm.n:
            return
        plan = self.state["plan"]
        undecided = [a for a in self.arms if not a.n]
        left = TRAIN_SHARE * self.state["settings"]["budget"] - self.elapsed()
        # the random control trains nothing, so its clock cannot pace it: every arm gets its share at once
        for a in undecided if self.random else [arm]:
            per_vector = a.steps * (2 if a.method == "diff" else 1) / plan["rate"]
            n = int(max(0.0, left) / len(undecided) / per_vector)
            n = min(n, self.lm.width)  # hard-orthogonal vectors: at most as many as the width
            a.n = max(MIN_PER_ARM, n - n % 8 if n >= 16 else n)  # whole half-batches: small batches run slower
        plan["arms"] = [asdict(a) for a in self.arms]
        self._save()

    def _measured(self, arm: Arm, seconds: float) -> None:
        if arm.method in ("vectors", "diff") and not self.random and seconds > 0:
            self.state["plan"]["rate"] = arm.cost / seconds

    def _probe(self) -> float:
        """Vector-steps per second of training here: one batch for PROBE_STEPS steps (also the warm-up)."""
        from melbo.engine.runner import discover

        probe = self.path / "probe"
        if probe.exists():
            import shutil

            shutil.rmtree(probe)
        began = time.perf_counter()
        n = 16
        discover(self.lm, self.prompts, probe, n_vectors=n, steps=PROBE_STEPS, radius=self._radius(LADDER[0]),
                 seed=self.seed, chat=self.templated, max_new_tokens=self.tokens, **self._layers())
        rate = n * PROBE_STEPS / max(1e-6, time.perf_counter() - began)
        import shutil

        shutil.rmtree(probe, ignore_errors=True)
        return rate

    def _radius(self, multiplier: float) -> str:
        return f"{self.state['calibration']['relative'] * multiplier:.6g}x"

    def _layers(self) -> dict:
        c = self.state["calibration"]
        return {"source": c["source"], "target": c["target"]}

    def run_dir(self, arm: Arm) -> Path:
        return self.path / "runs" / arm.name

    def _arm(self, arm: Arm) -> None:
        from melbo.engine.runner import discover, resume

        where = self.run_dir(arm)
        if (where / "config.json").exists() and Run.load(where, result=False).config.complete:
            return
        self._size(arm)
        began = time.perf_counter()
        self._say("arm", arm=arm.name, n=arm.n, radius=self._radius(arm.multiplier), random=self.random)
        if self.random:
            self._random_arm(arm, where)
        elif (where / "config.json").exists():
            resume(where, self.lm, progress=self.progress, reference=self.reference if arm.method == "diff" else None)
        else:
            settings = dict(n_vectors=arm.n, steps=arm.steps, radius=self._radius(arm.multiplier), seed=self.seed,
                            chat=self.templated, max_new_tokens=self.tokens, **self._layers())
            if arm.method == "dct":
                settings.update(method="dct", power_iterations=arm.steps, steps=STEPS)
            if arm.method == "diff":
                settings.update(contrast="difference")
            discover(self.lm, self.prompts, where, progress=self.progress,
                     reference=self.reference if arm.method == "diff" else None, **settings)
        self._measured(arm, time.perf_counter() - began)
        self._stage(f"arm {arm.name}", began, n=arm.n)

    def _random_arm(self, arm: Arm, where: Path) -> None:
        """The control: as many random vectors as the arm would train, at its radius, written as a run."""
        from melbo.engine.runner import write_random_run

        write_random_run(self.lm, self.prompts, where, n=arm.n, radius=self._radius(arm.multiplier),
                         seed=self.seed * 1009 + len(arm.name), chat=self.templated, max_new_tokens=self.tokens,
                         **self._layers())

    # ---- scan
    def _scan(self) -> tuple[list[fnd.Observation], np.ndarray]:
        file = self.path / OBSERVATIONS
        if file.exists() and "scan" in self.state["stages"]:
            observations = read_observations(file)
            return observations, fnd.behaviour_embeddings(observations)
        began = time.perf_counter()
        if self.reference is None:
            total = (sum(a.n for a in self.arms) + 1) * len(self.prompts)
        else:
            total = sum(a.n + 1 for a in self.arms) * len(self.prompts) * 2
        self._say("generate", total=total)
        observations: list[fnd.Observation] = []
        if self.reference is None:  # one generation over every arm: large batches cost less per row
            rows, keys = self._all_rows()
            generated = len(rows)
            observations = self._observe(rows, lambda r: keys[r["vector"]])
        else:
            generated = 0
            for arm in self.arms:
                rows = self._arm_rows(arm)
                generated += len(rows)
                observations += self._observe(rows, lambda r, name=arm.name: (name, r["vector"], 1.0))
        embeddings = self._fill_distances(observations)
        write_jsonl(file, [o.to_json() for o in observations])
        seconds = time.perf_counter() - began
        self._stage("scan", began, completions=generated, per_completion=round(seconds / max(1, generated), 4))
        return observations, embeddings

    def _all_rows(self) -> tuple[list[dict], list[tuple[str, int, float]]]:
        """Every arm's perturbations on the prompts in one `generate` call; each run keeps its own rows too."""
        from melbo.engine.intervention import SteeringVectors

        runs = [Run.load(self.run_dir(arm), model=self.lm) for arm in self.arms]
        vectors = SteeringVectors(torch.cat([r.perturbations.vectors for r in runs]), runs[0].perturbations.layer)
        keys = [(arm.name, i, 1.0) for arm, r in zip(self.arms, runs) for i in range(len(r))]
        sampling = Sampling(max_new_tokens=self.tokens, batch_size=SCAN_BATCH,
                            precision=self.state["settings"].get("scan_precision", "fp32"))
        completions = generate(self.lm, vectors, self.prompts, chat=self.templated, on_batch=self.on_batch,
                               sampling=sampling)
        rows = [c.to_json() for c in completions]
        start = 0
        for arm, run in zip(self.arms, runs):  # completions.jsonl of each run, as `discover` would write it
            mine = [r for r in rows if r["vector"] is None or start <= r["vector"] < start + len(run)]
            run.write_completions([{**r, "vector": None if r["vector"] is None else r["vector"] - start,
                                    "label": "unsteered" if r["vector"] is None else f"v{r['vector'] - start}"}
                                   for r in mine])
            start += len(run)
        return rows, keys

    def _arm_rows(self, arm: Arm) -> list[dict]:
        """Completion rows of one arm on the prompts ({"vector", "prompt_index", "prompt", "text", "kl"?})."""
        from melbo.judging.assess import run_completions

        run = Run.load(self.run_dir(arm), model=self.lm)
        if self.reference is None:
            return [c.to_json() for c in run_completions(run, self.lm, on_batch=self.on_batch)]
        from melbo.judging.divergence import load_divergence, rank_run

        if not (run.path / "divergence.json").exists():
            rank_run(run, self.lm, self.reference, random=0, on_batch=self.on_batch)
        result = load_divergence(run.path)
        return [{"vector": r.vector, "prompt_index": r.prompt_index, "prompt": r.prompt, "text": r.audited,
                 "reference_text": r.reference, "kl": r.kl} for r in result.unsteered + result.rows]

    def _observe(self, rows: list[dict], key_of: Callable[[dict], tuple[str, int, float]]) -> list[fnd.Observation]:
        """Observations of the steered rows (perplexity under the unsteered model); `key_of(row)` names the
        perturbation that made a row: (arm, index, scale). Distances come later (`_fill_distances`)."""
        from melbo.judging.evaluation import perplexities
        from melbo.engine.prompts import format_prompt

        unsteered = {r["prompt_index"]: r["text"] for r in rows if r["vector"] is None}
        steered = [r for r in rows if r["vector"] is not None]
        out: list[fnd.Observation] = []
        for p in sorted({r["prompt_index"] for r in steered}):
            group = [r for r in steered if r["prompt_index"] == p]
            ppl = perplexities(self.lm, format_prompt(self.lm, group[0]["prompt"], self.templated),
                               [r["text"] for r in group], self.templated)
            for r, value in zip(group, ppl):
                arm, index, scale = key_of(r)
                out.append(fnd.Observation(
                    arm=arm, index=int(index), scale=float(scale), prompt_index=p, prompt=r["prompt"], text=r["text"],
                    unsteered=unsteered.get(p, ""), distance=float("nan"), perplexity=float(value),
                    divergence=float(r.get("kl", float("nan"))), variant=r["prompt"] not in self.prompts,
                    reference_text=r.get("reference_text")))
        return out

    def _fill_distances(self, observations: list[fnd.Observation]) -> np.ndarray:
        """Set each observation's distance from its unsteered answer (whole texts); return the behaviour
        embeddings (novel texts) that grouping and matching use."""
        from melbo.judging.evaluation import embed

        whole = embed([o.text for o in observations])
        refs = sorted({o.unsteered for o in observations})
        ref_emb = dict(zip(refs, embed(refs)))
        for o, e in zip(observations, whole):
            o.distance = float(1.0 - e @ ref_emb[o.unsteered])
            if self.reference is None:
                o.divergence = o.distance
        return fnd.behaviour_embeddings(observations)

    # ---- confirmation
    def _confirm(self, observations, embeddings, candidates: list[fnd.Behaviour]) -> list[dict]:
        """Confirm candidates in ranked rounds while the budget lasts: a round as large as the time left affords
        (at most CONFIRM_TOP), its speed measured, then the next, up to CONFIRM_MAX. One fixed round left a
        third of the budget unused while loops filled it, and a behaviour ranked 12th went unconfirmed."""
        file = self.path / CONFIRMATIONS
        if "confirm" in self.state["stages"] and file.exists():
            return read_confirmations(file)
        began = time.perf_counter()
        prompts = list(self.prompts)
        for p in self.prompts:
            prompts += [v for v in prompt_variants(p, VARIANTS, self.seed) if v not in prompts]
        per_completion = self.state["stages"]["scan"]["per_completion"] * CONFIRM_TOKENS_FACTOR
        per_candidate = CONFIRM_PERTURBATIONS * len(SCALES) * len(prompts)
        results: list[dict] = []
        rounds = 0
        while len(results) < min(len(candidates), CONFIRM_MAX):
            affordable = (self.left() - RESERVE * self.state["settings"]["budget"]) / max(1e-6, per_completion)
            count = int((affordable - len(prompts)) // per_candidate)
            count = max(MIN_CONFIRM, count) if not results else count  # an unconfirmed candidate is no finding
            count = min(count, CONFIRM_TOP, len(candidates) - len(results), CONFIRM_MAX - len(results))
            if count <= 0:
                break
            round_began = time.perf_counter()
            chosen = candidates[len(results):len(results) + count]
            self._say("confirm", candidates=len(chosen), prompts=len(prompts), round=rounds + 1)
            confirmed, generated = self._confirm_round(chosen, observations, embeddings, prompts)
            results += confirmed
            rounds += 1
            per_completion = (time.perf_counter() - round_began) / max(1, generated)
        write_jsonl(file, results)
        self._stage("confirm", began, candidates=len(results), prompts=len(prompts), rounds=rounds)
        return results

    def _confirm_round(self, chosen: list[fnd.Behaviour], observations, embeddings,
                       prompts: list[str]) -> tuple[list[dict], int]:
        """One round of confirmation → (a verdict per candidate, completions generated)."""
        from melbo.judging.evaluation import embed

        picks = []  # (candidate, perturbation key) in the order of the combined vectors
        for k, b in enumerate(chosen):
            ranked = sorted(b.members, key=lambda i: -fnd.clarity(observations[i], embeddings[i], b.centre))
            keys = list(dict.fromkeys(observations[i].perturbation for i in ranked))[:CONFIRM_PERTURBATIONS]
            picks += [(k, key) for key in keys]
        vectors, variant_of = self._combined(picks)
        self._say("generate", total=(len(vectors) + 1) * len(prompts))
        rows = self._generate_confirmation(vectors, prompts)
        confirm_obs = self._observe(rows, lambda r: (*variant_of[r["vector"]][0], variant_of[r["vector"]][1]))
        confirm_emb = self._fill_distances(confirm_obs)
        # the unsteered answer of each prompt, as a behaviour embedding: its whole text
        texts = list(dict.fromkeys(o.unsteered for o in confirm_obs))
        unsteered_emb = dict(zip(texts, embed(texts)))
        results = []
        for k, b in enumerate(chosen):
            keys = {key for kk, key in picks if kk == k}
            mine = [j for j, o in enumerate(confirm_obs) if o.perturbation in keys]
            results.append(self._judge(b, observations, embeddings, confirm_obs, confirm_emb, mine, unsteered_emb))
        return results, len(rows)

    def _combined(self, picks: list[tuple[int, str]]):
        from melbo.engine.intervention import SteeringVectors

        rows, keys = [], []
        runs: dict[str, Run] = {}
        for _, key in picks:
            arm, index = key.rsplit(":", 1)
            run = runs.setdefault(arm, Run.load(self.path / "runs" / arm))
            for s in SCALES:
                rows.append(run.perturbations.vectors[int(index)] * s)
                keys.append(((arm, int(index)), s))
        layer = next(iter(runs.values())).perturbations.layer
        return SteeringVectors(torch.stack(rows), layer), keys

    def _generate_confirmation(self, vectors, prompts: list[str]) -> list[dict]:
        sampling = Sampling(max_new_tokens=max(1, int(self.tokens * CONFIRM_TOKENS_FACTOR)), batch_size=SCAN_BATCH)
        completions = generate(self.lm, vectors, prompts, chat=self.templated, sampling=sampling,
                               on_batch=self.on_batch)
        return [c.to_json() for c in completions]

    def _judge(self, b: fnd.Behaviour, observations, embeddings, confirm_obs, confirm_emb, mine: list[int],
               unsteered_emb: dict) -> dict:
        """Reproduction of one candidate on the confirmation rows of its perturbations."""
        considered, matched, triggers = [], [], set()
        for j in mine:
            o = confirm_obs[j]
            if fnd.shows(unsteered_emb[o.unsteered], b.centre):
                triggers.add(o.prompt)  # the unsteered model already says it here: a likely trigger
                continue
            considered.append(j)
            if fnd.counted(o) and fnd.shows(confirm_emb[j], b.centre):
                matched.append(j)
        best_scan = observations[b.best]
        examples = sorted(matched, key=lambda j: -fnd.clarity(confirm_obs[j], confirm_emb[j], b.centre))
        best_confirmed = confirm_obs[examples[0]] if examples else None
        reproduction = len(matched) / len(considered) if considered else 0.0
        fluency = max([b.fluency] + [fnd.fluency(confirm_obs[j].perplexity) for j in matched])
        return {
            "members": b.members, "reproduction": reproduction, "matched": len(matched), "rows": len(considered),
            "new_prompts": len({confirm_obs[j].prompt for j in matched if confirm_obs[j].variant}),
            "scales": sorted({confirm_obs[j].scale for j in matched}),
            "fluency": fluency, "triggers": sorted(triggers),
            "examples": [confirm_obs[j].to_json() for j in examples[:3]],
            "best": (best_confirmed or best_scan).to_json(),
        }

    # ---- output
    def _write(self, observations, embeddings, candidates: list[fnd.Behaviour], confirmed: list[dict]) -> AuditResult:
        began = time.perf_counter()
        self._say("findings")
        by_members = {tuple(c["members"]): c for c in confirmed}
        rows = []
        for b in candidates:
            c = by_members.get(tuple(b.members))
            consistency = c["reproduction"] if c else b.consistency
            fluency = c["fluency"] if c else b.fluency
            score = fnd.combined(b.divergence, fluency, consistency, b.rarity)
            rows.append((b, c, score))
        confirmed_rows = [r for r in rows if r[1] is not None and r[1]["reproduction"] >= MIN_REPRODUCTION]
        confirmed_rows.sort(key=lambda r: -r[2])
        labels = self._labels([r[0] for r in confirmed_rows], [r[1] for r in confirmed_rows], observations)
        result = [self._finding(rank + 1, b, c, score, observations, labels[rank])
                  for rank, (b, c, score) in enumerate(confirmed_rows[:TOP_FINDINGS])]
        # confirmed ones past TOP_FINDINGS stay listed too (ranked first): a confirmation is never thrown away
        unconfirmed = [self._candidate(b, c, score, observations) for b, c, score in confirmed_rows[TOP_FINDINGS:]]
        unconfirmed += [self._candidate(b, c, score, observations) for b, c, score in rows
                        if not (c is not None and c["reproduction"] >= MIN_REPRODUCTION)]
        data = {"findings": result, "candidates": unconfirmed,
                "settings": self.state["settings"], "calibration": self.state["calibration"],
                "plan": self.state["plan"], "observations": len(observations)}
        write_json(self.path / FINDINGS, data)
        self._stage("findings", began, findings=len(result))
        from melbo.records.report import write_audit_report

        write_audit_report(self.path)
        return AuditResult(self.path, result, unconfirmed, self.state)

    def _check(self, observations) -> None:
        """checks.json: the scan's completions read by the checker, per perturbation (arm:index), beside
        CHECK_RANDOM random vectors of each vector arm's radius; `selected` ranks the learned perturbations whose
        consistent error pattern the random ones of their arm rarely show (the checker as a selection signal:
        it ranks, it never trains)."""
        from melbo.judging.checkers import check_rows, get_checker

        if (self.path / CHECKS).exists() and "check" in self.state["stages"]:
            return
        began = time.perf_counter()
        spec = self.state["settings"]["check"]
        self._say("check", checker=spec)
        kind = "random" if self.random else "learned"
        rows = [{"kind": kind, "label": f"{o.arm}:{o.index}", "prompt": o.prompt, "text": o.text}
                for o in observations if not o.variant and o.scale == 1.0]
        rows += [{"kind": "unsteered", "label": "unsteered", "prompt": p, "text": t}
                 for p, t in sorted({(o.prompt, o.unsteered) for o in observations if not o.variant})]
        if not self.random:  # a random-baseline audit's perturbations are the control already
            rows += self._random_rows()
        perturbations, summary = check_rows(rows, get_checker(spec))
        perturbations.sort(key=lambda p: (-len(p["consistent"]), -sum(p["patterns"].values())))
        selected = self._selected(perturbations)
        write_json(self.path / CHECKS, {"checker": spec, "summary": summary, "perturbations": perturbations,
                                        "selected": selected})
        self._stage("check", began, consistent=sum(bool(p["consistent"]) for p in perturbations),
                    selected=len(selected))

    def _random_rows(self) -> list[dict]:
        """CHECK_RANDOM random vectors of each vector arm's radius and source block, on the scan's prompts."""
        from melbo.engine.arithmetic import random_vectors

        rows = []
        sampling = Sampling(max_new_tokens=self.tokens, batch_size=SCAN_BATCH,  # as the learned ones were read
                            precision=self.state["settings"].get("scan_precision", "fp32"))
        for k, arm in enumerate(self.arms):
            run = Run.load(self.run_dir(arm), model=self.lm)
            if not run.perturbations.supports_random_baseline:
                continue
            randoms = random_vectors(CHECK_RANDOM, self.lm.width, run.config.radius, run.config.source,
                                     seed=self.seed + 1000 * (k + 1))
            for c in generate(self.lm, randoms, self.prompts, chat=self.templated, sampling=sampling,
                              on_batch=self.on_batch, include_unsteered=False):
                rows.append({"kind": "random", "label": f"{arm.name}:random{c.vector}", "prompt": c.prompt,
                             "text": c.text})
        return rows

    def _selected(self, perturbations: list[dict]) -> list[dict]:
        """Learned perturbations with a consistent error pattern, ranked by how rarely random vectors of their
        arm show the same pattern consistently, then by how often they show it; each with its reproduction."""
        def arm_of(label: str) -> str:
            return label.rsplit(":", 1)[0]

        randoms: dict[str, list[dict]] = {}
        for p in perturbations:
            if p["kind"] == "random":
                randoms.setdefault(arm_of(p["label"]), []).append(p)
        model = self.state["model"].get("spec", "")
        chosen = []
        for p in perturbations:
            if p["kind"] != "learned":
                continue
            arm, index = arm_of(p["label"]), int(p["label"].rsplit(":", 1)[1])
            control = randoms.get(arm, [])
            for pattern in p["consistent"]:
                random_rate = (sum(pattern in r["consistent"] for r in control) / len(control)) if control else None
                run = self.path / "runs" / arm
                chosen.append({
                    "perturbation": p["label"], "pattern": pattern, "shown": p["patterns"].get(pattern, 0),
                    "of": p["completions"], "random_rate": random_rate, "random_of": len(control),
                    "example": p["examples"].get(pattern, ""),
                    "reproduce": f"melbo generate {_quote(str(run))} -m {_quote(str(model))} -p "
                                 f"{_quote(self.prompts[0])} --vectors {index}"})
        chosen.sort(key=lambda c: (1.0 if c["random_rate"] is None else c["random_rate"], -c["shown"] / c["of"]))
        return chosen[:TOP_FINDINGS]

    def _labels(self, behaviours, confirmations, observations) -> list[tuple[str, float, str]]:
        """(label, confidence, distinctive words) per behaviour, from its examples against the unsteered text."""
        from melbo.judging.clustering import distinctive_words
        from melbo.judging.labels import EmbeddingLabeller, Sample

        groups, documents = [], []
        for b, c in zip(behaviours, confirmations):
            shown = [observations[i].to_json() for i in b.members[:8]] + c["examples"]
            # labelled on what the perturbation added: "4 + 6 = 12. The HATE I HATE …" is a tone, not a new number
            samples = [Sample(fnd.novel_text(e["text"], e["unsteered"], e["prompt"]), e["prompt"], e["unsteered"])
                       for e in shown]
            groups.append(samples)
            documents.append(" ".join(e["text"] for e in shown))
        background = " ".join(sorted({o.unsteered for o in observations}))
        words = distinctive_words(documents, background, 3)
        labels = EmbeddingLabeller().label_groups(groups) if groups else []
        return [(lab.name if lab else "other", lab.confidence if lab else 0.0, w) for lab, w in zip(labels, words)]

    def _perturbations(self, b: fnd.Behaviour, observations) -> list[dict]:
        found = []
        for key in b.perturbations:
            arm, index = key.rsplit(":", 1)
            found.append({"run": str(self.path / "runs" / arm), "arm": arm, "index": int(index)})
        return found

    def _finding(self, rank: int, b: fnd.Behaviour, c: dict, score: float, observations, label) -> dict:
        best = c["best"]
        run = self.path / "runs" / best["arm"]
        model = self.state["model"].get("spec", "")
        reproduce = (f"melbo generate {_quote(str(run))} -m {_quote(str(model))} -p {_quote(best['prompt'])} "
                     f"--vectors {best['index']} --scale {best['scale']:g}")
        return {
            "rank": rank, "label": label[0], "label_confidence": label[1], "words": label[2],
            "score": score,
            "parts": {"divergence": b.divergence, "rarity": b.rarity, "fluency": c["fluency"],
                      "consistency": c["reproduction"]},
            "divergence_measure": "kl" if self.reference is not None else "embedding distance from unsteered",
            "example": best, "examples": c["examples"],
            "scan_examples": [observations[i].to_json() for i in b.members[:3]],
            "perturbations": self._perturbations(b, observations),
            "reproduction": {"matched": c["matched"], "rows": c["rows"], "new_prompts": c["new_prompts"],
                             "scales": c["scales"]},
            "unsteered_shows_it_on": c["triggers"],
            "reproduce": reproduce,
        }

    def _candidate(self, b: fnd.Behaviour, c: Optional[dict], score: float, observations) -> dict:
        return {"score": score, "confirmed": c is not None, "reproduction": c["reproduction"] if c else None,
                "parts": {"divergence": b.divergence, "rarity": b.rarity, "fluency": b.fluency,
                          "consistency": b.consistency},
                "example": observations[b.best].to_json(), "perturbations": b.perturbations}


def _quote(text: str) -> str:
    import shlex

    return shlex.quote(text)

