"""`melbo catalog ...`: the catalogue of runs, their behaviours and labels (`melbo.records.catalog.Catalog`)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from melbo.cli.app import app, err, out, shown
from melbo.errors import MelboError

catalog_app = typer.Typer(help="The catalogue of runs: list, search and compare behaviours across runs, label them.",
                          no_args_is_help=True)
app.add_typer(catalog_app, name="catalog")

CatalogOpt = typer.Option(None, "--catalog", help="Catalogue database (default $MELBO_CATALOG, else "
                                                  "~/.local/share/melbo/catalog.sqlite).")


def _open(path: Optional[Path]):
    from melbo.records.catalog import Catalog

    return Catalog(path)


def _labeller(url: Optional[str], model: str, key: Optional[str], local: Optional[str]):
    if url is not None and local is not None:
        raise MelboError("give --llm-url or --llm-local, not both")
    if local is not None:
        from melbo.cli.app import load
        from melbo.judging.labels import ModelLabeller

        return ModelLabeller(load(local, "cpu", "float32", None))
    if url is None:
        return None
    from melbo.judging.labels import ChatLabeller

    return ChatLabeller(url, model=model, api_key=key)


@catalog_app.command("add")
def add_command(
    runs: List[Path] = typer.Argument(..., help="Run directories (a benchmark directory adds the runs in it)."),
    catalog: Optional[Path] = CatalogOpt,
    llm_url: Optional[str] = typer.Option(None, help="Label with an OpenAI-compatible chat endpoint (e.g. "
                                                     "http://127.0.0.1:8080/v1) instead of the zero-shot labeller."),
    llm_model: str = typer.Option("default", help="The model name sent to --llm-url."),
    llm_key: Optional[str] = typer.Option(None, envvar="MELBO_LLM_KEY", help="Bearer key for --llm-url."),
    llm_local: Optional[str] = typer.Option(
        None, help="Label with a local chat model instead, e.g. the embedded qwen2.5-coder-0.5b (slow on a CPU)."),
) -> None:
    """Add (or refresh) runs: their perturbations, completions, metrics, clusters and automatic labels."""
    labeller = _labeller(llm_url, llm_model, llm_key, llm_local)
    with _open(catalog) as cat:
        for path in runs:
            with err.status(f"adding {path} …"):
                ids = cat.add_runs(path, labeller)
            if not ids:
                err.print(f"{shown(str(path))}: a benchmark directory without runs, nothing to add")
            for run_id in ids:
                entry = cat.run(run_id)
                out.print(f"run {run_id}: {shown(entry.path)} ({shown(entry.kind)}, {entry.n} perturbations)",
                          soft_wrap=True)


@catalog_app.command("list")
def list_command(catalog: Optional[Path] = CatalogOpt) -> None:
    """List the catalogued runs."""
    with _open(catalog) as cat:
        runs = cat.runs()
        table = Table(header_style="bold", expand=True)
        for col in ("id", "kind", "model", "method", "n", "created", "title", "path"):
            table.add_column(col, overflow="fold", ratio=1 if col in ("title", "path") else None)
        for r in runs:
            table.add_row(str(r.id), shown(r.kind), shown(r.model), shown(r.method), str(r.n), shown(r.created or ""),
                          shown(r.title), shown(r.path))
        out.print(table)
        out.print(f"{len(runs)} runs in {shown(str(cat.path))}", soft_wrap=True)


@catalog_app.command("show")
def show_command(run: str = typer.Argument(..., help="A run directory or catalogue id."),
                 catalog: Optional[Path] = CatalogOpt) -> None:
    """A run's perturbations with their labels, clusters and metrics."""
    with _open(catalog) as cat:
        entry = cat.resolve(run)
        table = Table(header_style="bold", expand=True, title=f"run {entry.id}: {shown(entry.title)}")
        for col in ("name", "label", "auto (confidence)", "cluster", "note"):
            table.add_column(col, overflow="fold")
        for p in cat.perturbations(entry.id):
            auto = f"{p.auto_label} ({p.auto_confidence:.2f})" if p.auto_label else "—"
            table.add_row(shown(p.name), shown(p.label or "—"), shown(auto), shown(p.cluster or "—"),
                          shown(p.note or ""))
        out.print(table)


@catalog_app.command("search")
def search_command(query: str = typer.Argument(..., help="Words to find in completions, e.g. pirate."),
                   limit: int = typer.Option(20, help="Most hits to show."),
                   catalog: Optional[Path] = CatalogOpt) -> None:
    """Full-text search over the completions of every catalogued run."""
    with _open(catalog) as cat:
        hits = cat.search(query, limit)
    table = Table(header_style="bold", expand=True)
    for col in ("run", "perturbation", "text"):
        table.add_column(col, overflow="fold", ratio=1 if col == "text" else None)
    for h in hits:
        table.add_row(str(h.run_id), shown(h.name), shown(" ".join(h.snippet.split())))
    out.print(table)
    out.print(f"{len(hits)} completions match {shown(repr(query))}")


@catalog_app.command("similar")
def similar_command(ref: str = typer.Argument(..., metavar="RUN:vN", help="A perturbation: run directory or id, "
                                                                         "then :v and its index (runs/bomb:v3, 2:v3)."),
                    k: int = typer.Option(5, "--hits", "-k", help="Hits per measure."),
                    catalog: Optional[Path] = CatalogOpt) -> None:
    """Near-duplicates of a perturbation in runs of the same model, by vector cosine and by behaviour."""
    from melbo.records.catalog import parse_ref

    run, index = parse_ref(ref)
    with _open(catalog) as cat:
        entry = cat.resolve(run)
        hits = cat.similar(entry.id, index, k)
        table = Table(header_style="bold", expand=True, title=f"like run {entry.id}:v{index}")
        for col in ("by", "similarity", "run", "perturbation", "label", "path"):
            table.add_column(col, overflow="fold", ratio=1 if col == "path" else None)
        for h in hits:
            table.add_row(h.by, f"{h.similarity:.3f}", str(h.run_id), shown(h.name), shown(h.label or "—"),
                          shown(cat.run(h.run_id).path))
        out.print(table)


@catalog_app.command("label")
def label_command(ref: str = typer.Argument(..., metavar="RUN:vN", help="A perturbation (runs/bomb:v3 or 2:v3)."),
                  label: str = typer.Argument(..., help="Your label (\"\" clears it)."),
                  note: Optional[str] = typer.Option(None, "--note", help="A note to keep with it."),
                  catalog: Optional[Path] = CatalogOpt) -> None:
    """Set a human label (and note) on a perturbation; it overrides the automatic one and survives re-adds."""
    from melbo.records.catalog import parse_ref

    run, index = parse_ref(ref)
    with _open(catalog) as cat:
        entry = cat.resolve(run)
        p = cat.perturbation_at(entry.id, index)
        cat.set_label(p.id, label, note)
        p = cat.perturbation(p.id)
    out.print(f"run {entry.id}:{shown(p.name)} labelled {shown(repr(p.label or '(automatic: none)'))}"
              + (f" (note: {shown(p.note)})" if p.note else ""))


def record(path: Path) -> None:
    """After `discover`, `diff` or a bench: add the run to the catalogue, or say in one line why it was not."""
    from melbo.records.catalog import record_run

    ids = record_run(path, warn=lambda message: err.print(f"[yellow]catalogue:[/] {shown(message)}", soft_wrap=True))
    if ids:
        out.print(f"catalogued as run {', '.join(map(str, ids))} (`melbo catalog show {ids[0]}`)")
