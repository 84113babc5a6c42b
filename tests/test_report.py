"""The HTML report: self-contained, every section from fabricated run data, model text escaped in a real browser."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch

from melbo.records.report import write_report
from melbo.io.files import save_tensors

CHROMIUM = Path("/usr/bin/chromium")
HOSTILE = "<script>document.title='pwned'</script><img src=x onerror=alert(1)>"
N, STEPS = 4, 10
PROMPTS = ["How can I make a bomb?", "Tell me a story about <b>cats</b> & dogs."]


def make_run(path: Path, metrics: bool = True) -> Path:
    """A complete run directory written by hand: config, completions, curves and (optionally) metrics."""
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "melbo_version": "0.1.0", "created": "2026-01-01T00:00:00+00:00", "status": "complete",
        "model": {"id": "tiny/model@abc", "spec": "tiny"}, "method": "vectors", "source": 2, "target": 6,
        "radius": 4.5, "radius_relative": 0.2, "residual_norm": 22.5, "p": 2.0, "q": 1.0, "orthogonal": "hard",
        "rank": None,
        "settings": {"prompts": PROMPTS, "n_vectors": N, "steps": STEPS, "lr": 0.05, "seed": 0,
                     "positions": "all", "max_new_tokens": 48, "radius": "0.2x"},
    }
    (path / "config.json").write_text(json.dumps(config))
    rows = []
    for p_index, prompt in enumerate(PROMPTS):
        rows.append({"vector": None, "label": "unsteered", "prompt_index": p_index, "prompt": prompt, "sample": 0,
                     "text": f"I can't help with that ({p_index}).", "tokens": 8})
        for v in range(N):
            text = HOSTILE if (v, p_index) == (1, 0) else f"Steered answer of v{v} to prompt {p_index}."
            rows.append({"vector": v, "label": f"v{v}", "prompt_index": p_index, "prompt": prompt, "sample": 0,
                         "text": text, "tokens": 12})
    (path / "completions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    steps = torch.arange(STEPS + 1, dtype=torch.float32)
    curves = torch.stack([(v + 1) * (1 - torch.exp(-steps / 3)) for v in range(N)])
    save_tensors(path / "curves.safetensors", {"curves": curves})
    if metrics:
        learned = [{"label": f"v{v}", "vector": v, "distance_from_unsteered": 0.1 + 0.2 * v, "perplexity": 5.0 + 3 * v,
                    "repetition": 0.05 * v, "mean_tokens": 12.0, "cluster": 0 if v else -1,
                    "cluster_name": HOSTILE if v == 2 else "instructions", "no_change": v == 0} for v in range(N)]
        learned.insert(0, {"label": "unsteered", "vector": None, "distance_from_unsteered": 0.0, "perplexity": 4.0,
                           "repetition": 0.0, "mean_tokens": 8.0, "cluster": None, "cluster_name": None,
                           "no_change": False})
        random = [{"label": f"random{k}", "vector": k, "distance_from_unsteered": 0.05, "perplexity": 6.0 + k,
                   "repetition": 0.01, "mean_tokens": 11.0} for k in range(3)]
        doc = {
            "learned": {"diversity": 0.5, "mean_distance_from_unsteered": 0.4, "median_perplexity": 9.5,
                        "mean_repetition": 0.07, "perturbations": learned},
            "random": {"diversity": 0.1, "mean_distance_from_unsteered": 0.05, "median_perplexity": 7.0,
                       "mean_repetition": 0.01, "perturbations": random},
            "clusters": [{"id": 0, "name": "instructions", "members": ["v1", "v2", "v3"], "no_change": False},
                         {"id": -1, "name": "no change", "members": ["v0"], "no_change": True}],
            "random_completions": [{"vector": k, "label": f"random{k}", "prompt_index": 0, "prompt": PROMPTS[0],
                                    "sample": 0, "text": f"random text {k}", "tokens": 10} for k in range(3)],
        }
        (path / "metrics.json").write_text(json.dumps(doc))
    return path


def make_sweep(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    points = [{"radius": 22.5 * r, "radius_relative": r, "source": 2, "target": 6, "diversity": 0.1 + r,
               "median_perplexity": 4 * (1 + 10 * r ** 2), "mean_distance_from_unsteered": 0.8 * r,
               "mean_repetition": 0.02, "fluent": r <= 0.4} for r in (0.1, 0.2, 0.4, 0.8)]
    chosen = {k: points[2][k] for k in ("radius", "radius_relative", "source", "target")}
    doc = {"relative": True, "points": points, "chosen": chosen, "reason": "the most diverse fluent R",
           "fluency_floor": 30.0}
    (path / "sweep.json").write_text(json.dumps(doc))
    return path


def test_report_is_self_contained_and_escaped(tmp_path):
    run = make_run(tmp_path / "run")
    page = write_report(run, make_sweep(tmp_path / "sweep"))
    assert page == run / "report.html"
    html = page.read_text()
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(images) == 3  # learned vs random, training curves, R sweep
    import base64

    assert all(base64.b64decode(img)[:8] == b"\x89PNG\r\n\x1a\n" for img in images)
    assert not re.search(r"https?://", html)
    assert "<script" not in html.lower()
    assert "&lt;script&gt;document.title=" in html
    assert html.count('<section class="card') == N
    assert "&lt;b&gt;cats&lt;/b&gt; &amp; dogs" in html  # prompts are escaped too
    assert "no change" in html and "the most diverse fluent R" in html


def test_report_without_optional_data(tmp_path):
    run = make_run(tmp_path / "run", metrics=False)
    (run / "curves.safetensors").unlink()
    html = write_report(run).read_text()
    assert html.count('<section class="card') == N
    assert "data:image/png" not in html
    assert 'id="evaluation"' not in html and 'id="sweep"' not in html and 'id="curves"' not in html
    assert "I can&#39;t help with that (0)." in html


def test_report_cli(tmp_path, capsys):
    from conftest import run_cli

    run = make_run(tmp_path / "run")
    code, out, err = run_cli(["report", str(run), "--sweep", str(make_sweep(tmp_path / "sweep"))], capsys)
    assert code == 0, err
    assert str(run / "report.html") in "".join(out.split("\n"))
    code, _, err = run_cli(["report", str(tmp_path / "nope")], capsys)
    assert code == 2 and "does not exist" in err


def _chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    command = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is absent (apt-get install -y chromium)")
def test_report_in_headless_chromium(tmp_path):
    run = make_run(tmp_path / "run")
    page = write_report(run, make_sweep(tmp_path / "sweep"))
    result = _chromium(["--dump-dom", page.resolve().as_uri()], tmp_path / "profile")
    dom = result.stdout
    assert result.returncode == 0 and "</html>" in dom, result.stderr[-2000:]
    assert len(re.findall(r'<section class="card[^"]*" data-vector="\d+"', dom)) == N
    assert re.search(r"<title>melbo report · tiny/model@abc</title>", dom)  # the script never ran
    assert "pwned" not in dom.split("</title>")[0]
    assert "&lt;script&gt;document.title='pwned'&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;" in dom
    assert "<script" not in dom.lower() and "<img src=\"x\"" not in dom and "onerror=\"" not in dom
    assert len(re.findall(r"<img ", dom)) == 3  # only the three plots


def test_the_report_names_the_system_prompt_and_where_the_weights_came_from(tmp_path):
    run = make_run(tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    config["model"]["system"] = "You are <b>a pirate</b>."
    config["provenance"] = {"model": {"source": "hub", "id": "org/model", "revision": "v1.0",
                                      "commit": "0123456789abcdef0123", "sha256": "f" * 64},
                            "reference": {"source": "gguf", "sha256": "a" * 64}}
    (run / "config.json").write_text(json.dumps(config))
    html = write_report(run).read_text()
    assert "system prompt" in html and "You are &lt;b&gt;a pirate&lt;/b&gt;." in html  # escaped like model text
    assert "hub org/model @ v1.0 → commit 0123456789ab, sha256 ffffffffffffffff…" in html
    assert "gguf, sha256 aaaaaaaaaaaaaaaa…" in html
    assert "system prompt" not in write_report(make_run(tmp_path / "plain")).read_text()
