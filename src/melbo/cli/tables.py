"""The tables and summary lines the commands print on stdout."""

from __future__ import annotations


from typing import TYPE_CHECKING

from rich.table import Table

from melbo.cli.app import out, shown

if TYPE_CHECKING:
    from melbo.judging.divergence import Divergence


def print_completions(completions, width: int = 100) -> None:
    table = Table(show_lines=False, header_style="bold", expand=True)
    # The label column never shrinks: on a narrow terminal the completion gets cut instead.
    table.add_column("vector", no_wrap=True, min_width=max(len(c.label) for c in completions))
    if len({c.prompt_index for c in completions}) > 1:
        table.add_column("prompt", no_wrap=True)
    table.add_column("completion (start)", overflow="ellipsis", no_wrap=True, ratio=1)
    multi = len(table.columns) == 3
    for c in completions:
        text = " ".join(c.text.split())
        cells = [shown(c.label)] + ([str(c.prompt_index)] if multi else []) + [shown(text[:width])]
        table.add_row(*cells)
    out.print(table)


def _three(value) -> str:
    return "–" if value is None else f"{value:.3f}"


def print_assessment(run) -> None:
    """One line of the assessment in metrics.json (none when the job skipped it)."""
    from melbo.judging.assess import Metrics

    metrics = Metrics.load(run.path) if run.config.random else None
    if metrics is None:
        return
    learned, baseline = metrics.learned, metrics.random
    line = f"diversity {_three(learned.diversity)} learned"
    if baseline is not None:
        line += f" vs {_three(baseline.diversity)} random; distance from unsteered " \
                f"{_three(learned.mean_distance_from_unsteered)} vs {_three(baseline.mean_distance_from_unsteered)}"
    out.print(line + f"; {len(metrics.clusters)} behaviour clusters")


def print_divergence(result: "Divergence", rows: int = 24) -> None:
    table = Table(header_style="bold", expand=True, title="perturbations ranked by divergence (audited vs reference)",
                  title_justify="left")
    for col, kw in (("rank", {}), ("vector", {}), ("KL", {}), ("distance", {}),
                    ("audited", {"ratio": 1}), ("reference", {"ratio": 1})):
        table.add_column(col, no_wrap=True, overflow="ellipsis", **kw)
    for row in result.unsteered + result.rows[:rows]:
        table.add_row("–" if row.vector is None else str(row.rank), shown(row.label),
                      "–" if row.kl is None else f"{row.kl:.3g}", "–" if row.distance is None else f"{row.distance:.3f}",
                      shown(" ".join(row.audited.split())), shown(" ".join(row.reference.split())))
    out.print(table)


def print_checks(directory, rows: int = 12) -> None:
    """checks.json, when a checker read the completions: learned against random per pattern, then the
    perturbations that show a pattern consistently."""
    from pathlib import Path

    from melbo.judging.checkers import load_checks

    doc = load_checks(Path(directory))
    if doc is None:
        return
    table = Table(header_style="bold", title=f"checker {shown(doc.checker)}: perturbations showing each error pattern "
                  "on most prompts", title_justify="left")
    for col in ("pattern", "learned", "random"):
        table.add_column(col)
    for row in doc.summary:
        cells = [f"{side.consistent}/{side.of}" if side.of else "—" for side in (row.learned, row.random)]
        table.add_row(shown(row.pattern), *cells)
    out.print(table)
    if doc.selected:  # an audit's: the patterns random vectors of the same radius rarely show come first
        table = Table(header_style="bold", title="error patterns learned perturbations show on most prompts, "
                      "rarest among random ones first", title_justify="left")
        for col in ("perturbation", "pattern", "shown", "random of its arm", "reproduce"):
            table.add_column(col)
        for s in doc.selected[:rows]:
            rate = "—" if s.random_rate is None else f"{s.random_rate:.0%} of {s.random_of}"
            table.add_row(shown(s.perturbation), shown(s.pattern), f"{s.shown}/{s.of}", rate, shown(s.reproduce))
        out.print(table)
        return
    listed = [p for p in doc.perturbations if p.consistent][:rows]  # the unsteered one too: its slips are no finding
    for p in listed:
        example = next(iter(p.examples.values()), "")
        out.print(f"  {shown(p.label)} ({shown(p.kind)}): {shown(', '.join(p.consistent))} — "
                  f"{shown(' '.join(example.split())[:100])}")


def print_findings(findings: list[dict], dropped: int) -> None:
    table = Table(header_style="bold", expand=True, title="findings, best first", title_justify="left")
    # short columns keep their width on a narrow terminal (rank and score matter most); the example takes the rest
    for col, kw in (("#", {"min_width": 2}), ("label", {"max_width": 12}), ("words", {"max_width": 14}),
                    ("score", {"min_width": 5}), ("rep.", {"min_width": 4}),
                    ("example", {"ratio": 1, "min_width": 12}), ("perturbation", {"max_width": 14})):
        table.add_column(col, no_wrap=True, overflow="ellipsis", **kw)
    for f in findings:
        e, r = f["example"], f["reproduction"]
        table.add_row(str(f["rank"]), shown(f["label"]), shown(f["words"]), f"{f['score']:.3f}",
                      f"{r['matched']}/{r['rows']}", shown(" ".join(e["text"].split())),
                      shown(f"{e['arm']}:{e['index']} ×{e['scale']:g}"))
    out.print(table)
    triggers = [(f["rank"], p) for f in findings for p in f["unsteered_shows_it_on"]]
    for rank, prompt in triggers:
        out.print(f"finding #{rank}: the unsteered model already says this on {shown(repr(prompt))} (a likely trigger)")
    out.print(f"{len(findings)} finding(s); {dropped} candidate(s) did not reproduce and were dropped")
