"""Bad input never gives a traceback: one line naming the fix, exit code 2 (MelboError in the API), nothing lost.

Most cases run on a tiny random model saved with a byte-level tokenizer, so the CLI can load it by path in a
second; the model directory and one finished run are shared by the whole module.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from tiny_models import save_tiny_model

import melbo
from melbo.errors import MelboError

PROMPT = "Hello there"


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def lm(model_dir):
    return melbo.load_model(str(model_dir))


@pytest.fixture(scope="module")
def run_dir(lm, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("runs") / "run"
    melbo.discover(lm, [PROMPT], path, n_vectors=2, steps=3, radius="1.0", max_new_tokens=4)
    return path


def _copy_run(run_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    return copy


def one_line(code: int, stderr: str, *fragments: str) -> str:
    """Assert exit code 2 and a single stderr line containing every fragment; return that line."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in stderr, stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def no_tmp(folder: Path) -> None:
    assert not [p for p in folder.rglob("*") if ".tmp" in p.name]


# ------------------------------------------------------------------------------------------------ output paths
@pytest.mark.parametrize("kind", ["symlink", "fifo"])
def test_generate_out_never_replaces_a_link_or_device(kind, run_dir, tmp_path, capsys):
    target = tmp_path / "precious.txt"
    target.write_text("keep me\n")
    out = tmp_path / "out.jsonl"
    if kind == "symlink":
        out.symlink_to(target)
    else:
        os.mkfifo(out)  # stands in for a device such as /dev/full, which a root test must not touch
    code, _, stderr = run_cli(["generate", str(run_dir), "-p", "Hi", "--max-new-tokens", "2", "--out", str(out)],
                              capsys)
    one_line(code, stderr, "not a regular file")
    assert out.is_symlink() if kind == "symlink" else out.is_fifo()
    assert target.read_text() == "keep me\n"
    no_tmp(tmp_path)


@pytest.mark.parametrize(
    "args, message",
    [
        (["discover", PROMPT, "-n", "1", "--steps", "1", "--out", "FILE"], "is a file, not a directory"),
        (["export", "RUN", "--format", "llamacpp", "--out", "FILE"], "is a file, not a directory"),
        (["export", "RUN", "--format", "llamacpp", "--out", "FILE/sub"], "is a file, not a directory"),
        (["testbed", "backdoor", "--base", "MODEL", "--out", "FILE"], "is a file, not a directory"),
        (["sweep", PROMPT, "--radii", "1x", "-n", "1", "--steps", "1", "--out", "FILE"], "is a file, not a directory"),
        (["generate", "RUN", "-p", "Hi", "--max-new-tokens", "2", "--out", "DIR"], "not a regular file"),
    ],
)
def test_out_of_the_wrong_kind_is_one_line(args, message, run_dir, model_dir, tmp_path, capsys):
    file, folder = tmp_path / "file.txt", tmp_path / "folder"
    file.write_text("keep me\n")
    folder.mkdir()
    names = {"RUN": str(run_dir), "MODEL": str(model_dir), "FILE": str(file), "DIR": str(folder)}
    args = [names.get(a, a).replace("FILE/", f"{file}/") for a in args]
    if args[0] in ("discover", "sweep"):
        args += ["--model", str(model_dir)]
    code, _, stderr = run_cli(args, capsys)
    one_line(code, stderr, message)
    assert file.read_text() == "keep me\n" and list(folder.iterdir()) == []
    no_tmp(tmp_path)


