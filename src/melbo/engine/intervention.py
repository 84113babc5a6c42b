"""Interventions: how a perturbation enters the model.

Two kinds, both applied through forward hooks that are always removed on exit:
- a steering vector θ added to the output of block s (the residual stream) at every position;
- a steering adapter: a rank-r LoRA on block s's MLP output projection, W' = W + R · Ω_B Ω_Aᵀ.

Every hook is *batched*: batch row b gets its own perturbation, so N perturbations run as one forward pass.
`SteeringVectors` / `SteeringAdapters` are the stored artefacts; `apply(lm, rows)` maps batch rows to them
(`None` = unsteered row). Each says what it supports (`supports_random_baseline`, `supports_arithmetic`,
`export_formats`), so that callers ask the artefact instead of switching on its class.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from melbo.errors import MelboError
from melbo.io.files import load_metadata, load_tensors, save_tensors
from melbo.engine.layers import find_mlp_out
from melbo.engine.models import LoadedModel


def _map_output(output, fn):
    """Apply fn to a block's hidden states whether the block returns a Tensor (transformers 5) or a tuple (4)."""
    if isinstance(output, tuple):
        return (fn(output[0]),) + output[1:]
    return fn(output)


@contextmanager
def forward_hook(module: nn.Module, hook) -> Iterator[None]:
    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def add_to_block_output(lm: LoadedModel, layer: int, delta: Tensor) -> Iterator[None]:
    """Add delta ([batch, d], or [d] for every row) to the output of block `layer` at every position."""
    per_row = delta if delta.dim() == 2 else delta[None]

    def hook(_module, _args, output):
        # .to(h.device): with a device map the block may sit on another GPU than the embeddings.
        return _map_output(output, lambda h: h + per_row[:, None, :].to(h.device, h.dtype))

    with forward_hook(lm.blocks[layer], hook):
        yield


@contextmanager
def add_lora(lm: LoadedModel, layer: int, a: Tensor, b: Tensor, radius: Tensor | float) -> Iterator[None]:
    """Perturb block `layer`'s MLP output projection by R·Ω_B Ω_Aᵀ, per batch row.

    a: [batch, h, r] (Ω_A), b: [batch, d, r] (Ω_B), radius: scalar or [batch].
    """
    _, module = find_mlp_out(lm.blocks[layer])
    r = torch.as_tensor(radius, dtype=a.dtype, device=a.device).reshape(-1, 1, 1)

    def hook(_module, args, output):
        x = args[0]  # [batch, T, h]
        rows = x.shape[0]
        # A single adapter (interactive use) applies to every row.
        a_, b_, r_ = (t.expand(rows, *t.shape[1:]).to(x.device) if t.shape[0] == 1 else t.to(x.device)
                      for t in (a, b, r))  # the block's device, which a device map may choose
        delta = torch.einsum("bth,bhr,bdr->btd", x.to(a.dtype), a_, b_) * r_
        return output + delta.to(output.dtype)

    with forward_hook(module, hook):
        yield


Rows = Sequence[Union[int, None]]


@dataclass(frozen=True)
class SteeringVectors:
    """N steering vectors for block `layer`'s output. vectors: [N, d]."""

    vectors: Tensor
    layer: int

    FILE: ClassVar[str] = "vectors.safetensors"  # its name in a run directory
    KIND: ClassVar[str] = "steering vectors"
    # A random direction of the same norm is a fair control for a learned one (the seed's baseline).
    supports_random_baseline: ClassVar[bool] = True
    # Sums and multiples of vectors mean something ("v9 - 0.5*v22"), as do cosines between them, and other
    # steering libraries (steering-vectors, repeng, TransformerLens hooks) take them as they are.
    supports_arithmetic: ClassVar[bool] = True
    export_formats: ClassVar[tuple[str, ...]] = ("safetensors", "gguf")  # gguf: a llama.cpp control vector

    def __len__(self) -> int:
        return int(self.vectors.shape[0])

    def save(self, path: str | Path, metadata: Optional[dict] = None) -> None:
        _save(path, {"vectors": self.vectors}, {**(metadata or {}), "layer": self.layer})

    @classmethod
    def load(cls, path: str | Path) -> "SteeringVectors":
        tensors, meta = _load(path, ("vectors",))
        return cls(tensors["vectors"], _layer(path, meta))

    def check(self, lm: LoadedModel) -> None:
        lm.layer(self.layer, "source layer")
        if self.vectors.shape[-1] != lm.width:
            raise MelboError(
                f"these vectors have width {self.vectors.shape[-1]} but {lm.model_id} has width {lm.width}: "
                "use vectors trained on this model"
            )

    def select(self, indices: Sequence[int]) -> "SteeringVectors":
        return SteeringVectors(self.vectors[list(indices)], self.layer)

    def rows(self, rows: Rows, scale: float = 1.0) -> Tensor:
        zero = torch.zeros_like(self.vectors[0])
        return torch.stack([zero if i is None else self.vectors[i] * scale for i in rows])

    @contextmanager
    def apply(self, lm: LoadedModel, rows: Rows, scale: float = 1.0) -> Iterator[None]:
        self.check(lm)
        delta = self.rows(rows, scale).to(lm.device, lm.dtype)
        with add_to_block_output(lm, self.layer, delta):
            yield


