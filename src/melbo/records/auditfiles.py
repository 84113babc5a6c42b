"""The files of an audit directory and of `melbo triggers`, read back with every field checked.

    audit.json            the audit's state: settings, models, calibration, plan, stages (`melbo.jobs.auditing`)
    findings.json         the ranked findings and the dropped candidates
    observations.jsonl    every steered completion of the scan (`findings.Observation`)
    confirmations.jsonl   one verdict per confirmed candidate
    triggers.json         per finding, the ranked and the confirmed inputs (`melbo.jobs.trigger_search`)

The writers are the jobs (layer 7); the readers sit here, below the report and the server that read the files too.
Each returns the plain dict its writer wrote (the job updates audit.json's in place; the templates show them), after
checking every field through `jsonfields.Fields`: a hand-edited or truncated file is one line naming the file, the
field and the fix, not a KeyError in the report or a 500 on the server's Findings page.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from melbo.judging import findings as fnd
from melbo.io.jsonfields import Fields, read_lines

AUDIT = "audit.json"
FINDINGS = "findings.json"
OBSERVATIONS = "observations.jsonl"
CONFIRMATIONS = "confirmations.jsonl"
TRIGGERS_JSON = "triggers.json"


FIX = "restore it, or run `melbo audit` again into a new directory"
ARM_METHODS = ("vectors", "dct", "diff")
PRECISIONS = ("auto", "fp32", "bf16")


def read_state(raw: object, file: Path | str = AUDIT) -> dict:
    """audit.json (`audit` writes it, `_Job` updates it). Audits written before settings.scan_precision and
    stages.confirm.rounds existed lack them: both optional."""
    f = Fields(raw, file, FIX)
    _settings(f.object("settings"))
    _model(f.object("model"))
    f.raw.setdefault("reference", None)
    if f.raw["reference"] is not None:
        _model(f.object("reference"))
    f.text("status", "running", choices=("running", "complete"))
    f.raw["spent"] = f.real("spent", 0, default=0.0)
    f.raw.setdefault("stages", {})  # the job records each stage into it
    stages = f.object("stages")
    for name in stages.raw:
        stage = stages.object(name)
        stage.raw["seconds"] = stage.real("seconds", 0, default=None)
    if "scan" in stages.raw:
        stages.object("scan").real("per_completion", 0)  # the confirmation paces itself by it
    if "confirm" in stages.raw:
        stages.object("confirm").whole("rounds", 0, default=None)
    _calibration(f.object("calibration", None))
    _plan(f.object("plan", None))
    return f.raw


def read_findings(raw: object, file: Path | str = FINDINGS) -> dict:
    """findings.json (`_Job._write`): the ranked findings, the dropped candidates and the audit's settings."""
    f = Fields(raw, file, FIX)
    for finding in f.objects("findings"):
        _finding(finding)
    for c in f.objects("candidates", []):
        c.real("score", default=None), c.flag("confirmed"), c.real("reproduction", 0, 1, default=None)
        _parts(c.object("parts"))
        _observation(c, "example")
        c.texts("perturbations", [])
    f.raw.setdefault("candidates", [])
    _settings(f.object("settings"))
    _calibration(f.object("calibration")), _plan(f.object("plan"))
    f.whole("observations", 0, default=0)
    return f.raw


def read_observations(file: Path) -> list[fnd.Observation]:
    """observations.jsonl (`_Job._scan`): every steered completion of the scan."""
    return [fnd.Observation.from_fields(row) for row in read_lines(file, FIX)]


def read_confirmations(file: Path) -> list[dict]:
    """confirmations.jsonl (`_Job._confirm`): one verdict per confirmed candidate (`_Job._judge`)."""
    rows = read_lines(file, FIX)
    for c in rows:
        for i, member in enumerate(c.items("members")):
            c.check_whole(f"members[{i}]", member, 0)
        c.real("reproduction", 0, 1), c.real("fluency", 0, 1)
        c.whole("matched", 0), c.whole("rows", 0), c.whole("new_prompts", 0)
        c.reals("scales"), c.texts("triggers")
        for e in c.objects("examples"):
            fnd.Observation.from_fields(e)
        _observation(c, "best")
    return [c.raw for c in rows]