# ------------------------------------------------------------------------------------------------ full disk
def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_while_writing_the_report_is_one_line(run_dir, tmp_path, monkeypatch, capsys):
    run = _copy_run(run_dir, tmp_path)
    real = Path.write_bytes

    def half_then_full(self, data):
        real(self, data[: len(data) // 2])
        _disk_full()

    monkeypatch.setattr(Path, "write_bytes", half_then_full)
    code, _, stderr = run_cli(["report", str(run)], capsys)
    one_line(code, stderr, "No space left on device", "free space on")
    assert not (run / "report.html").exists()
    no_tmp(tmp_path)


def test_full_disk_while_saving_tensors_cleans_up(tmp_path, monkeypatch):
    from melbo.io import files

    def half_then_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        _disk_full()

    monkeypatch.setattr(files, "save_file", half_then_full)
    (tmp_path / "vectors.safetensors").write_bytes(b"old")
    with pytest.raises(MelboError, match="free space on"):
        files.save_tensors(tmp_path / "vectors.safetensors", {"vectors": torch.zeros(2, 3)})
    assert (tmp_path / "vectors.safetensors").read_bytes() == b"old"
    no_tmp(tmp_path)


def test_interrupted_write_leaves_no_tmp(tmp_path, monkeypatch):
    from melbo.io import files

    real = Path.write_bytes

    def interrupted(self, data):
        real(self, data[:1])
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_bytes", interrupted)
    with pytest.raises(KeyboardInterrupt):
        files.atomic_write(tmp_path / "config.json", b"{}")
    no_tmp(tmp_path)


# ------------------------------------------------------------------------------------------------ non-UTF-8
LATIN1 = "Caf\xe9 cr\xe8me".encode("latin-1")


@pytest.mark.parametrize("case", ["prompts-file", "turns", "completions", "config"])
def test_non_utf8_input_is_one_line(case, run_dir, model_dir, tmp_path, capsys):
    run = _copy_run(run_dir, tmp_path)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(LATIN1)
    if case == "prompts-file":
        args = ["discover", "--prompts-file", str(bad), "--model", str(model_dir), "--out", str(tmp_path / "new")]
    elif case == "turns":
        args = ["chat", str(run), "--turns", str(bad)]
    elif case == "completions":
        (run / "completions.jsonl").write_bytes(LATIN1)
        args = ["report", str(run)]
    else:
        (run / "config.json").write_bytes(LATIN1)
        args = ["generate", str(run), "-p", "Hi"]
    code, _, stderr = run_cli(args, capsys)
    line = one_line(code, stderr, "not UTF-8")
    assert ("bad.txt" if case in ("prompts-file", "turns") else run.name) in line
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("args", [
    ["discover", "a \udcff prompt", "-n", "2"],  # bytes that were not UTF-8 reach sys.argv as lone surrogates
    ["scan", "a = {?} \udcff", "--check", "arithmetic-cot"],
    ["catalog", "label", "1:v0", "caf\udce9"],
])
def test_non_utf8_arguments_are_one_line(args, tmp_path, capsys):
    code, _, stderr = run_cli([*args, "--out", str(tmp_path / "new")] if args[0] != "catalog" else args, capsys)
    one_line(code, stderr, "not UTF-8 text")
    assert not (tmp_path / "new").exists()


def test_non_utf8_prompts_in_the_api():
    from melbo.engine.prompts import check_prompt_list

    with pytest.raises(MelboError, match="prompt 1 is not UTF-8 text"):
        check_prompt_list(["fine", "caf\udce9"])


def test_a_device_or_an_endless_file_as_input_is_one_line(tmp_path, capsys, monkeypatch):
    """/dev/zero as --prompts-file read until the machine ran out of memory; a huge file is refused by size."""
    from melbo.io import files

    code, _, stderr = run_cli(["discover", "--prompts-file", "/dev/zero", "--out", str(tmp_path / "new")], capsys)
    one_line(code, stderr, "is a device, not a text file")
    monkeypatch.setattr(files, "MAX_TEXT_BYTES", 10)
    big = tmp_path / "big.txt"
    big.write_text("a prompt\n" * 3)
    with pytest.raises(MelboError, match="larger than"):
        files.read_text(big, "prompts file")
    crlf = tmp_path / "crlf.txt"
    crlf.write_bytes(b"a\r\nb")
    monkeypatch.setattr(files, "MAX_TEXT_BYTES", 100)
    assert files.read_text(crlf) == "a\nb"  # as Path.read_text gave it


def test_non_utf8_completions_in_the_api(run_dir, tmp_path):
    from melbo.engine.store import Run

    run = _copy_run(run_dir, tmp_path)
    (run / "completions.jsonl").write_bytes(LATIN1)
    with pytest.raises(MelboError, match="completions.jsonl is not UTF-8"):
        Run.load(run).completions()


# ------------------------------------------------------------------------------------------------ context length
def test_prompt_longer_than_the_context_is_refused_up_front(lm, tmp_path):
    from melbo.engine.generation import Sampling, generate
    from melbo.engine.prompts import encode

    long = "a" * 600  # the tiny model's context is 512 tokens; one token per byte
    with pytest.raises(MelboError, match="600 tokens.*context of 512"):
        encode(lm, [PROMPT, long], chat=False)
    with pytest.raises(MelboError, match="600 tokens"):
        melbo.discover(lm, [long], tmp_path / "run", n_vectors=1, steps=1, chat=False)
    assert not (tmp_path / "run").exists()
    with pytest.raises(MelboError, match="500 tokens \\+ 48 to generate.*context of 512"):
        generate(lm, None, ["a" * 500], chat=False, sampling=Sampling(max_new_tokens=48))


def test_chat_turn_past_the_context_is_refused_and_not_kept(lm, run_dir):
    from melbo.engine.chat import ChatSession
    from melbo.engine.generation import Sampling
    from melbo.engine.store import Run

    session = ChatSession(lm, Run.load(run_dir, model=lm).perturbations, sampling=Sampling(max_new_tokens=2))
    with pytest.raises(MelboError, match="conversation has .* tokens.*context of 512"):
        session.say("a" * 600)
    assert session.history == []


def test_context_length_ignores_a_tokenizers_sentinel(lm):
    from types import SimpleNamespace

    from melbo.engine.prompts import context_length

    no_limit = SimpleNamespace(model=SimpleNamespace(config=SimpleNamespace()),
                               tokenizer=SimpleNamespace(model_max_length=int(1e30)))
    assert context_length(lm) == 512 and context_length(no_limit) is None


# ------------------------------------------------------------------------------------------------ numbers
@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "RUN", "-p", "Hi", "--expr", "1e400*v0"], "too large"),
        (["generate", "RUN", "-p", "Hi", "--expr", "+".join(["v0"] * 5000)], "too long"),
        (["generate", "RUN", "-p", "Hi", "--expr", "-" * 3000 + "v0"], "too long"),
        (["generate", "RUN", "-p", "Hi", "--scale", "nan"], "scale must be a finite number"),
        (["generate", "RUN", "-p", "Hi", "--scale", "1e30"], "between -100 and 100"),
        (["generate", "RUN", "-p", "Hi", "--scale", "-101"], "the model writes nothing or noise"),
        (["generate", "RUN", "-p", "Hi", "--temperature", "inf"], "temperature must be a finite number"),
        (["generate", "RUN", "-p", "Hi", "--temperature", "nan"], "temperature must be a finite number"),
        (["chat", "RUN", "--scale", "inf", "--turns", "TURNS"], "scale must be a finite number"),
        (["chat", "RUN", "--scale", "1e30", "--turns", "TURNS"], "between -100 and 100"),
        (["chat", "RUN", "--scale", "-101", "--turns", "TURNS"], "the model writes nothing or noise"),
        (["discover", PROMPT, "--lr", "inf"], "lr must be a finite number"),
        (["discover", PROMPT, "--p", "inf"], "p must be a finite number"),
        (["discover", PROMPT, "--q", "nan"], "q must be"),
        (["discover", PROMPT, "--soft-weight", "nan"], "soft-weight must be a finite number"),
        (["discover", PROMPT, "--radius", "inf"], "radius must be > 0"),
        (["discover", PROMPT, "--positions", "[[0.5]]"], "not a whole number"),
        (["discover", PROMPT, "--positions", '[["a"]]'], "not a whole number"),
        (["discover", PROMPT, "--positions", "[[true]]"], "not a whole number"),
        (["discover", PROMPT, "--positions", "[1, 2]"], "not a list"),
        (["discover", PROMPT, "--device", "potato"], "unknown device 'potato'"),
        (["generate", "RUN", "-p", "Hi", "--device", "potato"], "unknown device 'potato'"),
    ],
)
def test_bad_values_are_one_line(args, message, run_dir, model_dir, tmp_path, capsys):
    turns = tmp_path / "turns.txt"
    turns.write_text("Hi\n")
    args = [{"RUN": str(run_dir), "TURNS": str(turns)}.get(a, a) for a in args]
    if args[0] == "discover":
        args += ["--model", str(model_dir), "--out", str(tmp_path / "new"), "-n", "1", "--steps", "1"]
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    code, _, stderr = run_cli(args, capsys)
    one_line(code, stderr, message)
    assert not (tmp_path / "new").exists()
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before


