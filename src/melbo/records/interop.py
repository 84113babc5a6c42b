"""melbo's steering vectors in the formats other interpretability tools apply.

A melbo vector θ of a run is added to the output of block s (the residual stream after the block) at every
position. The same intervention, written for:
- **steering-vectors** (`steering_vectors.SteeringVector`): `layer_activations={s: θ}` on a `decoder_block`,
  applied by `vector.apply(model)`; its default patches every token position, as melbo does;
- **TransformerLens**: a forward hook on `blocks.{s}.hook_resid_post` that adds θ (`transformer_lens_hooks`, for
  `model.hooks(fwd_hooks=...)` or `run_with_hooks`);
- **repeng** (`repeng.ControlVector`): `directions={s: θ}` for its `ControlModel`, which adds a direction to the
  output of the block of the same index (`to_repeng`);
- **llama.cpp** control vectors: `melbo export --format llamacpp` (`melbo.records.export`): `direction.{s}`, which
  llama.cpp adds to the output of block s. repeng's `ControlVector.import_gguf` reads those files as they are, and
  its ControlModel adds `directions[s]` at the same block, so a melbo GGUF also works in repeng.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from melbo.errors import MelboError
from melbo.engine.intervention import SteeringVectors
from melbo.engine.store import Run


def _vector(source: "Run | SteeringVectors", index: int) -> tuple[torch.Tensor, int]:
    vectors = source.perturbations if isinstance(source, Run) else source
    if vectors is None:
        raise MelboError(f"run {source.path} is not finished: resume it with `melbo discover --resume {source.path}`")
    if not vectors.supports_arithmetic:
        raise MelboError(f"only steering vectors convert (this run holds {vectors.KIND}): export them with "
                         f"`melbo export --format {vectors.export_formats[-1]}`")
    if not (isinstance(index, int) and 0 <= index < len(vectors)):
        raise MelboError(f"vector index {index!r} is out of range: there are {len(vectors)} (0..{len(vectors) - 1})")
    return vectors.vectors[index].detach().clone(), vectors.layer


def to_steering_vector(source: "Run | SteeringVectors", index: int, scale: float = 1.0):
    """Vector `index` (times `scale`) as a steering-vectors `SteeringVector` (pip install steering-vectors)."""
    try:
        from steering_vectors import SteeringVector
    except ImportError:
        raise MelboError("steering-vectors is not installed: pip install --no-deps steering-vectors") from None
    theta, layer = _vector(source, index)
    return SteeringVector(layer_activations={layer: theta * scale}, layer_type="decoder_block")


def to_repeng(source: "Run | SteeringVectors", index: int, scale: float = 1.0, model_type: str | None = None):
    """Vector `index` (times `scale`) as a repeng `ControlVector` for `ControlModel(model, [s])` (pip install
    --no-deps repeng). repeng 0.4 names `np.float_` in its annotations, gone in numpy 2: it is aliased first."""
    import numpy as np

    if not hasattr(np, "float_"):
        np.float_ = np.float64  # repeng 0.4's annotations only; nothing computes with it
    try:
        from repeng import ControlVector
    except ImportError:
        raise MelboError("repeng is not installed: pip install --no-deps repeng") from None
    theta, layer = _vector(source, index)
    if model_type is None:
        recorded = source.config.model.architecture if isinstance(source, Run) else None
        model_type = recorded or "unknown"
    return ControlVector(model_type=model_type, directions={layer: (theta * scale).float().numpy()})


def transformer_lens_hooks(source: "Run | SteeringVectors", indices: Sequence[int] | int,
                           scale: float = 1.0) -> list[tuple[str, Callable]]:
    """(hook name, hook) pairs that add the sum of the chosen vectors to `blocks.{s}.hook_resid_post`."""
    indices = [indices] if isinstance(indices, int) else list(indices)
    if not indices:
        raise MelboError("choose at least one vector index")
    parts = [_vector(source, i) for i in indices]
    theta = torch.stack([t for t, _ in parts]).sum(0) * scale
    layer = parts[0][1]

    def add(activation: torch.Tensor, hook=None) -> torch.Tensor:
        return activation + theta.to(activation.device, activation.dtype)

    return [(f"blocks.{layer}.hook_resid_post", add)]
