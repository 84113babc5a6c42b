"""Shared fixtures: tiny random models for exact mechanics, the embedded default model for behaviour."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import byte_tokenizer, tiny_model  # noqa: E402

from melbo.engine.layers import find_blocks  # noqa: E402
from melbo.engine.models import LoadedModel  # noqa: E402


def tiny_lm(arch: str = "llama", seed: int = 0) -> LoadedModel:
    """A tiny random model with a real (byte-level) tokenizer: prompts go through melbo's own encoding."""
    model = tiny_model(arch, seed).requires_grad_(False)
    path, blocks = find_blocks(model)
    tokenizer = byte_tokenizer()
    tokenizer.padding_side = "left"
    return LoadedModel(model, tokenizer, blocks, path, f"tiny-{arch}", f"tiny-{arch}")


@pytest.fixture(scope="session")
def smol() -> LoadedModel:
    """The embedded default model (SmolLM2-135M-Instruct), loaded once per test session."""
    from melbo.engine.models import load_model

    return load_model()


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """Run the `melbo` entry point in-process; returns (exit code, stdout, stderr)."""
    from melbo.cli import main

    old = sys.argv
    sys.argv = ["melbo", *args]
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = old
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(autouse=True)
def _private_catalog(tmp_path_factory, monkeypatch):
    """Runs made by tests are catalogued in a throw-away database, never the user's (melbo.records.catalog)."""
    monkeypatch.setenv("MELBO_CATALOG", str(tmp_path_factory.mktemp("catalog") / "catalog.sqlite"))
