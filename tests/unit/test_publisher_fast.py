"""The publisher's two shortcuts through nats-py's internals still match nats-py."""

from __future__ import annotations

import asyncio
import inspect
from types import SimpleNamespace
from typing import Any

import pytest
from nats.aio.client import Client
from nats.aio.subscription import Subscription
from threadgate.streams.publisher import direct, publish_now

pytestmark = pytest.mark.unit


def _client() -> Any:
    c: Any = Client()
    c._status = Client.CONNECTED
    c._pending, c._pending_data_size = [], 0
    c._max_pending_size, c._max_payload = 2 * 1024 * 1024, 1024 * 1024
    c._flush_queue = asyncio.Queue(maxsize=1024)
    c._flusher_task = asyncio.get_running_loop().create_future()  # a live flusher, idle
    return c


@pytest.mark.parametrize("payload", [b"", b'{"type":"chunk","text":"\xc3\xa9 a\\nb"}'])
async def test_publish_now_writes_what_nats_py_writes(payload: bytes) -> None:
    theirs = _client()
    subject, reply, msg_id = "tg.thread.t-1", "_INBOX.x.3.7", "run:2:17"
    await theirs._send_publish(subject, reply, payload, len(payload), {"Nats-Msg-Id": msg_id})
    ours = _client()
    assert publish_now(ours, subject, reply, msg_id, payload)
    assert ours._pending == theirs._pending and ours._pending_data_size == theirs._pending_data_size
    assert ours.stats["out_msgs"] == theirs.stats["out_msgs"] == 1
    assert ours._flush_queue.qsize() == theirs._flush_queue.qsize() == 1  # the flusher is woken
    assert publish_now(ours, subject, reply, msg_id, payload)
    assert ours._flush_queue.qsize() == 1  # once: it writes all that is pending


async def test_publish_now_leaves_what_it_cannot_do_to_nats_py() -> None:
    c = _client()
    c._status = Client.RECONNECTING
    assert not publish_now(c, "s", "r", "m", b"x")
    c = _client()
    c._max_payload = 4
    assert not publish_now(c, "s", "r", "m", b"too large")
    assert c._pending == []


def test_nats_py_hands_messages_to_the_pending_queue() -> None:
    """`direct` replaces a subscription's pending queue: nats-py must fill it with put_nowait
    after counting the message's bytes in, and its subscription must keep both fields."""
    process = inspect.getsource(Client._process_msg)
    assert "sub._pending_queue.put_nowait(msg)" in process
    assert "sub._pending_size += payload_size" in process
    init = inspect.getsource(Subscription.__init__)
    assert "self._pending_queue" in init and "self._pending_size" in init


async def test_a_direct_subscription_handles_each_message_as_it_comes() -> None:
    got: list[bytes] = []
    sub: Any = SimpleNamespace(_pending_queue=asyncio.Queue(), _pending_size=0)
    assert direct(sub, lambda msg: got.append(msg.data))
    sub._pending_size += 3
    sub._pending_queue.put_nowait(SimpleNamespace(data=b"ack"))
    assert got == [b"ack"] and sub._pending_size == 0 and sub._pending_queue.qsize() == 0
    assert not direct(SimpleNamespace(), lambda msg: None)  # not nats-py's: left alone
