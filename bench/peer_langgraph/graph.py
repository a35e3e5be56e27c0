"""The peer graph for LangGraph's agent server: the mock model, chunk by chunk, as custom events.

Run by `langgraph dev` from bench/.peers/venv (see bench/peers.py); never imported by threadgate.
"""

from __future__ import annotations

import asyncio
from typing import TypedDict

from langgraph.config import get_stream_writer
from langgraph.graph import END, START, StateGraph


class State(TypedDict, total=False):
    input: str
    chunks: int
    delay_ms: float
    reply: str


async def model(state: State) -> State:
    """Chunk i is `chunk-{i} `, one every `delay_ms`: the same mock as threadgate's."""
    write = get_stream_writer()
    chunks = int(state.get("chunks", 20))
    delay = float(state.get("delay_ms", 50)) / 1000
    parts = []
    for i in range(chunks):
        if delay:
            await asyncio.sleep(delay)
        text = f"chunk-{i} "
        write({"index": i, "text": text})
        parts.append(text)
    return {"reply": "".join(parts)}


graph = (
    StateGraph(State).add_node("model", model).add_edge(START, "model").add_edge("model", END)
).compile()
