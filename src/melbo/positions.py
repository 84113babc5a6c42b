"""The token positions the objective looks at, as a user gives them: parsed once, checked in one place.

    Positions.parse("all")               every real token of every prompt (the default)
    Positions.parse("last:4")            the last 4 tokens of each prompt
    Positions.parse("[[-1, -2], [-1]]")  explicit indices, one list per prompt (negative: from the prompt's end)
    Positions.parse([[-1, -2], [-1]])    the same lists, from Python or a run's config.json

Settings keep the spec (config.json records what the user asked for: "all", "last:4" or the lists, as `spec`
gives them back); whatever needs the positions parses it here. Indices refer to real tokens, never padding: an
index outside its prompt is refused once the prompt is tokenized (`indices`). No torch import, so that the
command line can parse --positions before loading anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional, Sequence, Union

from melbo.errors import MelboError

Spec = Union[str, Sequence[Sequence[int]]]  # what settings hold: "all", "last:K" or one index list per prompt
EXAMPLE = "use e.g. [[-1, -2], [-1]]"


@dataclass(frozen=True)
class Positions:
    last: Optional[int] = None  # the last K tokens of each prompt
    lists: Optional[tuple[tuple[int, ...], ...]] = None  # explicit indices, one tuple per prompt
    # neither: every token

    @classmethod
    def parse(cls, spec: object) -> "Positions":
        if isinstance(spec, Positions):
            return spec
        if isinstance(spec, str):
            text = spec.strip()
            if text == "all":
                return cls()
            if text.startswith("last:") and text[5:].isdigit() and int(text[5:]) > 0:
                return cls(last=int(text[5:]))
            if not text.startswith("["):
                raise MelboError(f"unknown token positions {spec!r}: use 'all', 'last:K' or explicit indices")
            try:
                spec = json.loads(text)
            except json.JSONDecodeError:
                raise MelboError(f"token positions {text!r} are not valid JSON: {EXAMPLE}") from None
        return cls(lists=_index_lists(spec))

    @property
    def spec(self) -> Spec:
        """As settings and config.json hold it: "all", "last:K", or the index lists."""
        if self.lists is not None:
            return [list(indices) for indices in self.lists]
        return "all" if self.last is None else f"last:{self.last}"

    def __str__(self) -> str:
        spec = self.spec
        return spec if isinstance(spec, str) else json.dumps(spec)

    def check_count(self, prompts: int) -> None:
        """Explicit indices come as one list per prompt."""
        if self.lists is not None and len(self.lists) != prompts:
            raise MelboError(f"got token indices for {len(self.lists)} prompts but {prompts} prompts: "
                             "give one list per prompt")

    def indices(self, prompt: int, length: int) -> list[int]:
        """The positions of prompt `prompt` (of `length` real tokens), each in 0..length - 1."""
        if self.lists is None:
            first = 0 if self.last is None else max(0, length - self.last)
            return list(range(first, length))
        wanted = self.lists[prompt]
        for index in wanted:
            if not -length <= index < length:
                raise MelboError(f"token index {index} is outside prompt {prompt} ({length} tokens): use "
                                 f"0..{length - 1} or -1..-{length} from its end")
        return [index % length for index in wanted]


def _index_lists(positions: object) -> tuple[tuple[int, ...], ...]:
    """Explicit positions are one non-empty list of whole numbers per prompt (JSON gives floats, strings, …)."""
    if isinstance(positions, (str, bytes)) or not isinstance(positions, Sequence):
        raise MelboError(f"token positions {positions!r} are not a list per prompt: {EXAMPLE}")
    for i, indices in enumerate(positions):
        if isinstance(indices, str) or not isinstance(indices, Sequence):
            raise MelboError(f"token indices for prompt {i} ({indices!r}) are not a list: {EXAMPLE}")
        if not indices:
            raise MelboError(f"empty token index list for prompt {i}: give at least one index")
        for index in indices:
            if not isinstance(index, int) or isinstance(index, bool):
                raise MelboError(f"token index {index!r} for prompt {i} is not a whole number: {EXAMPLE}")
    return tuple(tuple(indices) for indices in positions)
