"""Writing and reading files safely: output paths checked before work, writes atomic, one-line errors.

Every file melbo writes goes through `replacing` (a temporary beside the path, renamed over it on success and
removed on any failure), so an interruption or a full disk never leaves a half-written file.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from typing import TYPE_CHECKING

from safetensors import SafetensorError

if TYPE_CHECKING:  # torch loads with the first tensor read or written, not with `melbo --help`
    from torch import Tensor

from melbo.errors import MelboError
from melbo.numbers import jsonable


def check_output_file(path: Path) -> None:
    """Refuse an output file path that is not a new path or a regular file: a write renames over what is there."""
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise MelboError(f"{path} is not a regular file (a directory, link or device): give a new file path")
    _check_ancestors(path.parent)


def check_output_dir(path: Path) -> None:
    """Refuse an output directory path that is, or lies under, something other than a directory."""
    path = Path(path)
    if any(len(part.encode()) > 255 for part in path.parts):  # NAME_MAX: exists() itself would raise
        raise MelboError(f"a name in {str(path)[:80]}… is longer than 255 bytes: choose a shorter --out")
    if path.exists() and not path.is_dir():
        raise MelboError(f"{path} is a file, not a directory: choose another --out")
    _check_ancestors(path)


def check_outputs(out: Path, names: Iterable[str]) -> None:
    """Refuse an output directory where any of a command's files cannot be written, before the first is: a command
    that writes several files (with `replacing_all`) writes all of them or none, and refuses before its work."""
    check_output_dir(out)
    for name in names:
        check_output_file(Path(out) / name)


def _check_ancestors(path: Path) -> None:
    # The nearest existing ancestor must be a directory, or mkdir fails halfway.
    for folder in (path, *path.parents):
        if folder.exists():
            if not folder.is_dir():
                raise MelboError(f"{folder} is a file, not a directory: choose another --out")
            return


def as_path(value: object, what: str) -> Path:
    """`value` as a Path, or one line naming what was given instead (the API takes paths unchecked)."""
    if not isinstance(value, (str, os.PathLike)):
        raise MelboError(f"{what} must be a path, got {value!r}")
    return Path(value)


def make_output_dir(path: Path) -> None:
    check_output_dir(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MelboError(f"cannot create {path} ({exc.strerror}): choose another --out") from exc


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary path beside `path`, renamed over it on success and removed on any failure."""
    check_output_file(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, (OSError, SafetensorError)):
            raise write_error(path, exc) from exc
        raise


@contextmanager
def replacing_all(paths: list[Path]) -> Iterator[list[Path]]:
    """Temporaries beside all `paths`, renamed over them only once every one is written: all the files or none.

    Folders the paths need are made first, and removed again on failure (so a failed export leaves no `v0/`)."""
    paths = [Path(p) for p in paths]
    for path in paths:
        check_output_file(path)
    tmps = [path.with_name(path.name + ".tmp") for path in paths]
    made = [folder for folder in dict.fromkeys(p.parent for p in paths) if not folder.exists()]
    try:
        for folder in made:
            make_output_dir(folder)
        yield tmps
        for tmp, path in zip(tmps, paths):
            os.replace(tmp, path)
    except BaseException as exc:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
        for folder in reversed(made):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        if isinstance(exc, (OSError, SafetensorError)):
            raise write_error(paths[0], exc) from exc
        raise


@contextmanager
def replacing_dir(path: Path) -> Iterator[Path]:
    """A temporary folder beside `path`, put in its place once complete (what was there is removed then), and
    removed on any failure: a full disk halfway through a model's shards leaves neither half a model nor the temporary.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")  # per process: two may build one folder at once
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        yield tmp
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, (OSError, SafetensorError)):
            raise write_error(path, exc) from exc
        raise


# A full disk as safetensors' Rust side words it (no errno reaches Python): "StorageFull", "os error 28", …, and as
# SQLite does ("database or disk is full").
_FULL = re.compile(r"StorageFull|QuotaExceeded|No space left|Disk quota|disk is full|os error (28|122)\b",
                   re.IGNORECASE)


def disk_full(exc: BaseException, where: Optional[Path] = None) -> bool:
    """Whether `exc` is a full disk or an exhausted quota, by errno or by the wording of a library without one.

    With `where`: also when the filesystem holding it has no block left, whatever `exc` says (SQLite reports a
    shared-memory file it cannot grow as "disk I/O error")."""
    if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or _FULL.search(str(exc)):
        return True
    try:
        stat = os.statvfs(where) if where is not None else None
    except OSError:
        return False
    return stat is not None and (stat.f_bfree if os.geteuid() == 0 else stat.f_bavail) == 0


def free_space_fix(path: Path) -> str:
    """The fix for a full disk: free space on the filesystem holding `path`, named by its mount point (the folder
    is in the message already; where to free space is what a user has to look up)."""
    folder = Path(os.path.abspath(path))
    mount = folder
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    return f"free space on {mount}"


def write_error(path: Path, exc: BaseException, fix: str = "choose another --out") -> MelboError:
    """One line for a failed write of `path`: a full disk names the filesystem to free, anything else `fix`."""
    reason = getattr(exc, "strerror", None) or str(exc)
    return MelboError(f"cannot write {path} ({reason}): {free_space_fix(path.parent) if disk_full(exc) else fix}")


def save_file(tensors: dict, filename: str, metadata: Optional[dict[str, str]] = None) -> None:
    """safetensors' writer, imported on first use (it imports torch)."""
    from safetensors.torch import save_file as write

    write(tensors, filename, metadata=metadata)


