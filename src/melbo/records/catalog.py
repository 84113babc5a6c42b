"""The catalogue: every run's perturbations, completions, metrics, clusters and labels in one SQLite database.

    with Catalog() as cat:                      # $MELBO_CATALOG, else ~/.local/share/melbo/catalog.sqlite
        run_id = cat.add_run("runs/bomb")       # idempotent: re-adding updates the same rows
        cat.search("pirate")                    # full-text search over completions across runs
        cat.similar(run_id, 3)                  # near-duplicates of v3 in runs of the same model
        cat.set_label(cat.perturbations(run_id)[3].id, "pirate persona", note="talks like a pirate")

The run directory stays the source of truth: everything here is read from it through the library
(`melbo.engine.store.Run`, `Run.completions`, the assessment's metrics.json, a diff's divergence.json), so deleting the
database and adding the runs again gives the same catalogue. Only human labels and notes live in the catalogue
alone; `add_run` never touches them, so they survive re-adds.

Why the stdlib `sqlite3` and no ORM (SQLAlchemy, sqlite-utils): the schema is four tables and an FTS5 index, the
queries are a dozen short statements, and FTS5 virtual tables, WAL mode and `PRAGMA user_version` migrations are
plain SQLite features an ORM would only wrap (SQLAlchemy has no FTS5 model; sqlite-utils has one but would be a
dependency for what ~20 lines of SQL do). The schema is in docs/catalog.md; `MIGRATIONS` is the ordered list of
schema steps, and `PRAGMA user_version` records how many have run.

Vector similarity compares steering vectors trained on the same model at the same source block (cosine); adapters
have no single direction, so they are compared by behaviour only. The behaviour embedding of a perturbation is the
unit mean of its completions' sentence embeddings (all-MiniLM-L6-v2, `melbo.judging.evaluation.embed`).
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np

from melbo.errors import MelboError
from melbo.io.files import as_path, disk_full, free_space_fix
from melbo.io.runconfig import RunConfig

ENV = "MELBO_CATALOG"
FILE_NAME = "catalog.sqlite"


def default_path() -> Path:
    """$MELBO_CATALOG, else the user data directory (XDG: $XDG_DATA_HOME/melbo, default ~/.local/share/melbo)."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "melbo" / FILE_NAME


# ---------------------------------------------------------------------------------------------------- entries
@dataclass(frozen=True)
class RunEntry:
    id: int
    path: str
    kind: str  # discover | diff | bench
    model: str  # the model's identity (config.model.id): runs of the same model are comparable
    method: str
    n: int  # perturbations
    created: Optional[str]
    title: str


@dataclass(frozen=True)
class PerturbationEntry:
    id: int
    run_id: int
    index: int
    name: str  # as in the run: v3
    label: Optional[str]  # the human label if set, else the automatic one
    auto_label: Optional[str]
    auto_confidence: Optional[float]
    human_label: Optional[str]
    note: Optional[str]
    cluster: Optional[str]  # the assessment's cluster name ("no change", "pirate arr matey", …)
    metrics: dict = field(default_factory=dict)


@dataclass(frozen=True)
class CompletionEntry:
    prompt: str
    text: str
    scale: float  # the perturbation's scale: 1 for a run's own completions, 0 for the unsteered ones
    prompt_index: int = 0
    sample: int = 0


@dataclass(frozen=True)
class SearchHit:
    run_id: int
    perturbation_id: Optional[int]  # None: an unsteered completion
    name: str  # v3, or "unsteered"
    snippet: str  # the matching text with the match in [brackets]
    prompt: str = ""


@dataclass(frozen=True)
class SimilarHit:
    run_id: int
    perturbation_id: int
    name: str
    by: str  # "vector" (cosine of steering vectors) or "behaviour" (cosine of behaviour embeddings)
    similarity: float
    label: Optional[str] = None