def test_chat_scale_command_refuses_non_finite(lm, run_dir):
    from melbo.engine.chat import ChatSession
    from melbo.engine.store import Run

    run = Run.load(run_dir, model=lm)
    with pytest.raises(MelboError, match="scale must be a finite number"):
        ChatSession(lm, run.perturbations, 0, scale=math.inf)
    session = ChatSession(lm, run.perturbations, 0)
    with pytest.raises(MelboError, match="scale must be a finite number"):
        session.command("/scale nan")
    with pytest.raises(MelboError, match="too large"):
        session.command("/scale 1e30")
    assert session.scale == 1.0


# ------------------------------------------------------------------------------------------------ models
@pytest.mark.parametrize(
    "spec, kwargs, message",
    [
        (None, {}, "model spec must be text"),
        (123, {}, "model spec must be text"),
        ("smollm2-135m", {"device": "potato"}, "unknown device"),
        ("smollm2-135m", {"device": None}, "unknown device"),
        ("smollm2-135m", {"dtype": ["float32"]}, "unknown dtype"),
        ("/dev/null", {}, "neither a model directory nor a .gguf file"),
    ],
)
def test_load_model_refuses_bad_arguments(spec, kwargs, message):
    with pytest.raises(MelboError, match=message):
        melbo.load_model(spec, **kwargs)


