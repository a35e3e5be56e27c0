"""Reply sources the tests load by import path: THREADGATE_MODEL=tests.plugins:<factory>."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from threadgate.settings import Settings
from threadgate.sources import Data, Part, Prompt

SECRET = "secret-token-123"


class Scripted:
    """The run's input picks what it does, as the fake OpenAI server's does:
    `secret`: a chunk, then ValueError(SECRET) (a plug-in's own failure, whose message must
    not reach clients); `big`: a chunk, then a data event over THREADGATE_MAX_DATA_BYTES;
    `bad name`: a data event whose name breaks the rules; anything else: text with two
    `step` data events between (`reply()`). Options: `delay_ms`; `color` is refused."""

    reads_history = False

    def __init__(self, settings: Settings) -> None:
        self.max_data_bytes = settings.max_data_bytes

    def check_options(self, options: dict[str, Any]) -> None:
        if "color" in options:
            raise ValueError("the scripted source has no colors")

    async def stream(self, prompt: Prompt) -> AsyncIterator[Part]:
        said = prompt.messages[-1]["content"]
        delay = float(prompt.options.get("delay_ms", 0)) / 1000
        if said == "secret":
            yield "a "
            raise ValueError(SECRET)
        if said == "big":
            yield "a "
            yield Data("blob", "x" * self.max_data_bytes)  # its JSON has 2 more bytes: quotes
        if said == "bad name":
            yield Data("bad name", 1)
        for part in reply():
            await asyncio.sleep(delay)  # the source's pace, like a model's
            yield part


def reply() -> list[Part]:
    return ["a ", Data("step", {"n": 1}), "b ", "c ", Data("step", {"n": 2}), "d "]


def scripted(settings: Settings) -> Scripted:
    return Scripted(settings)


def no_stream(settings: Settings) -> object:
    return object()


def failing_factory(settings: Settings) -> Scripted:
    raise RuntimeError("the plug-in has no credentials")


class Picky(Scripted):
    """A plug-in whose option check trusts its input, as many will: `n` is read as a number,
    `of` as a list, `x...` keys want a `needed` key. Whatever Python raises on odd values
    (TypeError, KeyError, OverflowError, ...) must be a 400, never a 500."""

    def check_options(self, options: dict[str, Any]) -> None:
        if "n" in options:
            if float(options["n"]) > 10:
                raise ValueError("n must be at most 10")
            int(options["n"])
        if "of" in options:
            options["of"][0]
        if any(k.startswith("x") for k in options):
            options["needed"]


def picky(settings: Settings) -> Picky:
    return Picky(settings)


class Unstorable:
    """Text and data PostgreSQL cannot store as they are (NUL, a lone surrogate)."""

    reads_history = False

    async def stream(self, prompt: Prompt) -> AsyncIterator[Part]:
        delay = float(prompt.options.get("delay_ms", 0)) / 1000
        for part in unstorable_reply():
            await asyncio.sleep(delay)  # the source's pace, like a model's
            yield part


def unstorable_reply() -> list[Part]:
    # the last two parts: the halves of a pair, each alone in its part
    return ["p1\x00 ", Data("blob", {"s": "a\x00b", "u": "\ud800"}), "p2 \ud83d", "\ude00end"]


def unstorable(settings: Settings) -> Unstorable:
    return Unstorable()