# ---------------------------------------------------------------------------------------------------- schema
def _v1_tables(db: sqlite3.Connection) -> None:
    for statement in (
        """CREATE TABLE runs (
            id INTEGER PRIMARY KEY,
            path TEXT NOT NULL UNIQUE,          -- resolved run directory: the source of truth
            kind TEXT NOT NULL,                 -- discover | diff | bench
            model TEXT NOT NULL,                -- config.model.id
            model_spec TEXT,
            method TEXT NOT NULL,
            n INTEGER NOT NULL,
            created TEXT,
            title TEXT NOT NULL,
            source INTEGER,
            radius REAL,
            config TEXT NOT NULL                -- config.json verbatim
        )""",
        """CREATE TABLE clusters (
            run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
            number INTEGER NOT NULL,
            name TEXT NOT NULL,
            no_change INTEGER NOT NULL,
            PRIMARY KEY (run_id, number)
        )""",
        """CREATE TABLE perturbations (
            id INTEGER PRIMARY KEY,
            run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
            idx INTEGER NOT NULL,
            name TEXT NOT NULL,
            cluster INTEGER,
            metrics TEXT NOT NULL,              -- JSON: assessment and divergence numbers
            auto_label TEXT,
            auto_confidence REAL,
            auto_scores TEXT,                   -- JSON: score per taxonomy label
            human_label TEXT,                   -- set by people only; add_run never writes it
            note TEXT,                          -- idem
            vector BLOB,                        -- float32 steering vector (vectors runs only)
            behaviour BLOB,                     -- float32 unit mean sentence embedding of its completions
            UNIQUE (run_id, idx)
        )""",
        """CREATE TABLE completions (
            id INTEGER PRIMARY KEY,
            run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
            perturbation_id INTEGER REFERENCES perturbations(id) ON DELETE CASCADE,  -- NULL: unsteered
            name TEXT NOT NULL,
            prompt_index INTEGER NOT NULL,
            prompt TEXT NOT NULL,
            sample INTEGER NOT NULL,
            scale REAL NOT NULL,
            text TEXT NOT NULL,
            tokens INTEGER
        )""",
        "CREATE INDEX completions_by_perturbation ON completions(perturbation_id)",
        "CREATE INDEX completions_by_run ON completions(run_id)",
    ):
        db.execute(statement)


def _v2_full_text(db: sqlite3.Connection) -> None:
    # External-content FTS5 index over completions.text, kept in step by triggers; backfilled for older databases.
    for statement in (
        "CREATE VIRTUAL TABLE completions_fts USING fts5(text, content='completions', content_rowid='id')",
        """CREATE TRIGGER completions_ai AFTER INSERT ON completions BEGIN
            INSERT INTO completions_fts(rowid, text) VALUES (new.id, new.text);
        END""",
        """CREATE TRIGGER completions_ad AFTER DELETE ON completions BEGIN
            INSERT INTO completions_fts(completions_fts, rowid, text) VALUES ('delete', old.id, old.text);
        END""",
        "INSERT INTO completions_fts(completions_fts) VALUES ('rebuild')",
    ):
        db.execute(statement)


# Ordered: migration k (1-based) takes a database from user_version k-1 to k. Append, never edit.
MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_v1_tables, _v2_full_text]
SCHEMA_VERSION = len(MIGRATIONS)