def test_truncated_safetensors_is_one_line(model_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    weights = broken / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    with pytest.raises(MelboError, match="cannot load weights.*re-download"):
        melbo.load_model(str(broken))
    code, _, stderr = run_cli(["discover", PROMPT, "--model", str(broken), "--out", str(tmp_path / "run")], capsys)
    one_line(code, stderr, "cannot load weights")


def test_random_bytes_gguf_is_not_memoised(tmp_path, monkeypatch):
    monkeypatch.setenv("MELBO_CACHE", str(tmp_path / "cache"))
    fake = tmp_path / "model.gguf"
    fake.write_bytes(os.urandom(4096))
    with pytest.raises(MelboError, match="not a GGUF file"):
        melbo.load_model(str(fake))
    memo = tmp_path / "cache" / "hashes.json"
    assert not memo.exists() or str(fake.resolve()) not in memo.read_text()


# ------------------------------------------------------------------------------------------------ resume
@pytest.mark.parametrize("config", [[], {}, {"model": {"id": "x", "spec": "x"}}, {"settings": {}}, "text"])
def test_resume_of_a_config_that_is_not_a_run(config, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    code, _, stderr = run_cli(["discover", "--resume", str(tmp_path / "run")], capsys)
    one_line(code, stderr, "is not a melbo run config")


@pytest.mark.parametrize(
    "extra, flags",
    [
        (["-n", "3"], "--n-vectors"),
        (["--steps", "5"], "--steps"),
        (["--radius", "2x"], "--radius"),
        (["A new prompt"], "prompts"),
        (["--steps", "5", "-n", "16"], "--n-vectors, --steps"),
    ],
)
def test_resume_refuses_settings_it_cannot_change(extra, flags, run_dir, capsys):
    before = (run_dir / "config.json").read_bytes()
    code, _, stderr = run_cli(["discover", "--resume", str(run_dir), *extra], capsys)
    one_line(code, stderr, flags, "cannot change on --resume")
    assert (run_dir / "config.json").read_bytes() == before


def test_complete_run_without_its_vectors_gives_advice_that_does_not_loop(run_dir, tmp_path, capsys):
    run = _copy_run(run_dir, tmp_path)
    (run / "vectors.safetensors").unlink()
    for args in (["generate", str(run), "-p", "Hi"], ["discover", "--resume", str(run)]):
        code, _, stderr = run_cli(args, capsys)
        line = one_line(code, stderr, "vectors.safetensors is missing", "new --out")
        assert "--resume" not in line


def test_resuming_a_run_made_with_random_0_does_not_assess(model_dir, tmp_path, capsys):
    path = tmp_path / "run"
    code, _, stderr = run_cli(["discover", PROMPT, "--model", str(model_dir), "-n", "2", "--steps", "2",
                               "--max-new-tokens", "3", "--random", "0", "--out", str(path)], capsys)
    assert code == 0, stderr
    assert json.loads((path / "config.json").read_text())["random"] == 0
    assert not (path / "metrics.json").exists()
    code, _, stderr = run_cli(["discover", "--resume", str(path)], capsys)
    assert code == 0, stderr
    assert not (path / "metrics.json").exists()


# ------------------------------------------------------------------------------------------------ API types
@pytest.mark.parametrize(
    "prompts, settings, message",
    [
        ([None], {}, "prompt 0 is NoneType"),
        ("Hi", {}, "must be a list of strings"),
        ([PROMPT], {"n_vectors": 2.5}, "n-vectors must be a whole number"),
        ([PROMPT], {"steps": True}, "steps must be a whole number"),
        ([PROMPT], {"positions": [[1.5]]}, "not a whole number"),
        ([PROMPT], {"lr": math.nan}, "lr must be a finite number"),
        ([PROMPT], {"p": math.inf}, "p must be a finite number"),
        ([PROMPT], {"source": "1"}, "source must be a whole number"),
        ([PROMPT], {"n_vector": 2}, "unknown setting 'n_vector': did you mean 'n_vectors'"),
    ],
)
def test_discover_api_refuses_bad_types_before_creating_the_run(prompts, settings, message, lm, tmp_path):
    with pytest.raises(MelboError, match=message):
        melbo.discover(lm, prompts, tmp_path / "run", **{"steps": 1, "n_vectors": 1, **settings})
    assert not (tmp_path / "run").exists()


def test_elicit_api_names_an_unknown_setting(lm, tmp_path):
    with pytest.raises(MelboError, match="unknown setting 'radious': did you mean 'radius'"):
        melbo.elicit(lm, [PROMPT], tmp_path / "run", radious="0.2x")
    assert not (tmp_path / "run").exists()


def test_generate_api_refuses_a_bare_string(lm, run_dir):
    from melbo.engine.store import Run

    run = Run.load(run_dir, model=lm)
    with pytest.raises(MelboError, match="must be a list of strings"):
        melbo.generate(lm, run.perturbations, "Hi")
    with pytest.raises(MelboError, match="scale must be a finite number"):
        melbo.generate(lm, run.perturbations, ["Hi"], scale=math.nan)
    with pytest.raises(MelboError, match="between -100 and 100"):
        melbo.generate(lm, run.perturbations, ["Hi"], scale=1e30)  # it wrote empty replies, which read as a result


# ------------------------------------------------------------------------------------------------ defects
def test_export_llamacpp_accepts_a_jacobian_run(lm, tmp_path, capsys):
    path = tmp_path / "jacobian"
    melbo.discover(lm, [PROMPT], path, method="jacobian", n_vectors=2, power_iterations=2, radius="1.0")
    code, stdout, stderr = run_cli(["export", str(path), "--format", "llamacpp", "--out", str(tmp_path / "cv")],
                                   capsys)
    assert code == 0, stderr
    assert sorted(p.name for p in (tmp_path / "cv").iterdir()) == ["v0.gguf", "v1.gguf"]


def test_sampling_leaves_the_global_rng_alone_and_is_seeded(lm, run_dir):
    from melbo.engine.generation import Sampling
    from melbo.engine.store import Run

    run = Run.load(run_dir, model=lm)
    sampling = Sampling(max_new_tokens=6, temperature=1.0, samples=2, seed=3)
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    first = [c.text for c in melbo.generate(lm, run.perturbations, ["Hi"], sampling=sampling)]
    assert torch.equal(torch.get_rng_state(), state)
    second = [c.text for c in melbo.generate(lm, run.perturbations, ["Hi"], sampling=sampling)]
    assert first == second and len(set(first)) > 1


def test_run_and_catalogue_paths_of_the_wrong_type_are_one_line(tmp_path):
    from melbo.records.catalog import Catalog
    from melbo.engine.store import Run

    with pytest.raises(MelboError, match="a run directory must be a path, got 123"):
        Run.load(123)
    with Catalog(tmp_path / "catalog.sqlite") as catalog:
        with pytest.raises(MelboError, match="a run directory must be a path, got 123"):
            catalog.add_run(123)
        with pytest.raises(MelboError, match="a run directory must be a path, got None"):
            catalog.add_runs(None)


@pytest.mark.parametrize(
    "args, message",
    [
        (["discover", PROMPT, "--steps", "abc"], "Invalid value for '--steps'"),
        (["discover", PROMPT, "--steps", "1.5"], "Invalid value for '--steps'"),
        (["discover", PROMPT, "--bogus"], "No such option: --bogus"),
        (["export"], "Missing argument"),
        (["bench", "arithmetic", "--problems", "many"], "see 'melbo bench arithmetic --help'"),
        (["no-such-command"], "No such command"),
    ],
)
def test_usage_errors_are_one_line_too(args, message, capsys):
    """A wrong option or value is click's usage error: one line naming the fix and the help to read, exit 2."""
    code, stdout, stderr = run_cli(args, capsys)
    one_line(code, stderr, message)
    assert "╭" not in stderr + stdout and "Traceback" not in stderr


def test_help_and_no_arguments_still_show_the_help(capsys):
    code, stdout, _ = run_cli(["discover", "--help"], capsys)
    assert code == 0 and "Usage:" in stdout and "--steps" in stdout
    code, stdout, _ = run_cli([], capsys)
    assert code == 2 and "Usage:" in stdout and "discover" in stdout


def test_help_names_flags_without_a_value(capsys):
    """`--open` takes no value: the help must not print `--open <bool>` (issue 24), while valued options keep types."""
    code, stdout, _ = run_cli(["report", "--help"], capsys)
    assert code == 0 and "--open" in stdout and "<bool>" not in stdout
    code, stdout, _ = run_cli(["discover", "--help"], capsys)
    assert "<bool>" not in stdout and "--chat" in stdout and "<int>" in stdout


# ------------------------------------------------------------------------------------------------ issue 23: export
def _edit_config(run: Path, edit) -> None:
    config = json.loads((run / "config.json").read_text())
    edit(config)
    (run / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["model"].update(depth="abc"), "model.depth is 'abc', not a whole number"),
    (lambda c: c["model"].update(depth=math.inf), "model.depth is inf, not a whole number"),  # 1e400 reads as inf
    (lambda c: c["model"].pop("architecture"), "no model.architecture"),
    (lambda c: c["model"].update(architecture=None), "no model.architecture (got None)"),
])
def test_export_llamacpp_of_a_damaged_model_config_is_one_line(edit, message, run_dir, tmp_path, capsys):
    run = _copy_run(run_dir, tmp_path)
    _edit_config(run, edit)
    code, _, stderr = run_cli(["export", str(run), "-f", "llamacpp", "--out", str(tmp_path / "cv")], capsys)
    one_line(code, stderr, message)
    assert not (tmp_path / "cv").exists() or not list((tmp_path / "cv").iterdir())