@dataclass(frozen=True)
class SteeringAdapters:
    """N rank-r steering adapters on block `layer`'s MLP output. a: [N, h, r], b: [N, d, r], radius R."""

    a: Tensor
    b: Tensor
    radius: float
    layer: int

    FILE: ClassVar[str] = "adapters.safetensors"  # its name in a run directory
    KIND: ClassVar[str] = "steering adapters"
    supports_random_baseline: ClassVar[bool] = False  # random vectors are no baseline for a learned weight change
    supports_arithmetic: ClassVar[bool] = False  # a sum of two LoRAs is not the LoRA of a sum
    export_formats: ClassVar[tuple[str, ...]] = ("safetensors", "peft")  # peft: a LoRA adapter directory

    def __len__(self) -> int:
        return int(self.a.shape[0])

    def save(self, path: str | Path, metadata: Optional[dict] = None) -> None:
        _save(path, {"a": self.a, "b": self.b}, {**(metadata or {}), "layer": self.layer, "radius": self.radius})

    @classmethod
    def load(cls, path: str | Path) -> "SteeringAdapters":
        tensors, meta = _load(path, ("a", "b"))
        if not isinstance(meta.get("radius"), (int, float)):
            raise MelboError(f"{path} records no radius: it was not written by melbo; re-run the discovery")
        return cls(tensors["a"], tensors["b"], float(meta["radius"]), _layer(path, meta))

    def check(self, lm: LoadedModel) -> None:
        lm.layer(self.layer, "source layer")
        if self.b.shape[1] != lm.width:
            raise MelboError(
                f"these adapters have width {self.b.shape[1]} but {lm.model_id} has width {lm.width}: "
                "use adapters trained on this model"
            )

    def select(self, indices: Sequence[int]) -> "SteeringAdapters":
        idx = list(indices)
        return SteeringAdapters(self.a[idx], self.b[idx], self.radius, self.layer)

    @contextmanager
    def apply(self, lm: LoadedModel, rows: Rows, scale: float = 1.0) -> Iterator[None]:
        self.check(lm)
        index = torch.tensor([0 if i is None else i for i in rows])
        radius = torch.tensor([0.0 if i is None else self.radius * scale for i in rows])
        a = self.a[index].to(lm.device, lm.dtype)
        b = self.b[index].to(lm.device, lm.dtype)
        with add_lora(lm, self.layer, a, b, radius.to(lm.device, lm.dtype)):
            yield


Perturbations = Union[SteeringVectors, SteeringAdapters]


# ---- the artefacts' file format: safetensors, with what rebuilding them needs as JSON under the key "melbo"
def _save(path: str | Path, tensors: dict[str, Tensor], metadata: dict) -> None:
    save_tensors(Path(path), tensors, {"melbo": json.dumps(metadata)})


def _load(path: str | Path, names: tuple[str, ...]) -> tuple[dict[str, Tensor], dict]:
    path = Path(path)
    tensors = load_tensors(path)
    try:
        meta = json.loads(load_metadata(path).get("melbo", "{}"))
    except json.JSONDecodeError as exc:
        raise MelboError(f"{path} has corrupt metadata ({exc.msg}): re-run the discovery") from exc
    missing = [n for n in names if n not in tensors]
    if missing or not isinstance(meta, dict):
        raise MelboError(f"{path} is not a melbo artefact (no {', '.join(missing) or 'metadata'}): "
                         "give the file a discovery wrote")
    return tensors, meta


def _layer(path: str | Path, meta: dict) -> int:
    layer = meta.get("layer", meta.get("source"))  # runs before the artefacts owned their format said "source"
    if not isinstance(layer, int):
        raise MelboError(f"{path} records no layer: it was not written by melbo; re-run the discovery")
    return layer
