"""A plain-Python agent with data events: THREADGATE_MODEL=examples.echo_agent:make."""

from .agent import EchoAgent, make

__all__ = ["EchoAgent", "make"]
