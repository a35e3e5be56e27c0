"""A tool-calling agent over an OpenAI-compatible API: THREADGATE_MODEL=examples.tool_agent:make."""

from .agent import ToolAgent, make

__all__ = ["ToolAgent", "make"]
