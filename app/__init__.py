"""threadgate: durable chat runs over DBOS workflows and NATS JetStream."""

from __future__ import annotations

__version__ = "0.1.0"