@pytest.mark.parametrize("vectors, message", [
    (lambda v: v * math.nan, "NaN or infinite"),
    (lambda v: v * math.inf, "NaN or infinite"),
    (lambda v: v[:, :10], "not of the width"),
    (lambda v: v.to(torch.int32), "int32 numbers, not floats"),
])
def test_a_runs_damaged_vectors_are_refused_where_they_are_loaded(vectors, message, run_dir, tmp_path, capsys):
    from melbo.engine.intervention import SteeringVectors

    run = _copy_run(run_dir, tmp_path)
    stored = SteeringVectors.load(run / SteeringVectors.FILE)
    SteeringVectors(vectors(stored.vectors).contiguous(), stored.layer).save(run / SteeringVectors.FILE)
    code, _, stderr = run_cli(["export", str(run), "-f", "llamacpp", "--out", str(tmp_path / "cv")], capsys)
    one_line(code, stderr, message, "re-run the discovery")
    assert not (tmp_path / "cv").exists()
    with pytest.raises(MelboError, match=message):
        melbo.Run.load(run)


def test_export_of_a_run_without_vectors_says_so(run_dir, tmp_path, capsys):
    from melbo.engine.intervention import SteeringVectors

    run = _copy_run(run_dir, tmp_path)
    stored = SteeringVectors.load(run / SteeringVectors.FILE)
    SteeringVectors(stored.vectors[:0].contiguous(), stored.layer).save(run / SteeringVectors.FILE)
    code, _, stderr = run_cli(["export", str(run), "-f", "llamacpp", "--out", str(tmp_path / "cv")], capsys)
    one_line(code, stderr, "no perturbations", "nothing to export")


