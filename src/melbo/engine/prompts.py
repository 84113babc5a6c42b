"""Prompts → a left-padded token batch, with the token positions the objective looks at.

Chat models get their own template (with the assistant tag appended); `chat=False` uses the raw text.
Token sets: "all" (default), "last:K", or explicit per-prompt indices (`melbo.positions`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from melbo.checks import is_utf8
from melbo.errors import MelboError
from melbo.engine.models import LoadedModel
from melbo.positions import Positions, Spec
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
    """A conversation ending with a user turn → text ending with the assistant tag; the model's system prompt
    (`LoadedModel.system`) opens a conversation that does not open with its own."""
    messages = list(messages)
    if lm.system and not (messages and messages[0].get("role") == "system"):
        messages = [{"role": "system", "content": lm.system}, *messages]
    return lm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


_SYSTEM_PROBE = "melbo-system-probe-7d1f"


def check_system_role(lm: LoadedModel, chat: bool | None = None) -> None:
    """Refuse a system prompt the model would never see: raw text, or a template that drops or rejects the role."""
    if not uses_chat(lm, chat):
        raise MelboError(f"a system prompt needs the chat template, and {lm.model_id} is used as raw text: "
                         "drop --system-prompt (or --raw)")
    try:
        text = format_messages(lm, [{"role": "system", "content": _SYSTEM_PROBE}, {"role": "user", "content": "hi"}])
    except Exception:  # noqa: BLE001 (templates raise their own error types, e.g. jinja's TemplateError)
        text = ""
    if _SYSTEM_PROBE not in text:
        raise MelboError(f"{lm.model_id}'s chat template has no system role: drop --system-prompt")


def format_prompt(lm: LoadedModel, prompt: str, chat: bool | None = None, system: str | None = None) -> str:
    """One prompt as the model reads it; `system` (checked with `check_system_role` first; default: the model's,
    `LoadedModel.system`) opens the conversation."""
    if not prompt.strip():
        raise MelboError("empty prompt: give at least one non-blank prompt")
    if uses_chat(lm, chat):
        opening = [{"role": "system", "content": system}] if system else []
        return format_messages(lm, [*opening, {"role": "user", "content": prompt}])
    if system or lm.system:
        check_system_role(lm, chat)  # raises: raw text has no place for it
    return prompt


def tokenize(lm: LoadedModel, text: str, templated: bool) -> list[int]:
    # A chat template writes its own special tokens; raw text gets the tokenizer's (e.g. BOS).
    return lm.tokenizer(text, add_special_tokens=not templated)["input_ids"]


def prompt_tokens(lm: LoadedModel, prompt: str, templated: bool, system: str | None = None) -> list[int]:
    """The token ids the model reads for one prompt (template applied when `templated`)."""
    return tokenize(lm, format_prompt(lm, prompt, templated, system), templated)


def batch_from_ids(ids: Sequence[Sequence[int]], pad: int = 0, texts: Sequence[str] | None = None) -> PromptBatch:
    """Left-pad token id lists into a batch whose objective covers every real token."""
    width = max(len(x) for x in ids)
    input_ids = torch.tensor([[pad] * (width - len(x)) + list(x) for x in ids])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    texts = list(texts) if texts is not None else [""] * len(ids)
    return PromptBatch(texts, input_ids, mask, position_ids, mask.bool(), [len(x) for x in ids])


def check_prompt_list(prompts: Sequence[str]) -> list[str]:
    """A list of prompt strings; a bare string would silently become one prompt per character."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise MelboError(f"prompts must be a list of strings, got {type(prompts).__name__}: pass [{prompts!r:.40}]")
    if not prompts:
        raise MelboError("no prompts given: pass at least one prompt")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise MelboError(f"prompt {i} is {type(prompt).__name__}, not text: pass strings only")
        if not is_utf8(prompt):
            raise MelboError(f"prompt {i} is not UTF-8 text ({ascii(prompt)[:60]}): pass it as UTF-8")
    return list(prompts)


def context_length(lm: LoadedModel) -> int | None:
    """The most tokens the model attends to: its config's max_position_embeddings, else a sane tokenizer limit."""
    limit = getattr(lm.model.config, "max_position_embeddings", None)
    if not isinstance(limit, int) or limit <= 0:
        # Tokenizers without a limit report a huge sentinel (1e30): not a real context length.
        limit = getattr(lm.tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 10_000_000 else None


def check_context(lm: LoadedModel, index: int, n_tokens: int, extra: int = 0) -> None:
    """Refuse a prompt (plus `extra` tokens to generate) longer than the model's context, before any work."""
    _check_fits(lm, f"prompt {index}", n_tokens, extra, "shorten it")


def check_conversation(lm: LoadedModel, n_tokens: int, extra: int, fix: str) -> None:
    """Refuse a chat history (plus `extra` tokens to generate) longer than the model's context."""
    _check_fits(lm, "the conversation", n_tokens, extra, fix)


def _check_fits(lm: LoadedModel, what: str, n_tokens: int, extra: int, fix: str) -> None:
    limit = context_length(lm)
    if limit is not None and n_tokens + extra > limit:
        plus = f" + {extra} to generate" if extra else ""
        raise MelboError(f"{what} has {n_tokens} tokens{plus}, more than {lm.model_id}'s context of {limit}: {fix}")


def encode(
    lm: LoadedModel, prompts: Sequence[str], chat: bool | None = None, positions: Spec | Positions = "all",
    system: str | None = None,
) -> PromptBatch:
    """Format, tokenize and left-pad prompts (after `system`, when given); mark the objective's token positions."""
    prompts = check_prompt_list(prompts)
    positions = Positions.parse(positions)  # a malformed spec fails before tokenizing
    positions.check_count(len(prompts))
    templated = uses_chat(lm, chat)
    if system:
        check_system_role(lm, templated)
    texts = [format_prompt(lm, p, templated, system) for p in prompts]
    ids = [tokenize(lm, t, templated) for t in texts]
    for i, x in enumerate(ids):
        check_context(lm, i, len(x))
    batch = batch_from_ids(ids, lm.tokenizer.pad_token_id or 0, texts)
    batch.token_mask = token_mask(batch, positions)
    return batch


def token_mask(batch: PromptBatch, positions: Spec | Positions) -> Tensor:
    """Boolean [P, T] mask of the objective's token positions, on real tokens only."""
    positions = Positions.parse(positions)
    positions.check_count(len(batch))
    width = batch.input_ids.shape[1]
    mask = torch.zeros_like(batch.real)
    for i, length in enumerate(batch.lengths):
        offset = width - length  # left padding
        mask[i, [offset + index for index in positions.indices(i, length)]] = True
    return mask
