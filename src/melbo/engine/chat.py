"""Multi-turn chat with a steered model: the perturbation is active on every token of every turn."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from melbo.checks import check_scale
from melbo.errors import MelboError
from melbo.engine.generation import Sampling, generate_rows
from melbo.engine.intervention import Perturbations
from melbo.engine.models import LoadedModel
from melbo.engine.prompts import check_conversation, format_messages, tokenize, uses_chat

HELP = "commands: /vector N  /scale X  /off  /reset  /help  /quit"


@dataclass
class ChatSession:
    lm: LoadedModel
    perturbations: Optional[Perturbations]
    vector: Optional[int] = None
    scale: float = 1.0
    sampling: Sampling = Sampling(max_new_tokens=128)
    history: list[dict] = field(default_factory=list)

    def __post_init__(self):
        uses_chat(self.lm, True)  # chat needs a template: say so up front
        self.scale = check_scale(self.scale)
        if self.vector is not None:
            self.select(self.vector)

    def select(self, index: int) -> None:
        count = len(self.perturbations) if self.perturbations is not None else 0
        if not 0 <= index < count:
            raise MelboError(f"vector index {index} is out of range: this run has 0..{count - 1}")
        self.vector = index

    def say(self, text: str) -> str:
        """One user turn → the steered assistant's reply (kept in the history)."""
        if not text.strip():
            raise MelboError("empty message: type something, or /quit")
        self.history.append({"role": "user", "content": text})
        ids = tokenize(self.lm, format_messages(self.lm, self.history), templated=True)
        try:
            check_conversation(self.lm, len(ids), self.sampling.max_new_tokens, "/reset it or write less")
        except MelboError:
            self.history.pop()  # the turn was not answered: leave the history as it was
            raise
        steered = self.perturbations if self.vector is not None else None
        [(reply, _)] = generate_rows(self.lm, steered, ids, [self.vector], self.sampling, self.scale)
        self.history.append({"role": "assistant", "content": reply})
        return reply

    def command(self, line: str) -> str:
        """Handle a /command; returns a status line."""
        name, _, arg = line.strip().partition(" ")
        try:
            if name == "/vector":
                self.select(int(arg))
                return f"[vector {self.vector} on, scale {self.scale}]"
            if name == "/scale":
                self.scale = check_scale(float(arg))
                return f"[scale {self.scale}]"
        except ValueError:
            raise MelboError(f"{name} needs a number, e.g. {name} 2") from None
        if name == "/off":
            self.vector = None
            return "[steering off]"
        if name == "/reset":
            self.history.clear()
            return "[history cleared]"
        if name == "/help":
            return HELP
        raise MelboError(f"unknown command {name!r}: {HELP}")
