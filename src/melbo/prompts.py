"""Prompts → a left-padded token batch, with the token positions the objective looks at.

Chat models get their own template (with the assistant tag appended); `chat=False` uses the raw text.
Token sets: "all" (default), "last:K", or explicit per-prompt indices (negative = from the prompt's end).
Indices always refer to real tokens of the prompt, never to padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch
from torch import Tensor

from melbo.errors import MelboError
from melbo.models import LoadedModel

Positions = Union[str, Sequence[Sequence[int]]]
Message = dict  # {"role": ..., "content": ...}


@dataclass
class PromptBatch:
    texts: list[str]  # the text the model sees (template applied)
    input_ids: Tensor  # [P, T], left-padded
    attention_mask: Tensor  # [P, T]
    position_ids: Tensor  # [P, T], 0 at each prompt's first real token
    token_mask: Tensor  # [P, T] bool: positions in the objective's sets I_i
    lengths: list[int]

    def __len__(self) -> int:
        return len(self.texts)

    def repeat(self, n: int) -> dict[str, Tensor]:
        """Model inputs for n copies of the batch, copy-major: row = copy * P + prompt."""
        return {
            "input_ids": self.input_ids.repeat(n, 1),
            "attention_mask": self.attention_mask.repeat(n, 1),
            "position_ids": self.position_ids.repeat(n, 1),
        }

    @property
    def real(self) -> Tensor:
        return self.attention_mask.bool()


def uses_chat(lm: LoadedModel, chat: bool | None) -> bool:
    if chat and lm.chat_template is None:
        raise MelboError(f"{lm.model_id} has no chat template: drop --chat (prompts are then used as raw text)")
    return lm.chat_template is not None if chat is None else chat


def format_messages(lm: LoadedModel, messages: Sequence[Message]) -> str:
    """A conversation ending with a user turn → text ending with the assistant tag."""
    return lm.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)


def format_prompt(lm: LoadedModel, prompt: str, chat: bool | None = None) -> str:
    if not prompt.strip():
        raise MelboError("empty prompt: give at least one non-blank prompt")
    if uses_chat(lm, chat):
        return format_messages(lm, [{"role": "user", "content": prompt}])
    return prompt


def tokenize(lm: LoadedModel, text: str, templated: bool) -> list[int]:
    # A chat template writes its own special tokens; raw text gets the tokenizer's (e.g. BOS).
    return lm.tokenizer(text, add_special_tokens=not templated)["input_ids"]


def batch_from_ids(ids: Sequence[Sequence[int]], pad: int = 0, texts: Sequence[str] | None = None) -> PromptBatch:
    """Left-pad token id lists into a batch whose objective covers every real token."""
    width = max(len(x) for x in ids)
    input_ids = torch.tensor([[pad] * (width - len(x)) + list(x) for x in ids])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    texts = list(texts) if texts is not None else [""] * len(ids)
    return PromptBatch(texts, input_ids, mask, position_ids, mask.bool(), [len(x) for x in ids])


def encode(
    lm: LoadedModel, prompts: Sequence[str], chat: bool | None = None, positions: Positions = "all"
) -> PromptBatch:
    """Format, tokenize and left-pad prompts; mark the objective's token positions."""
    if not prompts:
        raise MelboError("no prompts given: pass at least one prompt")
    templated = uses_chat(lm, chat)
    texts = [format_prompt(lm, p, templated) for p in prompts]
    ids = [tokenize(lm, t, templated) for t in texts]
    batch = batch_from_ids(ids, lm.tokenizer.pad_token_id or 0, texts)
    batch.token_mask = token_mask(batch, positions)
    return batch


def token_mask(batch: PromptBatch, positions: Positions) -> Tensor:
    """Boolean [P, T] mask of the objective's token positions, on real tokens only."""
    width = batch.input_ids.shape[1]
    mask = torch.zeros_like(batch.real)
    per_prompt = _positions_per_prompt(positions, len(batch))
    for i, (length, wanted) in enumerate(zip(batch.lengths, per_prompt)):
        offset = width - length  # left padding
        for index in wanted(length):
            if not -length <= index < length:
                raise MelboError(
                    f"token index {index} is outside prompt {i} ({length} tokens): use 0..{length - 1} "
                    f"or -1..-{length} from its end"
                )
            mask[i, offset + index % length] = True
    return mask


def _positions_per_prompt(positions: Positions, n: int):
    if isinstance(positions, str):
        spec = positions.strip()
        if spec == "all":
            return [lambda length: range(length)] * n
        if spec.startswith("last:") and spec[5:].isdigit() and int(spec[5:]) > 0:
            k = int(spec[5:])
            return [lambda length: range(max(0, length - k), length)] * n
        raise MelboError(f"unknown token positions {positions!r}: use 'all', 'last:K' or explicit indices")
    if len(positions) != n:
        raise MelboError(f"got token indices for {len(positions)} prompts but {n} prompts: give one list per prompt")
    for i, indices in enumerate(positions):
        if not indices:
            raise MelboError(f"empty token index list for prompt {i}: give at least one index")
    return [lambda length, idx=list(idx): idx for idx in positions]