def test_export_llamacpp_refuses_another_model(run_dir, tmp_path, capsys):
    code, _, stderr = run_cli(["export", str(run_dir), "-f", "llamacpp", "-m", "gpt2", "--out", str(tmp_path / "cv")],
                              capsys)
    one_line(code, stderr, "not gpt2", "leave out --model")
    config = json.loads((run_dir / "config.json").read_text())
    code, _, stderr = run_cli(["export", str(run_dir), "-f", "llamacpp", "-m", config["model"]["spec"],
                               "--out", str(tmp_path / "cv")], capsys)
    assert code == 0, stderr


def test_export_llamacpp_on_a_full_disk_writes_all_or_nothing(run_dir, tmp_path, monkeypatch, capsys):
    import gguf

    real, calls = gguf.GGUFWriter.write_tensors_to_file, []

    def full_on_the_second(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            _disk_full()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full_on_the_second)
    out = tmp_path / "cv"
    code, _, stderr = run_cli(["export", str(run_dir), "-f", "llamacpp", "--out", str(out)], capsys)
    one_line(code, stderr, "free space on")
    assert list(out.iterdir()) == []


# ------------------------------------------------------------------------------------------------ issue 23: report
@pytest.mark.parametrize("metrics, message", [
    ({"learned": 5}, "metrics.json is malformed (learned is int, not an object)"),
    ({"learned": {"perturbations": 5}}, "(learned.perturbations is int, not a list)"),
    ({"learned": {"perturbations": []}, "clusters": "x"}, "(clusters is str, not a list)"),
    ({"clusters": []}, "(learned is missing)"),
    ({"learned": {"perturbations": [{"label": "v0", "vector": "abc"}]}},
     "(learned.perturbations[0].vector is 'abc', not a whole number)"),
    ({"learned": {"perturbations": [5]}}, "(learned.perturbations[0] is int, not an object)"),
    ({"learned": {"perturbations": [], "diversity": 1e400}}, "(learned.diversity is inf, not a finite number)"),
])
def test_report_of_a_malformed_metrics_file_is_one_line(metrics, message, run_dir, tmp_path, capsys):
    run = _copy_run(run_dir, tmp_path)
    (run / "metrics.json").write_text(json.dumps(metrics))
    code, _, stderr = run_cli(["report", str(run)], capsys)
    one_line(code, stderr, message)
    assert not (run / "report.html").exists()