def migrate(db: sqlite3.Connection, upto: int = SCHEMA_VERSION) -> int:
    """Run the migrations a database lacks (each in one transaction); return its version before."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise MelboError(f"the catalogue has schema version {version}, newer than this melbo's {SCHEMA_VERSION}: "
                         "upgrade melbo or use another --catalog")
    for number in range(version + 1, upto + 1):
        with db:  # the step and its version bump commit together, or neither does (statements, no executescript:
            db.execute("BEGIN")  # that would commit halfway)
            MIGRATIONS[number - 1](db)
            db.execute(f"PRAGMA user_version = {number}")
    return version


# ---------------------------------------------------------------------------------------------------- catalogue
class Catalog:
    """A catalogue database (created and migrated on open). Use as a context manager, or call close()."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path).expanduser() if path is not None else default_path()
        check_db_path(self.path)
        self._lock = threading.RLock()
        new = not self.path.exists()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # check_same_thread=False: a web server hands one catalogue to worker threads; the lock serialises them.
            self._db = sqlite3.connect(str(self.path), timeout=30, check_same_thread=False, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            fix = free_space_fix(self.path.parent) if disk_full(exc) else "give a writable --catalog path"
            raise MelboError(f"cannot open the catalogue {self.path} ({exc}): {fix}") from exc
        self._db.row_factory = sqlite3.Row
        try:
            self._db.execute("PRAGMA foreign_keys = ON")
            _check_foreign(self._db, self.path)
            self._db.execute("PRAGMA journal_mode = WAL")  # readers (the web app) never block the writer
            migrate(self._db)
        except BaseException as exc:
            self._db.close()
            if new:  # a catalogue that could not be set up is not left behind half made (a 0-byte file)
                for leftover in (self.path, *(self.path.with_name(self.path.name + s) for s in ("-wal", "-shm"))):
                    leftover.unlink(missing_ok=True)
            if isinstance(exc, sqlite3.DatabaseError):
                raise _open_error(self.path, exc) from exc
            raise

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "Catalog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- adding
    def add_run(self, run_dir: str | Path, labeller: Any = None) -> int:
        """Read the run at `run_dir` into the catalogue (again): its id. Human labels and notes are kept.

        `labeller`: a `melbo.judging.labels` labeller (default: the zero-shot `EmbeddingLabeller`).
        """
        snapshot = read_run(as_path(run_dir, "a run directory"), labeller)
        with self._transaction():
            return self._write(snapshot)

    def add_runs(self, path: str | Path, labeller: Any = None) -> list[int]:
        """The run at `path`, or, for a benchmark directory holding several runs, each of them: their ids."""
        return [self.add_run(p, labeller) for p in run_dirs(as_path(path, "a run directory"))]

    def _write(self, s: "_Snapshot") -> int:
        db = self._db
        r = s.run
        row = db.execute("SELECT id FROM runs WHERE path = ?", (r["path"],)).fetchone()
        values = (r["kind"], r["model"], r["model_spec"], r["method"], r["n"], r["created"], r["title"], r["source"],
                  r["radius"], r["config"])
        if row is None:
            run_id = db.execute(
                "INSERT INTO runs (kind, model, model_spec, method, n, created, title, source, radius, config, path) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", (*values, r["path"])).lastrowid
        else:
            run_id = row["id"]
            db.execute("UPDATE runs SET kind=?, model=?, model_spec=?, method=?, n=?, created=?, title=?, source=?, "
                       "radius=?, config=? WHERE id=?", (*values, run_id))
        db.execute("DELETE FROM completions WHERE run_id = ?", (run_id,))
        db.execute("DELETE FROM clusters WHERE run_id = ?", (run_id,))
        db.executemany("INSERT INTO clusters (run_id, number, name, no_change) VALUES (?, ?, ?, ?)",
                       [(run_id, c["number"], c["name"], c["no_change"]) for c in s.clusters])
        # Upsert by (run, index): perturbation ids stay stable across re-adds and human columns are untouched.
        db.execute("DELETE FROM perturbations WHERE run_id = ? AND idx >= ?", (run_id, len(s.perturbations)))
        ids = {}
        for p in s.perturbations:
            ids[p["idx"]] = db.execute(
                "INSERT INTO perturbations (run_id, idx, name, cluster, metrics, auto_label, auto_confidence, "
                "auto_scores, vector, behaviour) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (run_id, idx) DO UPDATE SET name=excluded.name, cluster=excluded.cluster, "
                "metrics=excluded.metrics, auto_label=excluded.auto_label, auto_confidence=excluded.auto_confidence, "
                "auto_scores=excluded.auto_scores, vector=excluded.vector, behaviour=excluded.behaviour "
                "RETURNING id",
                (run_id, p["idx"], p["name"], p["cluster"], json.dumps(p["metrics"]), p["auto_label"],
                 p["auto_confidence"], json.dumps(p["auto_scores"]), p["vector"], p["behaviour"])).fetchone()[0]
        db.executemany(
            "INSERT INTO completions (run_id, perturbation_id, name, prompt_index, prompt, sample, scale, text, tokens)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(run_id, None if c["vector"] is None else ids.get(c["vector"]), c["label"], c["prompt_index"],
              c["prompt"], c["sample"], 0.0 if c["vector"] is None else 1.0, c["text"], c.get("tokens"))
             for c in s.completions if c["vector"] is None or c["vector"] in ids])
        return run_id

    def remove_run(self, run_id: int) -> None:
        """Forget a run (its perturbations, completions, clusters, labels and notes); its directory is untouched."""
        self.run(run_id)
        with self._transaction():
            self._db.execute("DELETE FROM runs WHERE id = ?", (run_id,))

    # ---- reading
    def runs(self) -> list[RunEntry]:
        return [_run_entry(r) for r in self._query("SELECT * FROM runs ORDER BY id")]

    def run(self, run_id: int) -> RunEntry:
        rows = self._query("SELECT * FROM runs WHERE id = ?", (_whole(run_id, "run id"),))
        if not rows:
            raise MelboError(f"the catalogue has no run {run_id}: see `melbo catalog list`")
        return _run_entry(rows[0])

    def run_by_path(self, path: str | Path) -> Optional[RunEntry]:
        rows = self._query("SELECT * FROM runs WHERE path = ?", (str(Path(path).resolve()),))
        return _run_entry(rows[0]) if rows else None

    def resolve(self, ref: str | int, add: bool = True) -> RunEntry:
        """A run by catalogue id ("3") or by directory (added first when `add` and not catalogued yet)."""
        text = str(ref).strip()
        if re.fullmatch(r"\d+", text):
            return self.run(int(text))
        found = self.run_by_path(text)
        if found is not None:
            return found
        if not Path(text).is_dir():
            raise MelboError(f"{text} is neither a catalogue run id nor a run directory: "
                             "give a directory or an id from `melbo catalog list`")
        if not add:
            raise MelboError(f"run {text} is not in the catalogue: add it with `melbo catalog add {text}`")
        return self.run(self.add_run(text))

    def perturbations(self, run_id: int) -> list[PerturbationEntry]:
        self.run(run_id)
        return [_perturbation_entry(r) for r in self._query(_PERTURBATIONS + " WHERE p.run_id = ? ORDER BY p.idx",
                                                            (run_id,))]

    def perturbation(self, perturbation_id: int) -> PerturbationEntry:
        rows = self._query(_PERTURBATIONS + " WHERE p.id = ?", (_whole(perturbation_id, "perturbation id"),))
        if not rows:
            raise MelboError(f"the catalogue has no perturbation {perturbation_id}")
        return _perturbation_entry(rows[0])

    def perturbation_at(self, run_id: int, index: int) -> PerturbationEntry:
        rows = self._query(_PERTURBATIONS + " WHERE p.run_id = ? AND p.idx = ?",
                           (_whole(run_id, "run id"), _whole(index, "index")))
        if not rows:
            n = self.run(run_id).n
            raise MelboError(f"run {run_id} has no perturbation v{index}: it has v0..v{n - 1}" if n else
                             f"run {run_id} has no perturbations (unfinished run)")
        return _perturbation_entry(rows[0])

    def completions(self, perturbation_id: int) -> list[CompletionEntry]:
        self.perturbation(perturbation_id)
        return [CompletionEntry(r["prompt"], r["text"], r["scale"], r["prompt_index"], r["sample"])
                for r in self._query("SELECT * FROM completions WHERE perturbation_id = ? ORDER BY prompt_index, "
                                     "sample, id", (perturbation_id,))]

    def unsteered(self, run_id: int) -> list[CompletionEntry]:
        """The run's unsteered completions (the reference every perturbation is compared with)."""
        return [CompletionEntry(r["prompt"], r["text"], r["scale"], r["prompt_index"], r["sample"])
                for r in self._query("SELECT * FROM completions WHERE run_id = ? AND perturbation_id IS NULL "
                                     "ORDER BY prompt_index, sample, id", (_whole(run_id, "run id"),))]

    def clusters(self, run_id: int) -> list[dict]:
        """The run's behaviour clusters: [{"number", "name", "no_change", "members": [perturbation ids]}]."""
        run_id = _whole(run_id, "run id")
        clusters = [dict(number=r["number"], name=r["name"], no_change=bool(r["no_change"]), members=[])
                    for r in self._query("SELECT * FROM clusters WHERE run_id = ? ORDER BY number", (run_id,))]
        by_number = {c["number"]: c for c in clusters}
        for r in self._query("SELECT id, cluster FROM perturbations WHERE run_id = ? ORDER BY idx", (run_id,)):
            if r["cluster"] in by_number:
                by_number[r["cluster"]]["members"].append(r["id"])
        return clusters

    def search(self, query: str, limit: int = 20) -> list[SearchHit]:
        """Completions across runs matching `query` (FTS5; plain words are matched as given), best first."""
        if not isinstance(query, str) or not query.strip():
            raise MelboError("give words to search for, e.g. `melbo catalog search pirate`")
        limit = _whole(limit, "limit")
        match = _fts_query(query)
        rows = self._query(
            "SELECT c.run_id, c.perturbation_id, c.name, c.prompt, "
            "snippet(completions_fts, 0, '[', ']', '…', 16) AS snippet "
            "FROM completions_fts JOIN completions c ON c.id = completions_fts.rowid "
            "WHERE completions_fts MATCH ? ORDER BY rank, c.id LIMIT ?", (match, limit))
        return [SearchHit(r["run_id"], r["perturbation_id"], r["name"], r["snippet"], r["prompt"]) for r in rows]

    def similar(self, run_id: int, index: int, k: int = 5) -> list[SimilarHit]:
        """The `k` perturbations of runs of the same model nearest to run `run_id`'s v`index`, by steering-vector
        cosine (same source block, vectors only) and by behaviour-embedding cosine: up to 2k hits, vector first."""
        k = _whole(k, "k")
        target = self.perturbation_at(run_id, index)
        run = self._query("SELECT model, source FROM runs WHERE id = ?", (run_id,))[0]
        me = self._query("SELECT vector, behaviour FROM perturbations WHERE id = ?", (target.id,))[0]
        others = self._query(
            "SELECT p.id, p.run_id, p.name, p.vector, p.behaviour, p.human_label, p.auto_label, r.source "
            "FROM perturbations p JOIN runs r ON r.id = p.run_id WHERE r.model = ? AND p.id != ? ORDER BY p.id",
            (run["model"], target.id))
        hits: list[SimilarHit] = []
        for by in ("vector", "behaviour"):
            mine = _unit(me[by])
            if mine is None:
                continue
            scored = []
            for o in others:
                theirs = _unit(o[by])
                # vectors compare only at the same source block: elsewhere the same direction means something else
                comparable = by == "behaviour" or o["source"] == run["source"]
                if theirs is not None and len(theirs) == len(mine) and comparable:
                    scored.append((float(mine @ theirs), o))
            scored.sort(key=lambda t: (-t[0], t[1]["id"]))
            hits += [SimilarHit(o["run_id"], o["id"], o["name"], by, round(s, 6), o["human_label"] or o["auto_label"])
                     for s, o in scored[:k]]
        return hits

    # ---- human annotations
    def set_label(self, perturbation_id: int, label: Optional[str] = None, note: Optional[str] = None) -> None:
        """Set the human label and/or note (None leaves one as it is; "" clears it). They survive re-adds."""
        self.perturbation(perturbation_id)
        for name, value in (("label", label), ("note", note)):
            if value is not None and (not isinstance(value, str) or len(value) > 10_000):
                raise MelboError(f"the {name} must be text of at most 10000 characters")
        with self._transaction():
            if label is not None:
                self._db.execute("UPDATE perturbations SET human_label = ? WHERE id = ?",
                                 (label.strip() or None, perturbation_id))
            if note is not None:
                self._db.execute("UPDATE perturbations SET note = ? WHERE id = ?", (note.strip() or None,
                                                                                   perturbation_id))

    # ---- plumbing
    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """One write transaction (all or nothing); a full disk or a lock held too long is a one-line error."""
        with self._lock:
            try:
                with self._db:
                    self._db.execute("BEGIN IMMEDIATE")  # take the write lock now, not halfway through
                    yield
            except sqlite3.Error as exc:
                full = disk_full(exc, self.path.parent)
                fix = free_space_fix(self.path.parent) if full else "retry, or give another --catalog"
                raise MelboError(f"cannot write the catalogue {self.path} ({exc}): {fix}") from exc

    def _query(self, sql: str, params: Iterable = ()) -> list[sqlite3.Row]:
        with self._lock:
            try:
                return self._db.execute(sql, tuple(params)).fetchall()
            except sqlite3.DatabaseError as exc:
                raise _database_error(self.path, exc, "read") from exc


