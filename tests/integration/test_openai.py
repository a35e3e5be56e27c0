"""The OpenAI-compatible provider against a local fake server: streaming and error classes."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from threadgate.devstack import free_port
from threadgate.errors import PermanentModelError, TransientModelError
from threadgate.models.openai import OpenAISource
from threadgate.settings import load_settings
from threadgate.sources import Prompt

from tests.fakes.openai_server import FakeOpenAI, reply_text, serve_fake

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
async def fake() -> AsyncIterator[tuple[FakeOpenAI, str]]:
    async with serve_fake() as served:
        yield served


def source(base_url: str, timeout: float = 5.0) -> OpenAISource:
    return OpenAISource(
        load_settings(
            openai_base_url=base_url,
            openai_api_key="sk-test",
            openai_timeout_s=timeout,
            openai_model="fake-1",
        )
    )


async def collect(src: OpenAISource, text: str) -> list[str]:
    prompt = Prompt(messages=[{"role": "user", "content": text}])
    return [c async for c in src.stream(prompt)]


async def test_streams_deltas_with_history_and_key(fake: tuple[FakeOpenAI, str]) -> None:
    server, url = fake
    src = source(url)
    prompt = Prompt(
        messages=[
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "stream"},
        ]
    )
    chunks = [c async for c in src.stream(prompt)]
    assert "".join(chunks) == reply_text()
    last = server.requests[-1]
    assert last["auth"] == "Bearer sk-test"
    assert last["body"]["stream"] is True and last["body"]["model"] == "fake-1"
    assert [m["content"] for m in last["body"]["messages"]] == ["hi", "hello", "stream"]


@pytest.mark.parametrize(
    ("mode", "error"),
    [
        ("429", TransientModelError),
        ("500", TransientModelError),
        ("400", PermanentModelError),
        ("drop", TransientModelError),
    ],
)
async def test_error_classes(fake: tuple[FakeOpenAI, str], mode: str, error: type) -> None:
    with pytest.raises(error):
        await collect(source(fake[1]), mode)


async def test_stall_is_a_transient_timeout(fake: tuple[FakeOpenAI, str]) -> None:
    with pytest.raises(TransientModelError):
        await collect(source(fake[1], timeout=0.5), "stall")


async def test_unreachable_provider_is_transient() -> None:
    with pytest.raises(TransientModelError):
        await collect(source(f"http://127.0.0.1:{free_port()}/v1"), "stream")
