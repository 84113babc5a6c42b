"""melbo vectors applied by the real steering-vectors package give melbo's own logits."""

from __future__ import annotations

import pytest
import torch

import melbo
from melbo.errors import MelboError
from melbo.records.interop import to_repeng, to_steering_vector, transformer_lens_hooks


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_steering_vectors_package_reproduces_melbo_logits(arch, tmp_path):
    pytest.importorskip("steering_vectors")
    from tiny_models import save_tiny_model

    lm = melbo.load_model(str(save_tiny_model(tmp_path / "m", arch)))
    run = melbo.discover(lm, ["abc"], tmp_path / "run", n_vectors=2, steps=3, radius="2.0", source=1, target=3)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with run.steer(1, scale=0.5):
        expected = lm.model(input_ids=ids).logits
    with torch.no_grad():
        plain = lm.model(input_ids=ids).logits
    vector = to_steering_vector(run, 1, scale=0.5)
    with vector.apply(lm.model):
        got = lm.model(input_ids=ids).logits
    assert not torch.allclose(plain, expected, atol=1e-4)  # the vector does change the model
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_transformer_lens_hook_names_and_sum(tmp_path):
    from tiny_models import save_tiny_model

    lm = melbo.load_model(str(save_tiny_model(tmp_path / "m", "llama")))
    run = melbo.discover(lm, ["abc"], tmp_path / "run", n_vectors=2, steps=2, radius="2.0", source=1, target=3)
    ((name, hook),) = transformer_lens_hooks(run, [0, 1], scale=2.0)
    assert name == "blocks.1.hook_resid_post"
    x = torch.zeros(1, 3, lm.width)
    expected = 2.0 * (run.perturbations.vectors[0] + run.perturbations.vectors[1])
    torch.testing.assert_close(hook(x)[0, 2], expected)
    with pytest.raises(MelboError, match="out of range"):
        to_steering_vector(run, 5)


def test_repeng_control_model_reproduces_melbo_logits_and_reads_the_gguf(tmp_path):
    pytest.importorskip("steering_vectors")  # the interop extras are installed together (Makefile INTEROP)
    from tiny_models import save_tiny_model

    lm = melbo.load_model(str(save_tiny_model(tmp_path / "m", "llama")))
    run = melbo.discover(lm, ["abc"], tmp_path / "run", n_vectors=2, steps=3, radius="2.0", source=1, target=3)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with run.steer(0, scale=1.5):
        expected = lm.model(input_ids=ids).logits
    vector = to_repeng(run, 0, scale=1.5)
    from repeng import ControlModel, ControlVector

    controlled = ControlModel(lm.model, [1])
    controlled.set_control(vector)
    with torch.no_grad():
        got = controlled(input_ids=ids).logits
    controlled.unwrap()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    from melbo.records.export import export_llamacpp

    (path,) = export_llamacpp(run.perturbations, tmp_path / "gguf", "llama", len(lm.blocks), indices=[0])
    read = ControlVector.import_gguf(str(path))  # repeng's own GGUF reader on melbo's file
    assert read.model_type == "llama" and list(read.directions) == [1]  # block 1, as llama.cpp numbers it
    torch.testing.assert_close(torch.from_numpy(read.directions[1].copy()), run.perturbations.vectors[0])
    controlled = ControlModel(lm.model, [1])
    controlled.set_control(read, coeff=1.5)  # the file itself, applied by repeng, gives melbo's logits
    with torch.no_grad():
        again = controlled(input_ids=ids).logits
    controlled.unwrap()
    torch.testing.assert_close(again, expected, atol=1e-5, rtol=1e-5)


def test_an_nnsight_intervention_with_a_melbo_vector_gives_melbo_logits(tmp_path):
    from nnsight import LanguageModel

    from tiny_models import byte_tokenizer, tiny_model

    model, tokenizer = tiny_model("llama"), byte_tokenizer()
    wrapped = LanguageModel(model, tokenizer=tokenizer)
    lm = melbo.load_model(wrapped)  # melbo trains on the model nnsight wraps
    run = melbo.discover(lm, ["abc"], tmp_path / "run", n_vectors=2, steps=3, radius="2.0", source=1, target=3)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with run.steer(1):
        expected = lm.model(input_ids=ids).logits
    theta = run.perturbations.vectors[1]
    with wrapped.trace(ids):  # the same intervention in nnsight's own terms: add θ to block 1's output
        wrapped.model.layers[1].output[:] += theta
        logits = wrapped.output.logits.save()
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