_PERTURBATIONS = ("SELECT p.*, c.name AS cluster_name FROM perturbations p "
                  "LEFT JOIN clusters c ON c.run_id = p.run_id AND c.number = p.cluster")


def _check_foreign(db: sqlite3.Connection, path: Path) -> None:
    """Refuse another program's SQLite database: migrating it would add melbo's tables beside its own."""
    if db.execute("PRAGMA user_version").fetchone()[0] != 0:
        return  # melbo's, or newer than this melbo (migrate says which)
    tables = db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    if tables:
        raise MelboError(f"{path} is an SQLite database but not a melbo catalogue (it has tables such as "
                         f"{tables[0][0]!r}): give another --catalog path")


def _open_error(path: Path, exc: sqlite3.DatabaseError) -> MelboError:
    return _database_error(path, exc, "open")


def _database_error(path: Path, exc: sqlite3.DatabaseError, doing: str) -> MelboError:
    """One line for SQLite failing to open or read the catalogue. Deleting it is advised for a damaged file only:
    a full disk says "disk I/O error" as often as "database or disk is full", and the catalogue is fine."""
    if disk_full(exc, path.parent):
        return MelboError(f"cannot {doing} the catalogue {path} ({exc}): {free_space_fix(path.parent)}")
    name = getattr(exc, "sqlite_errorname", None)  # None: raised without SQLite's code
    if name is None or name.startswith(("SQLITE_NOTADB", "SQLITE_CORRUPT")):
        what = "is not a melbo catalogue" if doing == "open" else "cannot be read"
        return MelboError(f"the catalogue {path} {what} ({exc}): delete it (runs can be added again) or give "
                          "another --catalog")
    return MelboError(f"cannot {doing} the catalogue {path} ({exc}): check the disk it is on, or give another "
                      "--catalog")