def load_file(filename: str) -> dict:
    """safetensors' reader, imported on first use (it imports torch)."""
    from safetensors.torch import load_file as read

    return read(filename)


def atomic_write(path: Path, data: bytes) -> None:
    """Write via a temporary file and rename, so an interruption never leaves a half-written file."""
    with replacing(Path(path)) as tmp:
        tmp.write_bytes(data)


def save_tensors(path: Path, tensors: dict[str, Tensor], metadata: Optional[dict[str, str]] = None) -> None:
    with replacing(Path(path)) as tmp:
        write_tensors(tmp, tensors, metadata)


def write_tensors(path: Path, tensors: dict[str, Tensor], metadata: Optional[dict[str, str]] = None) -> None:
    """A safetensors file written in place: for a temporary of `replacing`/`replacing_all` (else `save_tensors`)."""
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata=metadata)


MAX_TEXT_BYTES = 64 * 2**20  # prompts, vocabularies, corpora: far past any real one, far below the machine's memory


def read_text(path: Path, what: str = "file", fix: str = "save it as UTF-8") -> str:
    """A UTF-8 text file's contents; a missing, unreadable, endless or non-UTF-8 file is a one-line error.

    A pipe (`--prompts-file <(...)`) is read like a file; a device is refused (/dev/zero never ends)."""
    path = Path(path)
    try:
        if path.is_char_device() or path.is_block_device():
            raise MelboError(f"{what} {path} is a device, not a text file: give a text file")
        with open(path, "rb") as handle:
            data = handle.read(MAX_TEXT_BYTES + 1)
        if len(data) > MAX_TEXT_BYTES:
            raise MelboError(f"{what} {path} is larger than {MAX_TEXT_BYTES // 2**20} MB: give a smaller text file")
        return data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")  # as text mode reads it
    except UnicodeDecodeError as exc:
        raise MelboError(f"{what} {path} is not UTF-8 text (byte {exc.start}): {fix}") from exc
    except FileNotFoundError as exc:
        raise MelboError(f"{what} {path} does not exist: check the path") from exc
    except IsADirectoryError as exc:
        raise MelboError(f"{what} {path} is a directory: give a text file") from exc
    except OSError as exc:
        raise MelboError(f"cannot read {what} {path} ({exc.strerror}): give a readable text file") from exc


def load_tensors(path: Path) -> dict[str, Tensor]:
    if not path.exists():
        raise MelboError(f"{path} is missing: the run is incomplete; re-run or --resume it")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise MelboError(f"{path} is corrupt ({exc}): delete it and re-run (or --resume) this run") from exc


def write_json(path: Path, obj: Any) -> None:
    """Strict JSON (other tools refuse NaN and Infinity): a number that is not finite is written as null."""
    atomic_write(path, json_bytes(obj))


def json_bytes(obj: Any) -> bytes:
    """`obj` as `write_json` writes it (strict, indented): for a temporary of `replacing_all`."""
    return (json.dumps(jsonable(obj), indent=2, sort_keys=False, allow_nan=False) + "\n").encode()


def json_line(obj: Any) -> str:
    """One line of a .jsonl file, strict JSON as `write_json` writes it."""
    return json.dumps(jsonable(obj), allow_nan=False)


def jsonl_bytes(rows: Iterable[Any]) -> bytes:
    """A .jsonl file's contents: one strict JSON line per row."""
    return "".join(json_line(r) + "\n" for r in rows).encode()


def write_jsonl(path: Path, rows: Iterable[Any]) -> None:
    """One strict JSON line per row, written atomically."""
    atomic_write(path, jsonl_bytes(rows))


def read_json(path: Path) -> Any:
    if not path.exists():
        raise MelboError(f"{path.parent} is not a melbo run (no {path.name}): give a run directory")
    try:
        return json.loads(read_text(path, path.name, "restore or delete the run"))
    except json.JSONDecodeError as exc:
        raise MelboError(f"{path} is corrupt ({exc.msg}): restore or delete the run") from exc


def load_metadata(path: Path, fix: str = "delete it and re-run (or --resume) this run") -> dict[str, str]:
    """The string metadata a safetensors file carries (empty when it has none)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise MelboError(f"{path} is corrupt ({exc}): {fix}") from exc