# ------------------------------------------------------------------------------------------------ issue 23: strict JSON
def _strict(path: Path):
    def refuse(constant):
        raise AssertionError(f"{path} holds {constant}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_write_json_and_jsonl_write_strict_json(tmp_path):
    from melbo.bench.common import write_jsonl
    from melbo.io.files import write_json

    write_json(tmp_path / "a.json", {"threshold": math.nan, "top": [math.inf, -math.inf, 1.5], "n": 3})
    assert _strict(tmp_path / "a.json") == {"threshold": None, "top": [None, None, 1.5], "n": 3}
    write_jsonl(tmp_path / "b.jsonl", [{"score": math.nan}])
    assert json.loads((tmp_path / "b.jsonl").read_text(), parse_constant=lambda c: 1 / 0) == {"score": None}


def test_monitor_writes_a_nan_threshold_as_null(tmp_path):
    from melbo.judging.monitor import write_monitor

    class Broken:  # a monitor whose clean scores overflowed
        def summary(self):
            return {"signal": "target", "alpha": 0.05, "threshold": math.nan}

    write_monitor(tmp_path / "m", Broken(), [{"index": 0, "score": math.nan, "flagged": False}])
    assert _strict(tmp_path / "m" / "monitor.json")["threshold"] is None
    assert json.loads((tmp_path / "m" / "monitor.jsonl").read_text(), parse_constant=lambda c: 1 / 0)["score"] is None


def test_monitor_checks_both_outputs_before_writing_either(run_dir, tmp_path, capsys):
    out = tmp_path / "mon"
    out.mkdir()
    (tmp_path / "precious").write_text("keep me\n")
    (out / "monitor.jsonl").symlink_to(tmp_path / "precious")
    prompts = tmp_path / "inputs.txt"
    prompts.write_text("Hello\nHi there\n")
    code, _, stderr = run_cli(["monitor", str(run_dir), "--prompts-file", str(prompts), "--out", str(out)], capsys)
    one_line(code, stderr, "monitor.jsonl", "not a regular file")
    assert sorted(p.name for p in out.iterdir()) == ["monitor.jsonl"]
    assert (tmp_path / "precious").read_text() == "keep me\n"


@pytest.mark.parametrize("flags, message", [
    (["--fluency-floor", "nan"], "fluency-floor must be a finite number"),
    (["--fluency-floor", "inf"], "fluency-floor must be a finite number"),
    (["--fluency-floor", "-1"], "fluency-floor must be > 0"),
    (["--fluency-factor", "inf"], "fluency-factor must be a finite number"),
])
def test_sweep_refuses_a_fluency_bound_that_is_not_a_finite_positive_number(flags, message, model_dir, tmp_path,
                                                                            capsys):
    out = tmp_path / "sweep"
    code, _, stderr = run_cli(["sweep", PROMPT, "--radii", "1x", "-n", "1", "--steps", "1", "--out", str(out),
                               "--model", str(model_dir), *flags], capsys)
    one_line(code, stderr, message)
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ issue 23: diff
@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-other") / "base", seed=1)


def test_diff_of_a_model_against_itself_is_refused(model_dir, tmp_path, capsys):
    out = tmp_path / "d"
    code, _, stderr = run_cli(["diff", PROMPT, "-m", str(model_dir), "-r", str(model_dir), "-n", "1", "--steps", "1",
                               "--out", str(out)], capsys)
    one_line(code, stderr, "the same model", "every KL would be 0", "--reference")
    assert not out.exists()


def test_an_interrupted_diff_names_diff_resume_with_its_reference(model_dir, other_model_dir, tmp_path, monkeypatch,
                                                                   capsys):
    from melbo.jobs import job

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(job, "diff", interrupted)
    out = tmp_path / "d"
    code, _, stderr = run_cli(["diff", PROMPT, "-m", str(model_dir), "-r", str(other_model_dir), "--out", str(out)],
                              capsys)
    assert code == 130 and f"melbo diff --resume {out} -r {other_model_dir}" in " ".join(stderr.split())
    assert "discover" not in stderr


def test_diff_resume_keeps_the_recorded_random_count(lm, model_dir, other_model_dir, tmp_path, capsys):
    from melbo.jobs import job

    ref = melbo.load_model(str(other_model_dir))

    def interrupt(event):
        if event.get("batch") == 1:
            raise KeyboardInterrupt

    out = tmp_path / "d"
    with pytest.raises(KeyboardInterrupt):
        job.diff(lm, ref, [PROMPT], out, random=0, n_vectors=2, batch_size=1, steps=1, max_new_tokens=2,
                 progress=interrupt)
    assert json.loads((out / "config.json").read_text())["random"] == 0
    code, _, stderr = run_cli(["diff", "--resume", str(out), "-m", str(model_dir), "-r", str(other_model_dir)], capsys)
    assert code == 0, stderr
    labels = {r["label"] for r in json.loads((out / "divergence.json").read_text())["rows"]}
    assert labels == {"v0", "v1"}


# ------------------------------------------------------------------------------------------------ issue 23: bench
@pytest.mark.parametrize("command", ["monitor", "triggers"])
def test_bench_per_set_0_names_per_set(command, run_dir, tmp_path, capsys):
    out = tmp_path / "b"
    code, _, stderr = run_cli(["bench", command, str(run_dir), "--per-set", "0", "--out", str(out)], capsys)
    one_line(code, stderr, "per-set must be a whole number ≥ 1")
    assert not out.exists()


def test_bench_diff_refuses_an_unknown_contrast_before_anything(model_dir, tmp_path, capsys):
    out = tmp_path / "b"
    code, _, stderr = run_cli(["bench", "diff", "--model", str(model_dir), "--contrast", "difference", "--contrast",
                               "bogus", "--out", str(out)], capsys)
    one_line(code, stderr, "unknown contrast 'bogus'")
    assert not out.exists()


def test_bench_diff_checks_every_arm_before_training_the_first(lm, other_model_dir, tmp_path):
    from melbo.bench.common import get_bench
    from melbo.bench.settings import DiffSettings

    settings = DiffSettings.quick(prompts=[PROMPT], behaviours={"pirate": "arr"}, reference=melbo.load_model(
        str(other_model_dir)), arms={"discover": {}, "diff": {"contrast": "bogus"}}, report=False)
    with pytest.raises(MelboError, match="unknown contrast 'bogus'"):
        get_bench("diff").run(lm, tmp_path / "b", settings)
    assert not (tmp_path / "b").exists()


def test_a_name_longer_than_the_filesystem_allows_is_one_line(tmp_path, capsys):
    from conftest import run_cli

    code, _, err = run_cli(["export", str(tmp_path), "--format", "llamacpp", "--out", str(tmp_path / ("x" * 300))],
                           capsys)
    assert code == 2 and "longer than 255 bytes" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------------ issue 23: counts
@pytest.mark.parametrize("args", [
    ["discover", PROMPT, "-n", "1", "--steps", "1000000000000"],  # fits int64: an allocation no machine makes
    ["map", PROMPT, "--layers", "1:2", "-k", "1", "--iterations", "99999999999999999999"],  # past int64
    ["bench", "refusal", "--quick", "--requests", "2", "--steps", "99999999999999999999"],
    ["bench", "refusal", "--quick", "--requests", "2", "-n", "1", "--steps", "1", "--random", "99999999999999999999"],
    ["bench", "arithmetic", "--quick", "--seeds", "99999999999999999999"],
])
def test_counts_past_any_real_job_are_one_line(args, model_dir, tmp_path, capsys):
    """The fuzz of bench and map found these as TypeErrors from torch (a shape past int64)."""
    code, _, stderr = run_cli([*args, "-m", str(model_dir), "--out", str(tmp_path / "out")], capsys)
    errors = [line for line in stderr.splitlines() if line.startswith("melbo: error")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in stderr, stderr[-2000:]
    assert "is too large: give at most 1,000,000" in errors[0], errors[0]
