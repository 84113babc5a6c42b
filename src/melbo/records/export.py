"""Exports of discovered perturbations to formats other tools load directly.

- Steering vectors → llama.cpp control vectors (`--control-vector FILE`): one GGUF per vector, with
  general.architecture = "controlvector", `controlvector.model_hint` (the model's architecture) and
  `controlvector.layer_count`, and one F32 1-D tensor `direction.{k}`. llama.cpp adds `direction.k` to the output
  of 0-based block k, exactly where melbo adds a vector trained at source block k, so the tensor is named after
  the vector's layer. llama.cpp rejects `direction.0`, so vectors of block 0 cannot be exported.
- Steering adapters → PEFT LoRA directories (`PeftModel.from_pretrained(base, dir)`). melbo's W' = W + R·Ω_B Ω_Aᵀ
  on block s's MLP output projection is PEFT's lora_B(lora_A(x)) · lora_alpha / r with lora_alpha = r,
  lora_A.weight = Ω_Aᵀ [r, h] and lora_B.weight = R·Ω_B [d, r].
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Sequence

import torch

from melbo.errors import MelboError
from melbo.engine.intervention import SteeringAdapters, SteeringVectors
from melbo.engine.layers import find_mlp_out
from melbo.engine.models import LoadedModel
from melbo.io.files import make_output_dir, replacing_all, write_tensors


def _select(n: int, indices: Sequence[int] | None) -> list[int]:
    if n == 0:
        raise MelboError("the run holds no perturbations, so there is nothing to export: "
                         "re-run the discovery with -n 1 or more")
    if indices is None:
        return list(range(n))
    chosen = list(dict.fromkeys(int(i) for i in indices))
    if not chosen:
        raise MelboError("no vectors selected: give indices such as --vectors 2,5, or leave --vectors out for all")
    for i in chosen:
        if not 0 <= i < n:
            raise MelboError(f"vector index {i} is out of range: this run has 0..{n - 1}")
    return chosen


# ------------------------------------------------------------------------------------------------ llama.cpp
def export_llamacpp(
    vectors: SteeringVectors,
    out_dir: Path,
    model_hint: str,
    layer_count: int,
    indices: list[int] | None = None,
) -> list[Path]:
    """Write one llama.cpp control-vector GGUF per selected vector (`out_dir/v{index}.gguf`); return the paths."""
    layer = int(vectors.layer)
    if layer < 1:
        raise MelboError(
            f"llama.cpp cannot apply a control vector to block {layer} (it requires block ≥ 1): "
            "re-run discovery with --source 1 or later"
        )
    if layer >= layer_count:
        raise MelboError(f"vectors of block {layer} do not fit a model with {layer_count} blocks: "
                         "give the run's own model depth")
    chosen = _select(len(vectors), indices)
    out_dir = Path(out_dir)
    make_output_dir(out_dir)
    paths = [out_dir / f"v{i}.gguf" for i in chosen]
    with replacing_all(paths) as tmps:  # a full disk at v1 leaves no v0 behind
        for i, tmp in zip(chosen, tmps):
            _write_control_vector(tmp, vectors.vectors[i], layer, model_hint, layer_count)
    return paths


def _write_control_vector(path: Path, vector: torch.Tensor, layer: int, model_hint: str, layer_count: int) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), "controlvector")  # also writes general.architecture
    try:
        writer.add_string("controlvector.model_hint", str(model_hint))
        writer.add_uint32("controlvector.layer_count", int(layer_count))
        writer.add_tensor(f"direction.{layer}", vector.detach().to("cpu", torch.float32).numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()  # the file is closed before a failure removes it


# ------------------------------------------------------------------------------------------------ PEFT
_PEFT_LAYER_INDEX = re.compile(r".*\.[^.]*\.(\d+)\.")  # how PEFT finds a module's layer index (no layers_pattern)


def _peft_target(lm: LoadedModel, layer: int, mlp_path: str) -> str:
    """The shortest target_modules entry that selects exactly block `layer`'s MLP output projection in PEFT.

    Usually the leaf name ("down_proj"); gpt2 needs "mlp.c_proj" because its attention projection is c_proj too.
    """
    full = f"{lm.blocks_path}.{layer}.{mlp_path}"
    names = [name for name, _ in lm.model.named_modules()]
    parts = mlp_path.split(".")
    for target in [".".join(parts[k:]) for k in range(len(parts) - 1, -1, -1)] + [full]:
        hits = []
        for name in names:
            if name == target or name.endswith("." + target):
                found = _PEFT_LAYER_INDEX.match(name)
                if found is not None and int(found.group(1)) == layer:
                    hits.append(name)
        if hits == [full]:
            return target
    raise MelboError(f"cannot name {full} unambiguously for PEFT in this model: use steering vectors instead")


def _lora_config_bytes(base_model: str, rank: int, target: str, layer: int, fan_in_fan_out: bool) -> bytes:
    """adapter_config.json as peft itself writes it, so every field a peft release expects is present."""
    from peft import LoraConfig

    config = LoraConfig(
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model,
        r=rank,
        lora_alpha=rank,  # scaling lora_alpha / r = 1: the radius lives in lora_B
        lora_dropout=0.0,
        bias="none",
        target_modules=[target],
        layers_to_transform=[layer],
        fan_in_fan_out=fan_in_fan_out,
        inference_mode=True,
    )
    # save_pretrained writes in place; it writes into scratch space here so that the caller's atomic
    # replacement (no half export on a full disk) still holds.
    with tempfile.TemporaryDirectory(prefix="melbo-peft-") as scratch:
        config.save_pretrained(scratch)
        return (Path(scratch) / "adapter_config.json").read_bytes()


def export_peft(
    adapters: SteeringAdapters,
    lm: LoadedModel,
    out_dir: Path,
    indices: list[int] | None = None,
) -> list[Path]:
    """Write one PEFT LoRA directory per selected adapter (`out_dir/v{index}/`); return the directories."""
    adapters.check(lm)
    layer = lm.layer(int(adapters.layer), "source layer")
    mlp_path, module = find_mlp_out(lm.blocks[layer])
    conv1d = type(module).__name__ == "Conv1D"  # gpt2-style weight stored [in, out]
    if not (conv1d or isinstance(module, torch.nn.Linear)):
        raise MelboError(f"PEFT LoRA cannot wrap a {type(module).__name__} MLP output: use steering vectors instead")
    chosen = _select(len(adapters), indices)
    rank = int(adapters.a.shape[-1])
    prefix = f"base_model.model.{lm.blocks_path}.{layer}.{mlp_path}"
    config = _lora_config_bytes(
        base_model=getattr(lm.model.config, "_name_or_path", "") or lm.spec,
        rank=rank,
        target=_peft_target(lm, layer, mlp_path),
        layer=layer,
        fan_in_fan_out=conv1d,
    )
    out_dir = Path(out_dir)
    make_output_dir(out_dir)
    directories = [out_dir / f"v{i}" for i in chosen]
    files = [d / name for d in directories for name in ("adapter_model.safetensors", "adapter_config.json")]
    with replacing_all(files) as tmps:  # a full disk at v1 leaves no v0 behind
        for k, i in enumerate(chosen):
            tensors = {
                f"{prefix}.lora_A.weight": adapters.a[i].detach().to("cpu", torch.float32).T.contiguous(),
                f"{prefix}.lora_B.weight": (adapters.b[i].detach().to("cpu", torch.float32)
                                            * adapters.radius).contiguous(),
            }
            write_tensors(tmps[2 * k], tensors, {"format": "pt"})
            tmps[2 * k + 1].write_bytes(config)
    return directories
