"""A kill (SIGTERM from `timeout`, a scheduler or `kill`) ends a command as Ctrl-C does: one line, exit 130."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tiny_models import save_tiny_model


def test_sigterm_during_training_prints_the_resume_line_and_no_traceback(tmp_path):
    model = save_tiny_model(tmp_path / "model")
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MELBO_CATALOG": str(tmp_path / "catalog.sqlite")}
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "melbo"), "discover", "What is 4 + 6?", "-m", str(model), "--steps", "100000",
         "--n-vectors", "2", "--batch-size", "1", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not (out / "config.json").exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    time.sleep(1.0)  # inside the training loop
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert f"melbo discover --resume {out}" in " ".join(stderr.split())
    assert (out / "config.json").is_file()
