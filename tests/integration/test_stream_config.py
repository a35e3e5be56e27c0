"""The stream's configuration is ours: brought up to date at every start, replicas never
lowered (docs/deploy.md), THREADGATE_DUPLICATE_WINDOW_S its dedup window."""

from __future__ import annotations

import contextlib

import pytest
from nats.js.errors import NotFoundError
from threadgate.settings import load_settings
from threadgate.streams.buffer import JetStreamBuffer, connect_nats

from tests.conftest import Stack, unique

pytestmark = pytest.mark.integration


async def start(stack: Stack, tag: str, **knobs: object) -> JetStreamBuffer:
    """What a pod's start-up does to the stream, with these settings."""
    knobs.setdefault("stream_max_bytes", 16 * 1024**2)
    settings = load_settings(
        pod_name="config-test",
        nats_url=stack.nats.url,
        stream_name=f"CFG_{tag}",
        subject_prefix=f"cfg{tag}",
        **knobs,
    )
    nc = await connect_nats(settings, "config-test")
    buf = JetStreamBuffer(settings, nc)
    await buf.ensure_stream()
    return buf


async def test_the_stream_is_brought_up_to_date_at_every_start(stack: Stack) -> None:
    tag = unique("c")[2:]
    first = await start(stack, tag, duplicate_window_s=60, stream_max_age_s=3600)
    js = first.nc.jetstream()
    try:
        info = await js.stream_info(first.stream)
        assert (info.config.duplicate_window, info.config.max_age) == (60, 3600)
        # The next start (a deploy with other settings) changes the stream it finds.
        for knobs, field, value in (
            ({"duplicate_window_s": 120}, "duplicate_window", 120),
            ({"stream_max_age_s": 7200}, "max_age", 7200),
            ({"stream_max_bytes": 8 * 1024**2}, "max_bytes", 8 * 1024**2),
        ):
            again = await start(stack, tag, **knobs)
            await again.nc.close()
            info = await js.stream_info(first.stream)
            assert getattr(info.config, field) == value, (knobs, info.config)
    finally:
        with contextlib.suppress(NotFoundError):
            await js.delete_stream(first.stream)
        await first.nc.close()


async def test_duplicate_window_is_the_dedup_window(stack: Stack) -> None:
    """A message id seen within THREADGATE_DUPLICATE_WINDOW_S is dropped as a duplicate."""
    buf = await start(stack, unique("d")[2:], duplicate_window_s=1)
    js = buf.nc.jetstream()
    try:
        subject = buf.subject("t")
        first = await js.publish(subject, b"x", headers={"Nats-Msg-Id": "m"})
        within = await js.publish(subject, b"x", headers={"Nats-Msg-Id": "m"})
        assert within.duplicate and within.seq == first.seq
        info = await js.stream_info(buf.stream)
        assert info.config.duplicate_window == 1
    finally:
        with contextlib.suppress(NotFoundError):
            await js.delete_stream(buf.stream)
        await buf.nc.close()
