"""A plain-Python agent with data events and continuation: no framework, no model.

It plans (a `plan` data event), answers by echoing the question word by word (text), and
cites its source (a `citation` data event). Its reply is a function of the prompt alone, so
continuing after a crash is skipping the parts already streamed; it checks that they are what
it would have said, and refuses to continue (the run regenerates the reply) when they are not.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from threadgate.settings import Settings
from threadgate.sources import ContinuationRefused, Data, Part, Prompt, number_option


class EchoAgent:
    reads_history = False  # only this run's input matters: no history query per run
    continues = True

    def check_options(self, options: dict[str, Any]) -> None:
        if set(options) - {"delay_ms"}:
            raise ValueError("the echo agent takes one option: delay_ms, from 0 to 5000")
        number_option(options, "delay_ms", low=0, high=5000, integer=True)

    def reply(self, question: str) -> list[Part]:
        words = question.split()
        return [
            Data("plan", {"steps": ["read the question", "echo it", "cite the source"]}),
            *(f"{word} " for word in words),
            Data("citation", {"source": "your message", "words": len(words)}),
        ]

    async def stream(self, prompt: Prompt) -> AsyncIterator[Part]:
        parts = self.reply(prompt.messages[-1]["content"])
        done = len(prompt.prefix_parts)  # streamed by an attempt that died: continue after it
        if list(prompt.prefix_parts) != parts[:done]:
            raise ContinuationRefused("the reply so far is not this agent's")
        for part in parts[done:]:
            await asyncio.sleep(prompt.options.get("delay_ms", 50) / 1000)  # a model's pace
            yield part


def make(settings: Settings) -> EchoAgent:
    """THREADGATE_MODEL=examples.echo_agent:make"""
    return EchoAgent()
