"""Exports: llama.cpp control-vector GGUFs read back exactly; PEFT LoRA directories reproduce melbo's adapters."""

import json

import numpy as np
import pytest
import torch
from conftest import run_cli, tiny_lm
from tiny_models import INTERMEDIATE_SIZE, save_tiny_model, tiny_model

from melbo.errors import MelboError
from melbo.records.export import export_llamacpp, export_peft
from melbo.engine.intervention import SteeringAdapters, SteeringVectors
from melbo.io.runconfig import RunConfig
from melbo.engine.store import Run

IDS = torch.tensor([[5, 17, 33, 9, 80, 41], [7, 99, 23, 12, 60, 3]])


def _field(reader, key):
    f = reader.fields[key]
    value = f.parts[f.data[0]]
    return bytes(value).decode() if f.types[0].name == "STRING" else value.tolist()


def test_llamacpp_gguf_holds_each_vector_exactly(tmp_path):
    import gguf

    vectors = SteeringVectors(torch.randn(4, 64, generator=torch.Generator().manual_seed(0)), layer=2)
    paths = export_llamacpp(vectors, tmp_path / "out", "llama", 4, indices=[1, 3])
    assert [p.name for p in paths] == ["v1.gguf", "v3.gguf"]
    for i, path in zip([1, 3], paths):
        reader = gguf.GGUFReader(path)
        assert _field(reader, "general.architecture") == "controlvector"
        assert _field(reader, "controlvector.model_hint") == "llama"
        assert _field(reader, "controlvector.layer_count") == [4]
        assert reader.fields["controlvector.layer_count"].types == [gguf.GGUFValueType.UINT32]
        (tensor,) = reader.tensors
        assert tensor.name == "direction.2" and tensor.tensor_type == gguf.GGMLQuantizationType.F32
        assert list(tensor.shape) == [64]
        np.testing.assert_array_equal(np.asarray(tensor.data), vectors.vectors[i].numpy())


def test_llamacpp_refuses_block_zero_and_bad_indices(tmp_path):
    with pytest.raises(MelboError, match="--source 1"):
        export_llamacpp(SteeringVectors(torch.randn(2, 64), layer=0), tmp_path, "llama", 4)
    with pytest.raises(MelboError, match="out of range"):
        export_llamacpp(SteeringVectors(torch.randn(2, 64), layer=1), tmp_path, "llama", 4, indices=[2])
    assert not list(tmp_path.iterdir())


def _random_adapters(lm, n=3, rank=3, layer=1, radius=2.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, INTERMEDIATE_SIZE, rank, generator=g)
    b = torch.randn(n, lm.width, rank, generator=g)
    return SteeringAdapters(a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True), radius, layer)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_peft_adapter_reproduces_melbo_logits(tmp_path, arch):
    from peft import PeftModel

    lm = tiny_lm(arch)
    adapters = _random_adapters(lm)
    dirs = export_peft(adapters, lm, tmp_path, indices=[0, 2])
    assert [d.name for d in dirs] == ["v0", "v2"]
    with torch.no_grad():
        plain = lm.model(IDS).logits
        for i, directory in zip([0, 2], dirs):
            with adapters.select([i]).apply(lm, rows=[0] * len(IDS)):
                ours = lm.model(IDS).logits
            peft_model = PeftModel.from_pretrained(tiny_model(arch), str(directory)).eval()
            theirs = peft_model(input_ids=IDS).logits
            torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
            assert (ours - plain).abs().max() > 1e-3  # the adapter does something
            wrapped = [n for n, m in peft_model.named_modules() if hasattr(m, "lora_A")]
            assert len(wrapped) == 1 and ".1." in wrapped[0]  # exactly block 1's MLP output projection
    config = json.loads((dirs[0] / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 3 and config["layers_to_transform"] == [1]
    assert config["fan_in_fan_out"] is (arch == "gpt2")
    from peft import LoraConfig  # written by peft itself: its own reader takes it back unchanged
    assert LoraConfig.from_pretrained(str(dirs[0])).target_modules == set(config["target_modules"])


def _hand_run(path, perturbations, method, lm):
    config = RunConfig.from_dict({"model": lm.describe(), "source": perturbations.layer, "target": 3, "radius": 2.5,
                                  "radius_relative": 0.1, "settings": {"prompts": ["hi"], "method": method, "rank": 3}})
    run = Run(path, config)
    path.mkdir(parents=True)
    run.save_result(perturbations, torch.zeros(len(perturbations), 2))
    return path


def test_cli_export_both_formats_and_wrong_format_errors(tmp_path, capsys):
    import gguf

    import melbo

    lm = melbo.load_model(str(save_tiny_model(tmp_path / "model")))  # export --format peft loads it by its spec
    vectors = SteeringVectors(torch.randn(3, 64), layer=1)
    vec_run = _hand_run(tmp_path / "vec", vectors, "vectors", lm)
    ada_run = _hand_run(tmp_path / "ada", _random_adapters(lm), "adapters", lm)

    code, stdout, stderr = run_cli(["export", str(vec_run), "--format", "llamacpp", "--out", str(tmp_path / "g"),
                                    "--vectors", "0,2"], capsys)
    assert code == 0, stderr
    assert str(tmp_path / "g" / "v0.gguf") in stdout and str(tmp_path / "g" / "v2.gguf") in stdout
    assert not (tmp_path / "g" / "v1.gguf").exists()
    (tensor,) = gguf.GGUFReader(tmp_path / "g" / "v2.gguf").tensors
    np.testing.assert_array_equal(np.asarray(tensor.data), vectors.vectors[2].numpy())

    code, stdout, stderr = run_cli(["export", str(ada_run), "--format", "peft", "--out", str(tmp_path / "p")], capsys)
    assert code == 0, stderr
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["v0", "v1", "v2"]

    code, _, stderr = run_cli(["export", str(vec_run), "--format", "peft", "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "--format llamacpp" in stderr
    code, _, stderr = run_cli(["export", str(ada_run), "--format", "llamacpp", "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "--format peft" in stderr
    code, _, stderr = run_cli(["export", str(vec_run), "--format", "onnx", "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "unknown export format" in stderr
    assert not (tmp_path / "x").exists()