def _model(m: Fields) -> None:
    """A model's `describe()`: its spec loads it again (`--resume`, the reproduction command), its id is shown."""
    m.text("spec"), m.text("id", None)
    m.raw.setdefault("id", None)


def _observation(f: Fields, key: str) -> dict:
    """The observation at `key`, checked and written back with every field (an older file's missing ones)."""
    f.raw[key] = fnd.Observation.from_fields(f.object(key)).to_json()
    return f.raw[key]


def _settings(s: Fields) -> None:
    if not s.texts("prompts"):
        raise s.error("settings.prompts", "is empty")
    s.real("budget", above=0), s.whole("seed"), s.flag("chat", None), s.whole("max_new_tokens", 1)
    s.raw.setdefault("random_baseline", False)
    s.flag("random_baseline"), s.text("check", None), s.text("scan_precision", None, choices=PRECISIONS)


def _calibration(c: Optional[Fields]) -> Optional[Fields]:
    if c is not None:
        c.whole("source", 0), c.whole("target", 0), c.real("residual_norm", above=0)
        c.real("relative", above=0), c.real("radius", above=0)
    return c


def _plan(p: Optional[Fields]) -> Optional[Fields]:
    if p is not None:
        p.real("rate", above=0)
        for a in p.objects("arms"):
            a.text("name"), a.text("method", choices=ARM_METHODS), a.real("multiplier", above=0)
            a.whole("n", 0, default=0), a.whole("steps", 0)
            for key in a.rest(("name", "method", "multiplier", "n", "steps")):
                raise a.error(f"{a.where}.{key}", "is not a field of an arm")  # `Arm(**arm)` would fail on it
    return p


def _parts(p: Fields) -> None:
    for key in ("divergence", "rarity", "fluency", "consistency"):
        p.real(key)


def _finding(f: Fields) -> None:
    f.whole("rank", 1), f.text("label"), f.real("label_confidence", default=None), f.text("words", "")
    f.real("score"), _parts(f.object("parts"))
    _observation(f, "example")
    for e in f.objects("examples", []) + f.objects("scan_examples", []):
        fnd.Observation.from_fields(e)
    for p in f.objects("perturbations"):
        p.text("run"), p.text("arm"), p.whole("index", 0)
    r = f.object("reproduction")
    r.whole("matched", 0), r.whole("rows", 0), r.whole("new_prompts", 0), r.reals("scales", [])
    f.texts("unsteered_shows_it_on", []), f.text("reproduce")


TRIGGERS_FIX = "run `melbo triggers` again to rewrite it"
MODES = ("corpus", "exhaustive", "gradient")


def read_triggers(raw: object, file: Path | str = TRIGGERS_JSON) -> dict:
    """triggers.json (`write_triggers`): what the report and the server's Findings page read, each field checked;
    returned as the dict `write_triggers` wrote."""
    f = Fields(raw, file, TRIGGERS_FIX)
    f.text("source"), f.text("mode", choices=MODES), f.text("template", None)
    f.raw.setdefault("template", None)
    for finding in f.objects("findings"):
        finding.whole("finding", 1), finding.text("label", ""), finding.texts("phrases", [])
        for r in finding.objects("ranking"):
            r.whole("rank", 1), r.whole("index", 0), r.text("input"), r.real("score"), r.real("logprob")
            r.text("phrase"), r.whole("offset", 0), r.text("answer_start")
        for c in finding.objects("confirmed"):
            c.text("input"), c.text("answer"), c.real("match", -1, 1), c.flag("shows")
    cost = f.object("cost")
    cost.whole("inputs", 0), cost.real("seconds", 0), cost.whole("baseline_forward_passes", 0)
    cost.object("scoring").whole("forward_passes", 0), cost.object("confirm").whole("forward_passes", 0)
    return f.raw
