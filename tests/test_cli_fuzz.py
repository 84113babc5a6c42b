"""A seeded fuzz of the command line: hostile values (huge and negative numbers, NaN, infinities, empty and control
text, markup, directories, devices, symlinks) in the options of the commands that read a run, a catalogue or a
file. Every command must end with exit 0 or with one line and exit 2, never a traceback; every JSON file it
leaves must be strict JSON; nothing outside the test's own directory may change.

A second pass fuzzes the options of the commands that train, map or serve (bench, map, sweep, serve), one to three
options at a time, the others cheap and valid, so that a hostile value that happens to be valid runs in a second;
`serve` stops where uvicorn would start listening. Each of these commands runs with the case's directory as its
working directory: nothing may appear outside the case directories.

About 150 + 100 commands on a tiny model and run: under a minute (40 s here on one busy core)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
from conftest import run_cli
from tiny_models import save_tiny_model

SEED = 29
CASES = 150
HEAVY_CASES = 100

VALUES = ["-1", "0", "1", "2", "7", "1e400", "nan", "inf", "-inf", "99999999999999999999", "abc", "", " ", "0.5",
          "-0.0", "1e-300", "../outside", "/dev/null", "/dev/full", "\x1b[2J\x1b]8;;http://evil\x07x", "💥",
          "[link=http://evil]x[/link]", "v0", "v1", "0,1", "1:v0", "9:v9", "x" * 300]


def _strict(path: Path) -> None:
    def refuse(constant):
        raise AssertionError(f"{path} holds {constant}: not strict JSON")

    text = path.read_text(encoding="utf-8")
    lines = text.splitlines() if path.suffix == ".jsonl" else [text]
    for line in lines:
        if line.strip():
            json.loads(line, parse_constant=refuse)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import melbo

    base = tmp_path_factory.mktemp("fuzz")
    model = save_tiny_model(base / "model")
    lm = melbo.load_model(str(model))
    run = melbo.elicit(lm, ["Hello there"], base / "run", random=1, n_vectors=2, steps=2, radius="1.0",
                       max_new_tokens=4, source=1, target=3)
    (base / "link").symlink_to(base / "run" / "config.json")
    (base / "prompts.txt").write_text("Hi\nHello there\n")
    return {"base": base, "model": str(model), "run": str(run.path)}


def _command(rng: random.Random, w: dict, out: Path) -> list[str]:
    v = lambda: rng.choice(VALUES + [str(w["base"]), str(w["base"] / "link"), w["run"]])  # noqa: E731
    db = str(out / "catalog.sqlite")
    return rng.choice([
        lambda: ["generate", w["run"], "-p", v(), "--vectors", v(), "--scale", v(), "--max-new-tokens",
                 rng.choice(["1", "2", v()])],
        lambda: ["export", w["run"], "--format", rng.choice(["llamacpp", "safetensors", v()]), "--out",
                 rng.choice([str(out / "e"), v()]), "--vectors", v()],
        lambda: ["catalog", "search", v(), "--limit", v(), "--catalog", db],
        lambda: ["catalog", "show", v(), "--catalog", db],
        lambda: ["catalog", "label", v(), v(), "--catalog", db],
        lambda: ["catalog", "similar", v(), "-k", v(), "--catalog", db],
        lambda: ["report", rng.choice([w["run"], v()])],
        lambda: ["check", rng.choice([w["run"], v()]), "--check", rng.choice(["arithmetic-cot", v()]),
                 "--consistent", v()],
        lambda: ["monitor", w["run"], "--prompts-file", rng.choice([str(w["base"] / "prompts.txt"), v()]),
                 "--alpha", v(), "--out", str(out / "m")],
        lambda: ["discover", v(), "-m", w["model"], "-n", v(), "--steps", v(), "--radius", v(), "--random", "0",
                 "--max-new-tokens", "2", "--source", "1", "--target", "3", "--out", str(out / "d")],
        lambda: ["chat", w["run"], "--vectors", v(), "--scale", v(), "--turns", v()],
    ])()


def test_hostile_command_lines_end_in_one_line_or_success(world, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MELBO_CATALOG", str(tmp_path / "default.sqlite"))
    monkeypatch.chdir(tmp_path)  # relative values ("abc", "../outside") land under the test's directory
    before = {p: p.stat().st_mtime_ns for p in world["base"].rglob("*") if p.is_file() and not p.is_symlink()}
    rng = random.Random(SEED)
    for case in range(CASES):
        out = tmp_path / f"c{case}"
        out.mkdir()
        args = _command(rng, world, out)
        code, _, err = run_cli(args, capsys)
        assert code in (0, 2), (args, err[-2000:])
        assert "Traceback" not in err, (args, err[-2000:])
        if code == 2:
            assert len([line for line in err.strip().splitlines() if line.startswith("melbo: error")]) == 1, \
                (args, err)
    for path in tmp_path.rglob("*.json*"):
        if path.is_file() and path.suffix in (".json", ".jsonl"):
            _strict(path)
    after = {p: p.stat().st_mtime_ns for p in world["base"].rglob("*") if p.is_file() and not p.is_symlink()}
    changed = [str(p) for p in before if after.get(p) != before[p] and p.name != "report.html"]
    assert not changed, changed  # the run itself: read, never rewritten by a failed command
    assert os.path.exists("/dev/full") and not Path("/dev/full").is_file()
    assert not list(tmp_path.rglob("*.tmp"))


# ------------------------------------------------------------------------------------------------ bench, map, sweep, serve
WORKERS = ["0", "-1", "nan", "abc", "1e400", "99", ""]  # never a valid count: a valid one would start Ray
ADDRESSES = ["", " ", "abc", "x:y", "127.0.0.1:1", "ray://:", "[::1]:99999"]


def _heavy(rng: random.Random, w: dict, out: Path) -> list[str]:
    """A cheap, valid command line of bench, map, sweep or serve with one to three of its options made hostile."""
    v = lambda: rng.choice(VALUES + [str(w["base"]), w["run"]])  # noqa: E731
    model, cheap = w["model"], ["--steps", "1", "-n", "1", "--max-new-tokens", "2"]
    base, options = rng.choice([
        (["map", "Hello there", "-m", model, "--layers", "1:2", "-k", "1", "--iterations", "1", "--out",
          str(out / "map")],
         {"--layers": v, "--sources": v, "--targets": v, "-k": v, "--iterations": v, "--positions": v, "--seed": v,
          "--resume": v, "--prompts-file": v, "--workers": lambda: rng.choice(WORKERS),
          "--ray-address": lambda: rng.choice(ADDRESSES), "--out": v, "--chat": None, "--threads": v}),
        (["sweep", "Hello there", "-m", model, "--radii", "1", *cheap, "--source", "1", "--target", "3", "--out",
          str(out / "sweep")],
         {"--radii": v, "--pairs": v, "-n": v, "--steps": v, "--source": v, "--target": v, "--max-new-tokens": v,
          "--fluency-factor": v, "--fluency-floor": v, "--seed": v, "--workers": lambda: rng.choice(WORKERS),
          "--out": v, "--prompts-file": v}),
        (["bench", "refusal", "-m", model, "--quick", "--requests", "2", "--random", "1", *cheap, "--out",
          str(out / "bench")],
         {"--prompt": v, "--requests": v, "-n": v, "--random": v, "--radius": v, "--steps": v, "--source": v,
          "--target": v, "--batch-size": v, "--seed": v, "--seeds": v, "--max-new-tokens": v, "--out": v}),
        (["bench", "arithmetic", "-m", model, "--quick", "--problems", "2", "--select", "1", "--random", "1", *cheap,
          "--out", str(out / "bench")],
         {"--problems": v, "--select": v, "--digits": v, "-n": v, "--random": v, "--radius": v, "--source": v,
          "--target": v, "--batch-size": v, "--seeds": v, "--max-new-tokens": v}),
        (["bench", "monitor", w["run"], "--per-set", "2", "--out", str(out / "bench")],
         {"--alpha": v, "--per-set": v, "--seed": v, "--out": v}),
        (["serve", "--catalog", str(out / "catalog.sqlite"), "--port", "8765"],
         {"--port": v, "--host": lambda: rng.choice(["", "0.0.0.0", "::1", "localhost", "10.255.255.1", v()]),
          "--token": v, "--catalog": v, "--model": v, "--device": v, "--dtype": v}),
    ])
    args = list(base)
    for option in rng.sample(sorted(options), rng.randint(1, 3)):
        value = options[option]
        if value is None:
            args.append(option)
        elif option in args:  # replace the cheap value
            args[args.index(option) + 1] = value()
        else:
            args += [option, value()]
    return args


def test_hostile_options_of_bench_map_sweep_serve(world, tmp_path, capsys, monkeypatch):
    import uvicorn

    served = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self: served.append(self.config.port))  # never listens
    monkeypatch.setenv("MELBO_CATALOG", str(tmp_path / "default.sqlite"))
    before = {p: p.stat().st_mtime_ns for p in world["base"].rglob("*") if p.is_file() and not p.is_symlink()}
    rng = random.Random(f"{SEED}-heavy")
    codes = []
    for case in range(HEAVY_CASES):
        out = tmp_path / f"h{case}"
        out.mkdir()
        monkeypatch.chdir(out)  # relative values ("abc", a default runs/…) land in the case's own directory
        args = _heavy(rng, world, out)
        code, _, err = run_cli(args, capsys)
        codes.append(code)
        assert code in (0, 2), (args, err[-2000:])
        assert "Traceback" not in err, (args, err[-2000:])
        if code == 2:
            assert len([line for line in err.strip().splitlines() if line.startswith("melbo: error")]) == 1, \
                (args, err)
    assert 0 in codes and 2 in codes  # valid combinations ran, hostile ones were refused
    for path in tmp_path.rglob("*.json*"):
        if path.is_file() and path.suffix in (".json", ".jsonl"):
            _strict(path)
    outside = {p.name for p in tmp_path.iterdir()} - {f"h{k}" for k in range(HEAVY_CASES)}
    assert outside <= {"outside", "default.sqlite", "default.sqlite-wal", "default.sqlite-shm"}, outside
    after = {p: p.stat().st_mtime_ns for p in world["base"].rglob("*") if p.is_file() and not p.is_symlink()}
    assert not [str(p) for p in before if after.get(p) != before[p] and p.name != "report.html"]
    assert not list(tmp_path.rglob("*.tmp"))
