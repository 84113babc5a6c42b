"""The JSON bodies of the live and chat API, as pydantic models with bounds, and their errors as one line each.

Python's json reads Infinity, NaN and integers of any length, so every number here is bounded and finite
before it reaches the model: a hostile body is a 422 that says which field to fix, never an OverflowError.
Perturbation indices are checked against the run's own count, passed in as the validation context.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, Optional

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictStr, ValidationError,
                      ValidationInfo, field_validator, model_validator)

from melbo.errors import MelboError
from melbo.settings import SERVE_MAX_COLUMNS, SERVE_MAX_NEW_TOKENS, SERVE_MAX_PROMPT_CHARS, SERVE_MAX_SCALE

MAX_PICKED = 64  # indices in one live request before duplicates collapse (the page sends at most a handful)
MAX_TURNS = 200  # messages in one chat history (their text is bounded by SERVE_MAX_PROMPT_CHARS as well)


class BadBody(MelboError):
    """A request body that parsed as JSON but does not say what to generate: answered 422."""


def _refuse_bool(what: str):
    """pydantic's lax ints and floats take true as 1: a checkbox's value sent where a number belongs is a mistake."""
    def check(value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError(f"must be {what}")
        return value

    return BeforeValidator(check)


def _none_word(value: Any) -> Any:
    """The chat page's select sends "none" (or "") for the unsteered model."""
    return None if value in ("", "none") else value


Index = Annotated[int, _refuse_bool("a whole number")]  # range-checked against the run in the model
Scale = Annotated[float, _refuse_bool("a number"), Field(ge=-SERVE_MAX_SCALE, le=SERVE_MAX_SCALE, allow_inf_nan=False)]
Tokens = Annotated[int, _refuse_bool("a whole number"), Field(ge=1, le=SERVE_MAX_NEW_TOKENS)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)  # a misspelt field is named, not silently ignored

    @classmethod
    def parse(cls, body: Any, count: int):
        """The validated body for a run of `count` perturbations, or BadBody with one line."""
        try:
            return cls.model_validate(body, context={"count": count})
        except ValidationError as exc:
            raise BadBody(explain(exc.errors(include_url=False)[0], cls)) from None


def _in_run(index: int, info: ValidationInfo) -> int:
    count = (info.context or {}).get("count", 0)
    if not 0 <= index < count:
        raise ValueError(f"perturbation {shown(index)} is out of range: this run has 0..{count - 1}")
    return index


class LiveBody(_Body):
    prompt: Annotated[StrictStr, Field(max_length=SERVE_MAX_PROMPT_CHARS)]
    perturbations: Annotated[list[Index], Field(min_length=1, max_length=MAX_PICKED)]
    scale: Scale = 1.0
    max_new_tokens: Tokens = 64
    random: StrictBool = False

    @field_validator("prompt")
    @classmethod
    def _some_text(cls, prompt: str) -> str:
        if not prompt.strip():
            raise ValueError("empty prompt: type something to generate from")
        return prompt

    @field_validator("perturbations")
    @classmethod
    def _distinct_in_run(cls, picked: list[int], info: ValidationInfo) -> list[int]:
        indices = list(dict.fromkeys(_in_run(i, info) for i in picked))  # duplicates collapse: allowed
        if len(indices) > SERVE_MAX_COLUMNS:
            raise ValueError(f"{len(indices)} perturbations picked: at most {SERVE_MAX_COLUMNS} stream side by side")
        return indices


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    role: Literal["user", "assistant"]
    content: StrictStr


class ChatBody(_Body):
    messages: Annotated[list[Message], Field(min_length=1, max_length=MAX_TURNS)]
    perturbation: Annotated[Optional[Index], BeforeValidator(_none_word)] = None
    scale: Scale = 1.0
    max_new_tokens: Tokens = 64

    @field_validator("perturbation")
    @classmethod
    def _perturbation_in_run(cls, index: Optional[int], info: ValidationInfo) -> Optional[int]:
        return None if index is None else _in_run(index, info)

    @model_validator(mode="after")
    def _conversation(self) -> "ChatBody":
        total = sum(len(m.content) for m in self.messages)
        if total > SERVE_MAX_PROMPT_CHARS:
            raise ValueError(f"the conversation has {total} characters, more than the limit of "
                             f"{SERVE_MAX_PROMPT_CHARS}: start a new chat")
        if self.messages[-1].role != "user" or not self.messages[-1].content.strip():
            raise ValueError("the last message must be the user's, and not empty")
        return self


