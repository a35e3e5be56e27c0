"""Chunk sources: the models a run streams its reply from, behind one small Protocol."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..settings import Settings


@dataclass(frozen=True, slots=True)
class Prompt:
    """What a model is asked: the thread's earlier turns, then this run's input."""

    messages: list[dict[str, str]]
    options: dict[str, Any] = field(default_factory=dict)
    attempt: int = 1


class ChunkSource(Protocol):
    """Streams a reply as text chunks. Raises TransientModelError or PermanentModelError.

    `reads_history`: whether the prompt needs the thread's earlier turns; a source that
    ignores them spares every run a query.
    """

    reads_history: bool

    def stream(self, prompt: Prompt) -> AsyncIterator[str]: ...


def chunk_source(settings: Settings) -> ChunkSource:
    if settings.model == "openai":
        from .openai import OpenAIChunkSource

        return OpenAIChunkSource(settings)
    from .mock import MockChunkSource

    return MockChunkSource(settings)
