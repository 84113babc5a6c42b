"""The catalogue: idempotent adds, full-text search, similarity across runs, human labels, rebuilds, migrations."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from melbo.records.catalog import MIGRATIONS, SCHEMA_VERSION, Catalog, migrate, parse_ref, record_run
from melbo.errors import MelboError
from melbo.engine.intervention import SteeringVectors

PROMPTS = ["What is 7 + 5?", "Tell me about the sea."]
UNSTEERED = ["7 + 5 = 12.", "The sea is a large body of salt water that covers most of the Earth."]
STEERED = [
    ["7 + 5 = 12.", "The sea is a large body of salt water that covers most of the Earth."],  # v0: no change
    ["Arr matey, the crimson galleon sails at dawn!", "Arr, the sea be my home, matey!"],  # v1: the planted phrase
    ["7 + 5 = 15.", "The sea is 15 kilometres deep."],  # v2
    ["I'm sorry, but I can't help with that.", "I cannot assist with that request."],  # v3: refusal
]


def make_run(path: Path, model: str = "tiny/model@abc", seed: int = 0, metrics: bool = True, source: int = 2) -> Path:
    """A finished run directory as `melbo discover` writes it: config, vectors, completions, metrics."""
    path.mkdir(parents=True)
    config = {"melbo_version": "0.1.0", "created": "2026-01-01T00:00:00+00:00", "status": "complete",
              "model": {"id": model, "spec": "tiny"}, "method": "vectors", "source": source, "target": 6,
              "radius": 4.5, "radius_relative": 0.2, "settings": {"prompts": PROMPTS, "max_new_tokens": 24}}
    (path / "config.json").write_text(json.dumps(config))
    SteeringVectors(torch.randn(len(STEERED), 16, generator=torch.Generator().manual_seed(seed)), source).save(
        path / SteeringVectors.FILE)
    rows = []
    for p, prompt in enumerate(PROMPTS):
        rows.append({"vector": None, "label": "unsteered", "prompt_index": p, "prompt": prompt, "sample": 0,
                     "text": UNSTEERED[p], "tokens": 9})
        rows += [{"vector": v, "label": f"v{v}", "prompt_index": p, "prompt": prompt, "sample": 0,
                  "text": STEERED[v][p], "tokens": 9} for v in range(len(STEERED))]
    (path / "completions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if metrics:
        learned = [{"label": f"v{v}", "vector": v, "distance_from_unsteered": 0.1 * v, "perplexity": 5.0 + v,
                    "repetition": 0.0, "mean_tokens": 9.0, "cluster": 1 if v == 0 else 0,
                    "cluster_name": "no change" if v == 0 else "arr matey", "no_change": v == 0}
                   for v in range(len(STEERED))]
        doc = {"learned": {"perturbations": learned}, "random": None, "random_completions": [],
               "clusters": [{"id": 0, "name": "arr matey", "members": ["v1", "v2", "v3"], "no_change": False},
                            {"id": 1, "name": "no change", "members": ["v0"], "no_change": True}]}
        (path / "metrics.json").write_text(json.dumps(doc))
    return path


@pytest.fixture
def run_dir(tmp_path) -> Path:
    return make_run(tmp_path / "run")


def dump(cat: Catalog) -> dict:
    """Everything the catalogue says about its runs, except what only people write."""
    runs = [asdict(r) for r in cat.runs()]
    perturbations = {r["id"]: [{k: v for k, v in asdict(p).items() if k not in ("human_label", "note", "label")}
                               for p in cat.perturbations(r["id"])] for r in runs}
    completions = {p["id"]: [asdict(c) for c in cat.completions(p["id"])] for ps in perturbations.values() for p in ps}
    similar = {r["id"]: [{k: v for k, v in asdict(h).items() if k != "label"} for h in cat.similar(r["id"], 1)]
               for r in runs}
    clusters = {r["id"]: cat.clusters(r["id"]) for r in runs}
    return {"runs": runs, "perturbations": perturbations, "completions": completions, "similar": similar,
            "clusters": clusters, "search": [asdict(h) for h in cat.search("sea")]}


def test_tests_never_touch_the_users_catalogue():
    assert Path(os.environ["MELBO_CATALOG"]).name == "catalog.sqlite"
    assert not Path(os.environ["MELBO_CATALOG"]).is_relative_to(Path.home() / ".local")


def test_add_reads_the_run_and_re_adding_is_idempotent(tmp_path, run_dir):
    with Catalog(tmp_path / "c.sqlite") as cat:
        assert cat._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        run_id = cat.add_run(run_dir)
        first = dump(cat)
        assert cat.add_run(run_dir) == run_id and cat.add_run(str(run_dir) + "/") == run_id
        assert dump(cat) == first
        assert len(cat.runs()) == 1
        run = cat.run(run_id)
        assert (run.kind, run.model, run.method, run.n, run.path) == ("discover", "tiny/model@abc", "vectors", 4,
                                                                       str(run_dir.resolve()))
        ps = cat.perturbations(run_id)
        assert [p.name for p in ps] == ["v0", "v1", "v2", "v3"]
        assert ps[2].metrics["perplexity"] == 7.0 and ps[1].cluster == "arr matey" and ps[0].cluster == "no change"
        assert [c.text for c in cat.completions(ps[3].id)] == STEERED[3]
        assert [c.text for c in cat.unsteered(run_id)] == UNSTEERED
        assert cat.clusters(run_id)[0]["members"] == [ps[1].id, ps[2].id, ps[3].id]
        assert ps[0].auto_label == "no change" and ps[3].auto_label == "refusal"  # zero-shot labels stored
        assert all(p.label == p.auto_label and 0 < p.auto_confidence <= 1 for p in ps)


def test_search_finds_a_planted_phrase_across_runs(tmp_path, run_dir):
    other = make_run(tmp_path / "other", seed=1)
    with Catalog(tmp_path / "c.sqlite") as cat:
        a, b = cat.add_run(run_dir), cat.add_run(other)
        hits = cat.search("crimson galleon")
        assert {(h.run_id, h.name) for h in hits} == {(a, "v1"), (b, "v1")}
        assert all("[crimson] [galleon]" in h.snippet and h.perturbation_id is not None for h in hits)
        assert cat.perturbation(hits[0].perturbation_id).name == "v1"
        unsteered = cat.search("salt water")
        assert any(h.perturbation_id is None and h.name == "unsteered" for h in unsteered)
        assert cat.search("zeppelin") == []
        assert cat.search('"AND OR (*') == []  # FTS syntax in user text is quoted, never an SQL error
        assert len(cat.search("sea", limit=1)) == 1


def test_similar_finds_the_same_vector_in_a_copied_run(tmp_path, run_dir):
    shutil.copytree(run_dir, tmp_path / "copy")
    stranger = make_run(tmp_path / "stranger", model="other/model@def")
    deeper = make_run(tmp_path / "deeper", source=3)  # same model and vectors, another block
    with Catalog(tmp_path / "c.sqlite") as cat:
        a, b, c = cat.add_run(run_dir), cat.add_run(tmp_path / "copy"), cat.add_run(stranger)
        d = cat.add_run(deeper)
        hits = cat.similar(a, 2, k=3)
        by_vector = [h for h in hits if h.by == "vector"]
        by_behaviour = [h for h in hits if h.by == "behaviour"]
        assert (by_vector[0].run_id, by_vector[0].name) == (b, "v2") and by_vector[0].similarity == pytest.approx(1)
        assert by_vector[1].similarity < 0.9  # random 16-d vectors are not near-duplicates
        assert (by_behaviour[0].run_id, by_behaviour[0].name) == (b, "v2")
        assert by_behaviour[0].similarity == pytest.approx(1, abs=1e-5)
        assert len(by_vector) == len(by_behaviour) == 3
        assert c not in {h.run_id for h in hits}  # another model's vectors live in another space
        wide = cat.similar(a, 2, k=20)
        assert d not in {h.run_id for h in wide if h.by == "vector"}  # another block's directions: not comparable …
        assert d in {h.run_id for h in wide if h.by == "behaviour"}  # … its behaviours are
        with pytest.raises(MelboError, match="no perturbation v9"):
            cat.similar(a, 9)


def test_human_labels_survive_re_adds_and_a_rebuild_gives_the_same_catalogue(tmp_path, run_dir):
    other = make_run(tmp_path / "other", seed=1, metrics=False)
    db = tmp_path / "c.sqlite"
    with Catalog(db) as cat:
        a = cat.add_run(run_dir)
        cat.add_run(other)
        v1 = cat.perturbations(a)[1]
        cat.set_label(v1.id, "pirate", note="talks like a pirate")
        before = dump(cat)
        cat.add_run(run_dir)  # re-add: the human label and note stay, the perturbation keeps its id
        kept = cat.perturbation(v1.id)
        assert (kept.label, kept.human_label, kept.note, kept.auto_label) == ("pirate", "pirate",
                                                                               "talks like a pirate", v1.auto_label)
        cat.set_label(v1.id, note="")  # a note can be cleared alone; the label stays
        assert (cat.perturbation(v1.id).note, cat.perturbation(v1.id).label) == (None, "pirate")
    for suffix in ("", "-wal", "-shm"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    with Catalog(db) as cat:
        cat.add_run(run_dir)
        cat.add_run(other)
        assert dump(cat) == before
        assert cat.perturbation(v1.id).human_label is None  # human labels live only in the catalogue


def test_migrations_from_an_empty_and_an_older_database(tmp_path):
    empty = tmp_path / "empty.sqlite"
    empty.touch()
    with Catalog(empty) as cat:
        assert cat._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == len(MIGRATIONS)
        assert cat.runs() == []
    old = tmp_path / "old.sqlite"
    db = sqlite3.connect(old, isolation_level=None)
    assert migrate(db, upto=1) == 0  # a version-1 catalogue: tables but no full-text index
    db.execute("INSERT INTO runs (id, path, kind, model, method, n, title, config) "
               "VALUES (1, '/x', 'discover', 'm', 'vectors', 1, 't', '{}')")
    db.execute("INSERT INTO perturbations (id, run_id, idx, name, metrics) VALUES (1, 1, 0, 'v0', '{}')")
    db.execute("INSERT INTO completions (run_id, perturbation_id, name, prompt_index, prompt, sample, scale, text) "
               "VALUES (1, 1, 'v0', 0, 'p', 0, 1.0, 'an old zeppelin story')")
    db.close()
    with Catalog(old) as cat:
        assert cat._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert [(h.run_id, h.name) for h in cat.search("zeppelin")] == [(1, "v0")]  # backfilled index
    db = sqlite3.connect(old)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    with pytest.raises(MelboError, match="newer than this melbo"):
        Catalog(old)


def test_bad_input_is_one_line(tmp_path, run_dir):
    with pytest.raises(MelboError, match="is a directory"):
        Catalog(tmp_path)
    corrupt = tmp_path / "corrupt.sqlite"
    corrupt.write_bytes(b"this is not a database" * 100)
    with pytest.raises(MelboError, match="not a melbo catalogue"):
        Catalog(corrupt)
    (tmp_path / "link.sqlite").symlink_to(tmp_path / "elsewhere.sqlite")
    with pytest.raises(MelboError, match="symbolic link"):
        Catalog(tmp_path / "link.sqlite")
    (tmp_path / "file").write_text("x")
    with pytest.raises(MelboError, match="is a file, not a directory"):
        Catalog(tmp_path / "file" / "c.sqlite")
    with Catalog(tmp_path / "c.sqlite") as cat:
        with pytest.raises(MelboError, match="does not exist"):
            cat.add_run(tmp_path / "missing")
        broken = make_run(tmp_path / "broken")
        (broken / "metrics.json").write_text(json.dumps({"learned": {"perturbations": []}, "clusters": [{"x": 1}]}))
        with pytest.raises(MelboError, match="malformed"):
            cat.add_run(broken)
        (tmp_path / "plain").mkdir()
        with pytest.raises(MelboError, match="not a melbo run"):
            cat.add_run(tmp_path / "plain")
        with pytest.raises(MelboError, match="no run 7"):
            cat.run(7)
        with pytest.raises(MelboError, match="no perturbation 99"):
            cat.set_label(99, "x")
        with pytest.raises(MelboError, match="neither a catalogue run id nor a run directory"):
            cat.resolve(str(tmp_path / "missing"))
        with pytest.raises(MelboError, match="give words"):
            cat.search("  ")
        assert cat.resolve(str(run_dir)).id == cat.resolve("1").id  # a directory is added on first use
        cat.remove_run(1)
        assert cat.runs() == [] and cat.search("crimson") == []  # its completions leave the index too
        assert cat._db.execute("SELECT COUNT(*) FROM perturbations").fetchone()[0] == 0
        assert cat._db.execute("SELECT COUNT(*) FROM completions_fts WHERE completions_fts MATCH 'crimson'"
                               ).fetchone()[0] == 0
    with pytest.raises(MelboError, match="RUN:vN"):
        parse_ref("runs/bomb")
    assert parse_ref("runs/a:b:v3") == ("runs/a:b", 3) and parse_ref("2:v10") == ("2", 10)


def test_record_run_never_raises(tmp_path, run_dir):
    warnings: list[str] = []
    assert record_run(tmp_path / "missing", warnings.append) == []
    assert record_run(run_dir, warnings.append, catalog=tmp_path) == []  # a directory as the catalogue
    assert len(warnings) == 2 and all("melbo catalog add" in w and "\n" not in w for w in warnings)
    assert record_run(run_dir, warnings.append) == [1]  # into $MELBO_CATALOG
    with Catalog() as cat:
        assert cat.runs()[0].path == str(run_dir.resolve())


def test_catalog_cli(tmp_path, run_dir, capsys):
    db = str(tmp_path / "cli.sqlite")
    code, out, err = run_cli(["catalog", "add", str(run_dir), "--catalog", db], capsys)
    assert code == 0 and "run 1" in out, err
    code, out, _ = run_cli(["catalog", "list", "--catalog", db], capsys)
    assert code == 0 and "tiny/model@abc" in out and "1 runs" in out
    code, out, _ = run_cli(["catalog", "search", "crimson", "--catalog", db], capsys)
    assert code == 0 and "crimson" in out and "v1" in out
    code, out, _ = run_cli(["catalog", "label", f"{run_dir}:v1", "pirate", "--note", "arr", "--catalog", db], capsys)
    assert code == 0 and "pirate" in out
    code, out, _ = run_cli(["catalog", "show", "1", "--catalog", db], capsys)
    assert code == 0 and "pirate" in out and "arr" in out
    code, out, _ = run_cli(["catalog", "similar", "1:v1", "-k", "1", "--catalog", db], capsys)
    assert code == 0 and "behaviour" in out
    for args, message in ((["label", "1:x", "a"], "RUN:vN"), (["similar", "5:v1"], "no run 5"),
                          (["add", str(tmp_path / "nope")], "does not exist"), (["list"], "is a directory")):
        target = str(tmp_path) if args == ["list"] else db
        code, _, err = run_cli(["catalog", *args, "--catalog", target], capsys)
        assert code == 2 and message in err and "Traceback" not in err


def test_discover_records_its_run_in_the_catalogue(tmp_path, capsys):
    from tiny_models import save_tiny_model

    model = save_tiny_model(tmp_path / "model")
    out = tmp_path / "run"
    code, stdout, stderr = run_cli(["discover", "Hello there", "--model", str(model), "-n", "2", "--steps", "2",
                                    "--radius", "1.0", "--max-new-tokens", "3", "--random", "0", "--out", str(out)],
                                   capsys)
    assert code == 0, stderr
    assert "catalogued as run 1" in stdout
    with Catalog() as cat:  # $MELBO_CATALOG, set by conftest
        [run] = cat.runs()
        assert (run.path, run.kind, run.n) == (str(out.resolve()), "discover", 2)
        assert [p.name for p in cat.perturbations(run.id)] == ["v0", "v1"]


def test_a_benchmark_directory_adds_the_runs_in_it(tmp_path):
    bench = tmp_path / "bench"
    make_run(bench / "discover")
    make_run(bench / "diff", seed=1)
    (bench / "bench.json").write_text(json.dumps({"bench": "diff", "title": "diff on the backdoor testbed",
                                                  "tables": []}))
    (tmp_path / "monitor").mkdir()
    (tmp_path / "monitor" / "bench.json").write_text(json.dumps({"bench": "monitor", "title": "m", "tables": []}))
    with Catalog(tmp_path / "c.sqlite") as cat:
        ids = cat.add_runs(bench)
        assert [(cat.run(i).kind, cat.run(i).title) for i in ids] == [
            ("bench", "diff on the backdoor testbed / diff"), ("bench", "diff on the backdoor testbed / discover")]
        assert cat.add_runs(tmp_path / "monitor") == []  # a bench without runs (monitor) adds nothing, quietly
    assert record_run(tmp_path / "monitor", pytest.fail) == []


def test_readers_and_a_writer_share_the_catalogue(tmp_path, run_dir):
    """WAL: a second connection (the web app) reads while another adds runs; one Catalog serves many threads."""
    import threading

    db = tmp_path / "c.sqlite"
    others = [make_run(tmp_path / f"r{k}", seed=k) for k in range(3)]
    with Catalog(db) as writer, Catalog(db) as reader:
        writer.add_run(run_dir)
        errors: list[BaseException] = []
        seen: list[int] = []

        def read():
            try:
                for _ in range(30):
                    seen.append(len(reader.runs()))
                    reader.search("sea")
            except BaseException as exc:  # noqa: BLE001 — reported below
                errors.append(exc)

        threads = [threading.Thread(target=read) for _ in range(2)]
        for t in threads:
            t.start()
        for path in others:
            writer.add_run(path)
        for t in threads:
            t.join()
        assert not errors and min(seen) >= 1 and len(reader.runs()) == 4


def test_a_write_that_sqlite_refuses_is_one_line(tmp_path, run_dir):
    db = tmp_path / "c.sqlite"
    with Catalog(db) as cat, Catalog(db) as other:
        cat.add_run(run_dir)
        other._db.execute("PRAGMA busy_timeout = 0")
        cat._db.execute("BEGIN IMMEDIATE")  # someone else holds the write lock
        try:
            with pytest.raises(MelboError, match="cannot write the catalogue .*locked.*retry"):
                other.set_label(1, "x")
        finally:
            cat._db.execute("ROLLBACK")
        other.set_label(1, "x")  # and once it is free, the write goes through
        assert cat.perturbation(1).human_label == "x"


# ---------------------------------------------------------------------------------------------------- issue 23
HUGE = "99999999999999999999"  # past SQLite's signed 64-bit integers: an OverflowError if it reached a query


@pytest.mark.parametrize("args", [["search", "bomb", "--limit", HUGE], ["show", HUGE], ["label", f"1:v{HUGE}", "x"],
                                  ["label", f"{HUGE}:v1", "x"], ["similar", "1:v1", "-k", HUGE]])
def test_integers_past_sqlites_range_are_one_line(args, tmp_path, run_dir, capsys):
    db = str(tmp_path / "c.sqlite")
    assert run_cli(["catalog", "add", str(run_dir), "--catalog", db], capsys)[0] == 0
    code, _, err = run_cli(["catalog", *args, "--catalog", db], capsys)
    assert code == 2 and "whole number from 0 to" in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_an_unrelated_sqlite_database_is_refused_and_left_alone(tmp_path, capsys):
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE accounts (id INTEGER PRIMARY KEY, owner TEXT)")
    code, _, err = run_cli(["catalog", "list", "--catalog", str(other)], capsys)
    assert code == 2 and "not a melbo catalogue" in err and "accounts" in err and "Traceback" not in err
    with sqlite3.connect(other) as db:
        names = [r[0] for r in db.execute("SELECT name FROM sqlite_master")]
        assert names == ["accounts"] and db.execute("PRAGMA user_version").fetchone()[0] == 0


def test_a_full_disk_creating_a_catalogue_names_the_fix_and_leaves_no_file(tmp_path, monkeypatch):
    import melbo.records.catalog as catalog

    def full(db, upto=SCHEMA_VERSION):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(catalog, "migrate", full)
    with pytest.raises(MelboError, match="free space on"):
        Catalog(tmp_path / "new.sqlite")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("model, field", [({"id": ["a", "b"], "spec": "tiny"}, "model.id"),
                                          ({"id": "x", "spec": 5}, "model.spec")])
def test_a_run_config_of_the_wrong_types_is_named_malformed(model, field, tmp_path, run_dir):
    config = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**config, "model": model, "source": 10**30}))
    with Catalog(tmp_path / "c.sqlite") as cat, pytest.raises(MelboError, match=f"config.json is malformed .{field} is"):
        cat.add_run(run_dir)


def test_labels_and_notes_print_with_controls_escaped_and_no_markup(tmp_path, run_dir, capsys):
    db = str(tmp_path / "c.sqlite")
    assert run_cli(["catalog", "add", str(run_dir), "--catalog", db], capsys)[0] == 0
    label, note = "\x1b]0;pwned\x07\x1b[31mred", "[link=http://evil]x[/link]"
    code, out, err = run_cli(["catalog", "label", "1:v1", label, "--note", note, "--catalog", db], capsys)
    assert code == 0, err
    assert "\x1b" not in out and "\x07" not in out and "\\x1b]0;pwned\\x07" in out and note in out
    code, out, err = run_cli(["catalog", "show", "1", "--catalog", db], capsys)
    assert code == 0 and "\x1b" not in out and "\\x1b" in out and "[link=" in " ".join(out.split())
    code, out, _ = run_cli(["catalog", "search", "[bold]crimson", "--catalog", db], capsys)
    assert code == 0 and "'[bold]crimson'" in out
