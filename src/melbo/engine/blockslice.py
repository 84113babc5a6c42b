"""The blocks between a perturbation and the target, called directly: the engine's inner forward pass.

Training only needs blocks first..last (the prefix before the perturbation is replayed from a cache, and
nothing after the target matters). Calling those blocks directly, with exactly the arguments the model itself
passes them, skips the embedding, the mask and rotary set-up and the pass-through of the prefix on every step.
The arguments are captured once per batch size from a real forward pass (a pre-hook on each block), so every
architecture's own per-layer arguments (sliding-window masks, local and global rotary tables) are reproduced
without knowing them.

bf16 on CPU: autocast re-casts every frozen weight on every step and leaves the activations in fp32, which
costs what bf16 saves (measured: no gain). With precision "bf16" on a CPU the blocks after the source run as
bf16 copies instead (weights cast once, activations bf16 between blocks); the residual change and the
objective are still taken in fp32. On a GPU, autocast is cheap and the originals are used.

`compile=True` hands the blocks after the source to `torch.compile`, which fuses the element-wise work (norms,
rotary, activations) between the matrix products. It costs a minute or more of compilation on the first step
(and once more for a batch of another size), so it pays only on long runs. The blocks up to the source are
never compiled: perturbation hooks come and go there on every step, and each change would recompile.
"""

from __future__ import annotations

import copy
import os
from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor, nn

from melbo.engine.models import LoadedModel, cache_dir
from melbo.engine.prompts import PromptBatch

Arguments = list[tuple[tuple, dict]]  # per block: (positional arguments after the hidden states, keywords)


class _Captured(Exception):
    """Raised from the last block's pre-hook: its arguments are all that is needed."""


def model_inputs(lm: LoadedModel, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
    """A prompt batch's tensors on the device the model takes its inputs on."""
    return {k: v.to(lm.device) for k, v in inputs.items()}


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_cast(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value


def _run_blocks(blocks: list[nn.Module], hidden: Tensor, arguments: Arguments) -> Tensor:
    for block, (args, kwargs) in zip(blocks, arguments):
        hidden = hidden.to(_dtype(block))
        out = block(hidden, *args, **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


def _compiled(function):
    """torch.compile with inductor's cache in melbo's cache directory (unless the user set one): compiled kernels
    then outlive the temporary directory inductor uses by default, and the next run's compile reuses them."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "inductor"))
    return torch.compile(function, dynamic=False)


def _dtype(block: nn.Module) -> torch.dtype:
    return next(block.parameters()).dtype


def _bf16_copy(lm: LoadedModel, k: int) -> nn.Module:
    """Block k in bf16, made once per model and weights: later probes (and a compiled slice's guards) reuse it."""
    block = lm.blocks[k]
    weights = tuple((p.data_ptr(), p._version) for p in block.parameters())  # changes if the weights are trained
    cache = lm.__dict__.setdefault("_bf16_blocks", {})
    if k not in cache or cache[k][0] != weights:
        cache[k] = (weights, copy.deepcopy(block).to(torch.bfloat16))
    return cache[k][1]


def _can_copy(lm: LoadedModel, block: nn.Module) -> bool:
    # A device-mapped block (accelerate's hook, weights possibly offloaded) is used as it is.
    return lm.device.type == "cpu" and not hasattr(block, "_hf_hook") and _dtype(block) == torch.float32


class BlockSlice:
    """Blocks `first`..`last` of `lm`, run on hidden states of `copies` copies of `batch` (row = copy * P + prompt).

    Blocks up to `keep` stay the model's own modules (perturbation hooks live there); later ones are bf16
    copies when `bf16` is asked for and the model is fp32 on a CPU.
    """

    CACHED_SIZES = 2  # argument sets kept: a run's batch size and its last, smaller batch

    def __init__(self, lm: LoadedModel, batch: PromptBatch, first: int, last: int, keep: int, bf16: bool = False,
                 compile: bool = False):
        self.lm, self.batch, self.first, self.last = lm, batch, first, last
        self.blocks = [_bf16_copy(lm, k) if bf16 and k > keep and _can_copy(lm, lm.blocks[k]) else lm.blocks[k]
                       for k in range(first, last + 1)]
        self.hooked = max(0, min(keep, last) - first + 1)  # blocks that may carry perturbation hooks: never compiled
        self._tail = _compiled(_run_blocks) if compile else _run_blocks
        self._arguments: OrderedDict[int, Arguments] = OrderedDict()

    def __call__(self, hidden: Tensor, copies: int) -> Tensor:
        """The last block's output [copies * P, T, d] from the first block's input."""
        arguments, k = self.arguments(copies), self.hooked
        hidden = _run_blocks(self.blocks[:k], hidden, arguments[:k])
        return self._tail(self.blocks[k:], hidden, arguments[k:]) if k < len(self.blocks) else hidden

    def arguments(self, copies: int) -> Arguments:
        if copies not in self._arguments:
            self._arguments[copies] = self._capture(copies)
            while len(self._arguments) > self.CACHED_SIZES:
                self._arguments.popitem(last=False)
        self._arguments.move_to_end(copies)
        return self._arguments[copies]

    def _capture(self, copies: int) -> Arguments:
        """The arguments the model passes blocks first..last for this many copies (one forward, stopped early)."""
        seen: dict[int, tuple[tuple, dict]] = {}

        def pre_hook(k: int):
            def hook(_module, args, kwargs):
                seen[k] = (tuple(args[1:]), {n: v for n, v in kwargs.items() if n != "hidden_states"})
                if k == self.last:
                    raise _Captured
            return hook

        handles = [self.lm.blocks[k].register_forward_pre_hook(pre_hook(k), with_kwargs=True)
                   for k in range(self.first, self.last + 1)]
        try:
            with torch.no_grad():
                self.lm.model(**model_inputs(self.lm, self.batch.repeat(copies)), use_cache=False)
        except _Captured:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return [(_cast(seen[k][0], _dtype(block)), _cast(seen[k][1], _dtype(block)))
                for k, block in zip(range(self.first, self.last + 1), self.blocks)]
