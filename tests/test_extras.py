"""Optional extras: a command that needs a missing one says which pip install adds it, in one line."""

from __future__ import annotations

import sys

import pytest
from conftest import run_cli

from melbo.errors import MelboError
from melbo.extras import require


def test_a_missing_extra_names_its_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError, as when not installed
    with pytest.raises(MelboError, match=r"pip install 'melbo\[ray\]'"):
        require("ray")
    assert require("fastapi").__name__ == "fastapi"  # installed here: imported as is


def test_serve_without_the_serve_extra_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    code, _, err = run_cli(["serve", "--port", "8799"], capsys)
    assert code == 2 and "pip install 'melbo[serve]'" in err and "Traceback" not in err


def test_the_core_modules_do_not_import_the_extras():
    import subprocess

    code = ("import sys, melbo, melbo.jobs.auditing, melbo.jobs.trigger_search, melbo.cli; "
            "bad = [m for m in ('fastapi', 'uvicorn', 'ray') if m in sys.modules]; print(bad); sys.exit(bool(bad))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_import_melbo_loads_no_torch_and_resolves_every_export():
    import subprocess

    code = ("import sys, melbo; assert 'torch' not in sys.modules, 'torch loaded'; "
            "missing = [n for n in melbo.__all__ if getattr(melbo, n, None) is None]; "
            "assert not missing, missing")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_the_command_line_loads_no_torch_for_help():
    import subprocess

    done = subprocess.run([sys.executable, "-c", "import sys, melbo.cli; sys.exit('torch' in sys.modules)"],
                          capture_output=True, text=True)
    assert done.returncode == 0, "melbo.cli imported torch: `melbo --help` would take seconds"