def _run_entry(r: sqlite3.Row) -> RunEntry:
    return RunEntry(r["id"], r["path"], r["kind"], r["model"], r["method"], r["n"], r["created"], r["title"])


def _perturbation_entry(r: sqlite3.Row) -> PerturbationEntry:
    return PerturbationEntry(r["id"], r["run_id"], r["idx"], r["name"], r["human_label"] or r["auto_label"],
                             r["auto_label"], r["auto_confidence"], r["human_label"], r["note"], r["cluster_name"],
                             json.loads(r["metrics"]))


def _unit(blob: Optional[bytes]) -> Optional[np.ndarray]:
    if blob is None:
        return None
    v = np.frombuffer(blob, dtype=np.float32).astype(np.float64)
    norm = np.linalg.norm(v)
    return v / norm if norm > 0 else None


SQLITE_MAX = 2**63 - 1  # SQLite integers are signed 64-bit: a larger one is an OverflowError, not "not found"


def _whole(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= SQLITE_MAX:
        raise MelboError(f"{what} must be a whole number from 0 to {SQLITE_MAX}, got {value!r}")
    return value


def _fts_query(query: str) -> str:
    """Plain words become a phrase-per-word AND query, so punctuation and FTS syntax in user text cannot error."""
    words = re.findall(r"\w+", query)
    if not words:
        raise MelboError(f"{query!r} has no words to search for")
    return " ".join('"' + w.replace('"', '""') + '"' for w in words)


def check_db_path(path: Path) -> None:
    """Refuse a catalogue path SQLite cannot use safely (a link, a directory, a device, a file as a folder)."""
    if path.is_symlink():  # SQLite's -wal and -shm files would land beside the link, not the database
        raise MelboError(f"the catalogue path {path} is a symbolic link: give the database file itself")
    if path.is_dir():
        raise MelboError(f"the catalogue path {path} is a directory: give a file path, e.g. {path / FILE_NAME}")
    if path.exists() and not path.is_file():
        raise MelboError(f"the catalogue path {path} is not a regular file: give a file path")
    for folder in path.parents:
        if folder.exists():
            if not folder.is_dir():
                raise MelboError(f"{folder} is a file, not a directory: give another --catalog path")
            break


# ---------------------------------------------------------------------------------------------------- reading runs
@dataclass
class _Snapshot:
    run: dict
    perturbations: list[dict]
    completions: list[dict]
    clusters: list[dict]


def run_dirs(path: Path) -> list[Path]:
    """`path` if it is a run, else the runs one level below it (a benchmark comparing runs keeps them there)."""
    from melbo.engine.store import BENCH, CONFIG

    if not path.is_dir():
        raise MelboError(f"run directory {path} does not exist: give a directory melbo wrote")
    if (path / CONFIG).exists():
        return [path]
    found = sorted(p for p in path.iterdir() if p.is_dir() and (p / CONFIG).exists())
    if not found and not (path / BENCH).exists():  # a benchmark without runs (bench monitor) has nothing to add
        raise MelboError(f"{path} is not a melbo run (no config.json): give a run directory melbo wrote")
    return found


def read_run(path: Path, labeller: Any = None) -> _Snapshot:
    """Everything the catalogue holds about the run at `path`, read through the library."""
    from melbo.engine.store import Run

    run = Run.load(path)
    rows = run.completions()
    try:
        return _snapshot(path, run, rows, labeller)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:  # a hand-edited or foreign file
        raise MelboError(f"run {path} has a malformed completions.jsonl, metrics.json or divergence.json "
                         f"({type(exc).__name__}: {exc}): re-run `melbo assess` or the discovery") from exc


def _snapshot(path: Path, run, rows: list[dict], labeller: Any) -> _Snapshot:
    config = run.config  # typed and range-checked as the run loaded: every field fits its column
    steered = [r["vector"] for r in rows if r["vector"] is not None]
    n = len(run) if run.perturbations is not None else 1 + max(steered, default=-1)
    names = {r["vector"]: r["label"] for r in rows if r["vector"] is not None}
    metrics, cluster_of, clusters = _assessment(path, n)
    vectors = run.perturbations.vectors.detach().float().cpu().numpy() \
        if run.perturbations is not None and run.perturbations.supports_arithmetic else None
    behaviour, labels = _behaviours_and_labels(rows, n, metrics, labeller)
    perturbations = []
    for i, label in enumerate(labels):
        perturbations.append({
            "idx": i, "name": names.get(i, f"v{i}"), "cluster": cluster_of.get(i), "metrics": metrics[i],
            "auto_label": label.name if label else None,
            "auto_confidence": round(label.confidence, 4) if label else None,
            "auto_scores": {k: round(v, 4) for k, v in label.scores.items()} if label else {},
            "vector": vectors[i].astype(np.float32).tobytes() if vectors is not None and i < len(vectors) else None,
            "behaviour": behaviour[i].astype(np.float32).tobytes() if behaviour.get(i) is not None else None,
        })
    kind, title = _kind_and_title(path, config)
    return _Snapshot(
        run={"path": str(path.resolve()), "kind": kind, "model": config.model.id,
             "model_spec": config.model.spec, "method": config.method, "n": n,
             "created": config.created, "title": title, "source": config.source,
             "radius": config.radius,
             "config": json.dumps(config.to_dict(), sort_keys=True)},
        perturbations=perturbations, completions=rows, clusters=clusters)


def _assessment(path: Path, n: int) -> tuple[dict[int, dict], dict[int, Optional[int]], list[dict]]:
    """Per perturbation: its metrics (assessment and divergence) and cluster number; and the run's clusters."""
    from melbo.judging.assess import Metrics

    metrics: dict[int, dict] = {i: {} for i in range(n)}
    cluster_of: dict[int, Optional[int]] = {}
    clusters: list[dict] = []
    assessed = Metrics.load(path)
    if assessed is not None:
        for entry in assessed.learned.steered:
            if entry.vector in metrics:
                metrics[entry.vector].update({k: getattr(entry, k) for k in (
                    "distance_from_unsteered", "perplexity", "repetition", "mean_tokens")})
                cluster_of[entry.vector] = entry.cluster
        clusters = [{"number": c.id, "name": c.name, "no_change": c.no_change} for c in assessed.clusters]
    for i, values in _divergence_metrics(path).items():
        if i in metrics:
            metrics[i].update(values)
    return metrics, cluster_of, clusters


def _kind_and_title(path: Path, config: RunConfig) -> tuple[str, str]:
    """bench (in or under a bench.json), diff (a reference model) or discover; titled by the bench or first prompt."""
    from melbo.engine.store import BENCH

    for doc_path, suffix in ((path / BENCH, ""), (path.parent / BENCH, f" / {path.name}")):
        if doc_path.exists():
            from melbo.io.benchfile import BenchResult

            return "bench", f"{BenchResult.load(doc_path).title}{suffix}"
    return ("diff" if config.reference is not None else "discover"), config.prompts[0]


def _divergence_metrics(path: Path) -> dict[int, dict]:
    """A diff run's divergence per perturbation: mean KL and distance over prompts, best rank."""
    from melbo.judging.divergence import Divergence

    doc = Divergence.load(path)
    grouped: dict[int, list] = {}
    for r in doc.learned() if doc is not None else []:
        if r.vector is not None:
            grouped.setdefault(r.vector, []).append(r)
    out = {}
    for i, group in grouped.items():
        values = {}
        for key in ("kl", "distance"):
            numbers = [getattr(r, key) for r in group if getattr(r, key) is not None]  # finite: checked on reading
            if numbers:
                values[key] = float(np.mean(numbers))
        ranks = [r.rank for r in group if r.rank is not None]
        if ranks:
            values["rank"] = min(ranks)
        out[i] = values
    return out


def _behaviours_and_labels(rows: list[dict], n: int, metrics: dict[int, dict], labeller: Any):
    """The behaviour embedding (unit mean of its completions' embeddings) and automatic label of each perturbation."""
    from melbo.judging import labels as labelling

    steered = [r for r in rows if r["vector"] is not None and 0 <= r["vector"] < n]
    if not steered:
        return {}, [None] * n
    from melbo.judging.evaluation import embed

    texts = [r["text"] for r in rows]
    embeddings = embed(texts)
    behaviour: dict[int, np.ndarray] = {}
    for i in range(n):
        mine = [k for k, r in enumerate(rows) if r["vector"] == i]
        if mine:
            mean = embeddings[mine].mean(0)
            norm = np.linalg.norm(mean)
            behaviour[i] = mean / norm if norm > 0 else mean
    groups = labelling.samples_by_perturbation(rows, n, metrics, embeddings)
    chosen = labeller if labeller is not None else labelling.EmbeddingLabeller()
    return behaviour, chosen.label_groups(groups)


# ---------------------------------------------------------------------------------------------------- jobs
def record_run(path: str | Path, warn: Optional[Callable[[str], None]] = None,
               catalog: str | Path | None = None) -> list[int]:
    """Add a finished run (or a benchmark's runs) to the catalogue; never raises for catalogue trouble.

    A failure is reported as one line through `warn` (the CLI prints it) and the run stays as it is on disk:
    `melbo catalog add` can add it later. MELBO_CATALOG=off turns recording off.
    """
    if catalog is None and os.environ.get(ENV, "").strip().lower() == "off":
        return []
    try:
        with Catalog(catalog) as cat:
            return cat.add_runs(path)
    except (MelboError, sqlite3.Error, OSError, ValueError) as exc:
        if warn is not None:
            warn(f"not added to the catalogue ({exc}); add it later with `melbo catalog add {path}`")
        return []


def parse_ref(text: str) -> tuple[str, int]:
    """"RUN:v3" → ("RUN", 3); RUN is a run directory or a catalogue id."""
    match = re.fullmatch(r"(.+):v?(\d+)", str(text).strip())
    if not match:
        raise MelboError(f"{text!r} does not name a perturbation: write RUN:vN, e.g. runs/bomb:v3 or 2:v3")
    return match.group(1), int(match.group(2))