# ------------------------------------------------------------------------------------------------ one line per error
NAMES = {"prompt": "the prompt", "perturbations": "perturbations", "perturbation": "perturbation", "scale": "scale",
         "max_new_tokens": "max new tokens", "random": "random", "messages": "messages", "role": "role",
         "content": "content"}
RANGES = {"scale": (-SERVE_MAX_SCALE, SERVE_MAX_SCALE), "max_new_tokens": (1, SERVE_MAX_NEW_TOKENS)}
WHOLE = {"int_type", "int_parsing", "int_from_float", "int_parsing_size"}


def shown(value: Any) -> str:
    """A short picture of what was sent: hostile values can be 400 digits or 200 KB of text."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, int) and abs(value) >= 10 ** 12:
        return f"a {len(str(abs(value)))}-digit number"
    if isinstance(value, (int, float)):
        return f"{value:g}" if isinstance(value, float) else str(value)
    if isinstance(value, str):
        return repr(value[:40] + ("…" if len(value) > 40 else ""))
    return f"a {'list' if isinstance(value, list) else 'JSON object' if isinstance(value, dict) else 'value'}"


def _non_finite(value: Any) -> bool:
    if isinstance(value, str):  # a form's "nan" or "-inf" (a 400-digit string is merely too big)
        return value.strip().lower().lstrip("+-") in ("nan", "inf", "infinity")
    return isinstance(value, float) and not math.isfinite(value)


def _where(loc: tuple) -> tuple[str, str]:
    """(the field's key, how to name it) for pydantic's location: ("messages", 2, "role") is message 3's role."""
    keys = [k for k in loc if isinstance(k, str)]
    key = keys[-1] if keys else "body"
    name = NAMES.get(key, repr(key))
    if loc[:1] == ("messages",) and len(loc) > 2 and isinstance(loc[1], int):
        name = f"message {loc[1] + 1}'s {name}"
    elif loc[:1] == ("perturbations",) and len(loc) > 1:
        name = "each perturbation"
    return key, name


def explain(error: dict, model: type[BaseModel]) -> str:
    """One pydantic error as a line that says what to send instead."""
    kind, loc, value = error["type"], tuple(error.get("loc", ())), error.get("input")
    key, name = _where(loc)
    if kind == "value_error":  # our own validators' messages, complete as they are
        text = str(error.get("ctx", {}).get("error", error["msg"]))
        return f"{name} {text}, got {shown(value)}" if text.startswith("must be") else text
    if kind == "missing":
        return f"{name} is missing: the body takes {', '.join(model.model_fields)}"
    if kind == "extra_forbidden":
        return f"unknown field {shown(key)}: the body takes {', '.join(model.model_fields)}"
    if kind in WHOLE or (kind == "finite_number" and key in ("perturbations", "perturbation", "max_new_tokens")):
        return f"{name} must be a whole number, got {shown(value)}"
    if kind in ("float_type", "float_parsing") and key in RANGES:  # pydantic calls a 401-digit number no float
        low, high = RANGES[key]
        return f"{name} must be between {low:g} and {high:g}, got {shown(value)}"
    if kind in ("float_type", "float_parsing"):
        return f"{name} must be a number, got {shown(value)}"
    if kind == "finite_number" or _non_finite(value):  # ±Infinity and "nan" fail the bounds check first
        return f"{name} must be a finite number, got {shown(value)}"
    if kind in ("less_than_equal", "greater_than_equal") and key in RANGES:
        low, high = RANGES[key]
        return f"{name} must be between {low:g} and {high:g}, got {shown(value)}"
    if kind == "too_short" and key == "perturbations":
        return "pick at least one perturbation to compare with the unsteered model"
    if kind == "too_short" and key == "messages":
        return "messages must be a non-empty list of {role, content}"
    if kind in ("too_long", "string_too_long"):
        limit = error.get("ctx", {}).get("max_length")
        if isinstance(value, str):
            return f"{name} has {len(value)} characters, more than the limit of {limit}: shorten it"
        return f"{name}: at most {limit} in one request, got {len(value)}"
    if kind in ("bool_type", "bool_parsing"):
        return f"{name} must be true or false, got {shown(value)}"
    if kind in ("string_type", "string_sub_type"):
        return f"{name} must be text, got {shown(value)}"
    if kind == "list_type":
        return f"{name} must be a list, got {shown(value)}"
    if kind == "literal_error":
        return f"{name} must be user or assistant, got {shown(value)}"
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        what = "each message" if key == "messages" else "the request body"
        return f"{what} must be a JSON object, got {shown(value)}"
    return f"{name}: {error['msg']}"  # a rule not foreseen above: pydantic's own words, still one line
