"""From a finding to its triggers: which real inputs make the *unsteered* model show it?

`triggers(lm, source, inputs)` scores every input of a corpus by phrase spotting (`melbo.judging.phrases`): how ready the
unsteered model is to write the finding's phrases, at its answer's start or a few tokens in, as a robust z-score
against the corpus. The inputs are ranked by their best phrase, and the first `confirm` are confirmed the slow way:
a greedy answer (`max_new_tokens`), matched to the finding's phrases by embedding similarity (≥ MATCH, as the
audit matches behaviours). A finding is an audit's (`melbo.jobs.auditing`), or a run's perturbation, whose phrases then
come from its stored completions.

`invert(lm, source, template)` is for when no corpus holds the trigger: `{?}` in the template marks a slot.
- With a vocabulary (`digits`, `numbers`, a list or a file of entries), every filling is scored exhaustively, up to
  MAX_FILLINGS, and ranked and confirmed like a corpus.
- With `vocab="tokens"` each slot is SLOT_TOKENS open tokens, searched GCG-style: the gradient of the finding's
  phrase log-likelihood with respect to the slots' one-hot tokens proposes the top-k swaps per position, a batch of
  single swaps is evaluated exactly, and the best is kept (Zou et al. 2023, "Universal and Transferable Adversarial
  Attacks on Aligned Language Models", Algorithm 1).

Cost is counted in forward passes and seconds, beside what generating an answer for every input would take
(`baseline_forward_passes`: one pass per generated token per batch).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from melbo.records.auditfiles import TRIGGERS_JSON, read_triggers
from melbo.checks import is_utf8
from melbo.errors import MelboError
from melbo.engine.models import LoadedModel
from melbo.judging.phrases import CHUNK, phrases_of, score_phrases
from melbo.settings import GCG_STEPS, TRIGGER_CONFIRM, TRIGGER_TOKENS

KEEP = 50  # ranked inputs written per finding
MATCH = 0.6  # embedding similarity of an answer to a phrase at which it shows the finding (findings.MATCH)
SLOT = "{?}"
MAX_FILLINGS = 5000  # exhaustive inversion beyond this asks for a smaller vocabulary or the gradient search
VOCABULARIES = {"digits": [str(i) for i in range(10)], "numbers": [str(i) for i in range(100)]}
SLOT_TOKENS = 2  # open tokens per slot in the gradient search
GCG_TOP_K = 32  # candidate tokens per position from the gradient
GCG_BATCH = 64  # single-token swaps evaluated per step

Progress = Optional[Callable[[dict], None]]


@dataclass
class TriggerReport:
    """What `triggers`/`invert` found: per finding, the ranked inputs and the confirmed ones."""

    path: Optional[Path]
    findings: list[dict]
    cost: dict = field(default_factory=dict)

    def top(self, finding: int = 0, k: int = 3) -> list[str]:
        return [r["input"] for r in self.findings[finding]["ranking"][:k]]


# ------------------------------------------------------------------------------------------------ sources
def load_findings(source: str | Path, finding: Optional[int] = None,
                  vectors: Optional[Sequence[int]] = None) -> tuple[list[dict], dict, Optional[bool]]:
    """(findings, model record: {spec, id, system, …}, chat) of an audit directory or a run directory (its
    perturbations `vectors` made findings of their completions); `finding` picks one by its rank."""
    path = Path(source)
    if (path / "audit.json").is_file():
        from melbo.jobs.auditing import load

        result = load(path)
        findings = result.findings
        model, chat = result.state["model"], result.state["settings"]["chat"]
    elif (path / "config.json").is_file():
        findings, model, chat = _run_findings(path, vectors)
    else:
        raise MelboError(f"{path} is neither an audit directory (audit.json) nor a run directory (config.json): "
                         "give the --out of `melbo audit` or of `melbo discover`")
    if not findings:
        raise MelboError(f"{path} has no findings to look for: audit with a larger --budget, or pick a run's "
                         "perturbations with --vectors")
    if finding is not None:
        ranks = [f["rank"] for f in findings]
        if finding not in ranks:
            raise MelboError(f"there is no finding {finding!r} in {path}: pick one of {', '.join(map(str, ranks))}")
        findings = [f for f in findings if f["rank"] == finding]
    return findings, model, chat


def _run_findings(path: Path, vectors: Optional[Sequence[int]]) -> tuple[list[dict], dict, Optional[bool]]:
    from melbo.engine.store import Run

    run = Run.load(path)
    rows = run.completions()
    if not rows:
        raise MelboError(f"{path} has no completions: generate them with `melbo generate {path}`")
    unsteered = {r["prompt"]: r["text"] for r in rows if r.get("vector") is None}
    present = sorted({r["vector"] for r in rows if r.get("vector") is not None})
    chosen = list(vectors) if vectors is not None else present
    missing = [v for v in chosen if v not in present]
    if missing:
        raise MelboError(f"perturbations {missing} have no completions in {path}: pick from 0..{len(run) - 1} "
                         "that were generated")
    findings = []
    for rank, v in enumerate(chosen, 1):
        examples = [{"text": r["text"], "prompt": r["prompt"], "unsteered": unsteered.get(r["prompt"], "")}
                    for r in rows if r.get("vector") == v]
        findings.append({"rank": rank, "label": f"v{v}", "example": examples[0], "examples": examples[1:],
                         "perturbations": [{"run": str(path), "index": v}]})
    return findings, run.config.model.to_dict(), run.config.chat


# ------------------------------------------------------------------------------------------------ corpus search
def triggers(lm: LoadedModel, source: str | Path, inputs: Sequence[str], out: Optional[str | Path] = None, *,
             finding: Optional[int] = None, vectors: Optional[Sequence[int]] = None, confirm: int = TRIGGER_CONFIRM,
             chat: Optional[bool] = None, max_new_tokens: int = TRIGGER_TOKENS, keep: int = KEEP,
             progress: Progress = None) -> TriggerReport:
    """Rank a corpus by how strongly the unsteered model shows each finding; confirm the top `confirm` by
    generation; keep the first `keep` of each ranking; write OUT/triggers.json and OUT/triggers.html when `out` is
    given (module docstring)."""
    findings, _, recorded_chat = load_findings(source, finding, vectors)
    inputs = _check_inputs(inputs, confirm, max_new_tokens)
    return _search(lm, findings, inputs, out, confirm, recorded_chat if chat is None else chat, max_new_tokens,
                   progress, {"source": str(source), "mode": "corpus"}, keep)


def _check_inputs(inputs: Sequence[str], confirm: int, max_new_tokens: int) -> list[str]:
    from melbo.engine.prompts import check_prompt_list

    if isinstance(inputs, (list, tuple)) and not inputs:
        raise MelboError("the corpus is empty: give at least one input, one per line of --inputs")
    inputs = check_prompt_list(inputs)
    blank = [i for i, x in enumerate(inputs) if not x.strip()]
    if blank:
        raise MelboError(f"input {blank[0]} is blank: remove blank lines from the corpus")
    for name, value in (("confirm", confirm), ("max_new_tokens", max_new_tokens)):
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= (0 if name == "confirm" else 1)):
            raise MelboError(f"{name} must be a whole number ≥ {0 if name == 'confirm' else 1}, got {value!r}")
    return inputs


def _search(lm, findings, inputs, out, confirm, chat, max_new_tokens, progress, meta, keep: int = KEEP) -> TriggerReport:
    started = time.perf_counter()
    columns, phrases = [], []
    for f in findings:
        own = phrases_of(f)
        columns.append(list(range(len(phrases), len(phrases) + len(own))))
        phrases += own
    if not phrases:
        raise MelboError("the findings have no example text with new words to look for")
    _emit(progress, {"stage": "score", "inputs": len(inputs), "phrases": len(phrases)})
    scores = score_phrases(lm, inputs, phrases, chat=chat,
                           progress=lambda n: _emit(progress, {"stage": "scored", "n": n}))
    z = scores.z()
    results = []
    confirm_seconds, confirm_passes = 0.0, 0
    for f, cols in zip(findings, columns):
        if not cols:
            continue
        best = z[:, cols].max(1)
        which = np.asarray(cols)[z[:, cols].argmax(1)]
        order = np.argsort(-best, kind="stable")
        ranking = [{"rank": r + 1, "index": int(i), "input": inputs[i], "score": float(best[i]),
                    "logprob": float(scores.logprob[i, which[i]]), "phrase": phrases[which[i]],
                    "offset": int(scores.offset[i, which[i]]), "answer_start": scores.answers[i]}
                   for r, i in enumerate(order[:keep])]
        began = time.perf_counter()
        confirmed, passes = confirm_inputs(lm, [inputs[i] for i in order[:confirm]], [phrases[c] for c in cols],
                                           chat, max_new_tokens)
        confirm_seconds += time.perf_counter() - began
        confirm_passes += passes
        _emit(progress, {"stage": "confirmed", "finding": f["rank"], "shown": sum(c["shows"] for c in confirmed)})
        results.append({"finding": f["rank"], "label": f.get("label", ""), "phrases": [phrases[c] for c in cols],
                        "ranking": ranking, "confirmed": confirmed})
    cost = {"inputs": len(inputs), "scoring": scores.cost,
            "confirm": {"forward_passes": confirm_passes, "seconds": round(confirm_seconds, 3)},
            "seconds": round(time.perf_counter() - started, 3),
            "baseline_forward_passes": -(-len(inputs) // CHUNK) * max_new_tokens}
    report = TriggerReport(Path(out) if out is not None else None, results, cost)
    if out is not None:
        write_triggers(Path(out), report, {**meta, "max_new_tokens": max_new_tokens, "confirm": confirm})
    return report


def confirm_inputs(lm: LoadedModel, inputs: Sequence[str], phrases: Sequence[str], chat: Optional[bool],
                   max_new_tokens: int) -> tuple[list[dict], int]:
    """Greedy answers to `inputs`, each matched to the phrases: (records, forward passes)."""
    if not inputs:
        return [], 0
    from melbo.judging.evaluation import embed
    from melbo.engine.generation import greedy_answers
    from melbo.engine.prompts import uses_chat

    answers = greedy_answers(lm, list(inputs), uses_chat(lm, chat), max_new_tokens=max_new_tokens)
    similarity = embed(answers) @ embed(list(phrases)).T  # [inputs, phrases]
    records = [{"input": x, "answer": a, "match": float(s.max()), "shows": bool(s.max() >= MATCH)}
               for x, a, s in zip(inputs, answers, similarity)]
    return records, -(-len(inputs) // 32) * max_new_tokens


def _emit(progress: Progress, event: dict) -> None:
    if progress:
        progress(event)


# ------------------------------------------------------------------------------------------------ inversion
def invert(lm: LoadedModel, source: str | Path, template: str, out: Optional[str | Path] = None, *,
           vocab: str | Sequence[str] = "numbers", finding: Optional[int] = None,
           vectors: Optional[Sequence[int]] = None, confirm: int = TRIGGER_CONFIRM, chat: Optional[bool] = None,
           max_new_tokens: int = TRIGGER_TOKENS, steps: int = GCG_STEPS, seed: int = 0, keep: int = KEEP,
           progress: Progress = None) -> TriggerReport:
    """Search the `{?}` slots of `template` for inputs that make the unsteered model show each finding (module
    docstring): exhaustively over a vocabulary, or GCG-style over open tokens with vocab="tokens"."""
    findings, _, recorded_chat = load_findings(source, finding, vectors)
    chat = recorded_chat if chat is None else chat
    if not isinstance(template, str) or SLOT not in template:
        raise MelboError(f"the template has no {SLOT} slot to search: write one where the trigger may go, "
                         f"e.g. \"What is {SLOT} + {SLOT}?\"")
    _check_inputs([template.replace(SLOT, "x")], confirm, max_new_tokens)
    meta = {"source": str(source), "template": template}
    if vocab == "tokens":
        return _gcg(lm, findings, template, out, confirm, chat, max_new_tokens, steps, seed, progress, meta)
    entries = vocabulary(vocab)
    slots = template.count(SLOT)
    if len(entries) ** slots > MAX_FILLINGS:
        raise MelboError(f"{len(entries)} entries in {slots} slots make {len(entries) ** slots} fillings, more than "
                         f"{MAX_FILLINGS}: use a smaller vocabulary, fewer slots, or --vocab tokens")
    fillings = [fill(template, combo) for combo in itertools.product(entries, repeat=slots)]
    return _search(lm, findings, fillings, out, confirm, chat, max_new_tokens, progress,
                   {**meta, "mode": "exhaustive", "vocabulary": len(entries)}, keep)


def fill(template: str, values: Sequence[str]) -> str:
    parts = template.split(SLOT)
    return parts[0] + "".join(v + rest for v, rest in zip(values, parts[1:]))


def vocabulary(vocab: str | Sequence[str]) -> list[str]:
    """A named vocabulary, a file of entries (one per line) or a list of entries, without blanks or repeats."""
    if isinstance(vocab, str):
        if vocab in VOCABULARIES:
            entries = VOCABULARIES[vocab]
        else:
            from melbo.io.files import read_text

            path = Path(vocab)
            if not path.exists():
                raise MelboError(f"unknown vocabulary {vocab!r}: use {', '.join(VOCABULARIES)}, tokens, or a file "
                                 "with one entry per line")
            entries = read_text(path, "vocabulary file").splitlines()
    else:
        entries = list(vocab)
    if any(not isinstance(e, str) for e in entries):
        raise MelboError("vocabulary entries must be text")
    if not all(is_utf8(e) for e in entries):
        raise MelboError("a vocabulary entry is not UTF-8 text: pass every entry as UTF-8")
    entries = list(dict.fromkeys(e.strip() for e in entries if e.strip()))
    if not entries:
        raise MelboError("the vocabulary is empty: give at least one entry")
    return entries


def _gcg(lm, findings, template, out, confirm, chat, max_new_tokens, steps, seed, progress, meta) -> TriggerReport:
    """GCG over open slot tokens, one search per finding, towards its first phrase; then scored and confirmed
    like a corpus of the searched prompts."""
    if not (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1):
        raise MelboError(f"steps must be a whole number ≥ 1, got {steps!r}")
    started = time.perf_counter()
    found: list[str] = []
    passes = 0
    for f in findings:
        phrases = phrases_of(f)
        if not phrases:
            continue
        prompts, used = gcg_search(lm, template, phrases[0], chat=chat, steps=steps, seed=seed,
                                   progress=lambda e: _emit(progress, {**e, "finding": f["rank"]}))
        found += [p for p in prompts if p not in found]
        passes += used
    if not found:
        raise MelboError("the findings have no example text with new words to search towards")
    report = _search(lm, findings, found, out, confirm, chat, max_new_tokens, progress,
                     {**meta, "mode": "gradient", "steps": steps})
    report.cost["search"] = {"forward_passes": passes, "seconds": round(time.perf_counter() - started, 3)}
    return report


def gcg_search(lm: LoadedModel, template: str, phrase: str, *, chat: Optional[bool] = None, steps: int = GCG_STEPS,
               top_k: int = GCG_TOP_K, batch: int = GCG_BATCH, seed: int = 0,
               progress: Progress = None) -> tuple[list[str], int]:
    """Open slot tokens that maximise log P(phrase | prompt) at the answer's start: (the template filled with the
    last few improvements, best first; forward passes used)."""
    from melbo.engine.prompts import format_prompt, tokenize, uses_chat

    templated = uses_chat(lm, chat)
    marker = "\u2063"  # a character no template contains: where the slots go after templating
    text = format_prompt(lm, template.replace(SLOT, marker), templated)
    pieces = text.split(marker)
    # the first piece gets the tokenizer's special tokens where raw text would (BOS); the others none
    piece_ids = [tokenize(lm, p, templated if i == 0 else True) for i, p in enumerate(pieces)]
    target = lm.tokenizer(" " + phrase, add_special_tokens=False)["input_ids"][:8]
    generator = torch.Generator().manual_seed(seed)
    allowed = _allowed_tokens(lm)
    slots = torch.tensor(allowed)[torch.randint(len(allowed), ((len(pieces) - 1) * SLOT_TOKENS,), generator=generator)]
    embeddings = lm.model.get_input_embeddings().weight

    def assemble(slot_ids: torch.Tensor) -> list[int]:
        ids = list(piece_ids[0])
        for k in range(len(pieces) - 1):
            ids += slot_ids[k * SLOT_TOKENS:(k + 1) * SLOT_TOKENS].tolist() + piece_ids[k + 1]
        return ids

    positions = _slot_positions(piece_ids)
    best_loss, best, history, passes = float("inf"), slots.clone(), [], 0
    for step in range(steps):
        ids = torch.tensor(assemble(slots) + target)
        one_hot = torch.zeros(len(ids), embeddings.shape[0], dtype=embeddings.dtype, device=embeddings.device)
        one_hot[torch.arange(len(ids)), ids.to(embeddings.device)] = 1
        one_hot.requires_grad_(True)
        logits = lm.model(inputs_embeds=(one_hot @ embeddings)[None]).logits[0]
        loss = -logits[-len(target) - 1:-1].float().log_softmax(-1)[torch.arange(len(target)), torch.tensor(target)].mean()
        grad, = torch.autograd.grad(loss, one_hot)
        passes += 1
        grad = grad[positions].float().cpu()
        mask = torch.full((grad.shape[1],), float("inf"))
        mask[allowed] = 0
        candidates = (-(grad + mask)).topk(top_k, dim=1).indices  # [slot positions, top_k]: steepest descents
        swaps = slots[None].repeat(batch, 1)
        where = torch.randint(len(positions), (batch,), generator=generator)
        choice = torch.randint(top_k, (batch,), generator=generator)
        swaps[torch.arange(batch), where] = candidates[where, choice]
        losses = _phrase_losses(lm, [assemble(s) for s in swaps], target)
        passes += 1
        k = int(losses.argmin())
        slots = swaps[k]
        if float(losses[k]) < best_loss:
            best_loss, best = float(losses[k]), slots.clone()
            history.append(fill(template, [lm.tokenizer.decode(best[k * SLOT_TOKENS:(k + 1) * SLOT_TOKENS])
                                           for k in range(len(pieces) - 1)]))
        _emit(progress, {"stage": "search", "step": step + 1, "steps": steps, "loss": best_loss})
    return list(dict.fromkeys(reversed(history[-5:]))), passes


def _slot_positions(piece_ids: list[list[int]]) -> list[int]:
    positions, at = [], len(piece_ids[0])
    for k in range(len(piece_ids) - 1):
        positions += list(range(at, at + SLOT_TOKENS))
        at += SLOT_TOKENS + len(piece_ids[k + 1])
    return positions


def _allowed_tokens(lm: LoadedModel) -> list[int]:
    """Tokens a slot may hold: printable text, no special tokens (a trigger a user could type)."""
    special = set(lm.tokenizer.all_special_ids)
    allowed = []
    for i in range(len(lm.tokenizer)):
        if i in special:
            continue
        text = lm.tokenizer.decode([i])
        if text.strip() and text.isprintable() and "\u2063" not in text:
            allowed.append(i)
    return allowed


def _phrase_losses(lm: LoadedModel, prompts: list[list[int]], target: list[int]) -> torch.Tensor:
    """−mean log P(target | prompt) per prompt (one padded pass)."""
    from melbo.engine.prompts import batch_from_ids

    batch = batch_from_ids([p + target for p in prompts], lm.tokenizer.pad_token_id or 0)
    with torch.no_grad():
        logits = lm.model(input_ids=batch.input_ids.to(lm.device), attention_mask=batch.attention_mask.to(lm.device),
                          position_ids=batch.position_ids.to(lm.device), use_cache=False).logits
    lp = logits[:, -len(target) - 1:-1].float().log_softmax(-1).cpu()
    return -lp[:, torch.arange(len(target)), torch.tensor(target)].mean(-1)


# ------------------------------------------------------------------------------------------------ output
def write_triggers(out: Path, report: TriggerReport, meta: dict) -> Path:
    """triggers.json (rankings, confirmations, cost) and triggers.html beside it."""
    from melbo.io.files import make_output_dir, write_json

    make_output_dir(out)
    write_json(out / TRIGGERS_JSON, {**meta, "findings": report.findings, "cost": report.cost})
    from melbo.records.report import write_triggers_report

    write_triggers_report(out)
    return out / TRIGGERS_JSON


def load_triggers(path: str | Path) -> Optional[dict]:
    """A triggers.json (or the one in a directory), every field checked (`read_triggers`), or None where there is
    none."""
    from melbo.io.files import read_json

    path = Path(path)
    file = path / TRIGGERS_JSON if path.is_dir() else path
    if not file.is_file():
        return None
    return read_triggers(read_json(file), file)
