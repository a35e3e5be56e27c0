from __future__ import annotations

import pytest
from threadgate.errors import InvalidRequest, PermanentModelError, TransientModelError
from threadgate.models import Prompt
from threadgate.models.mock import MockChunkSource, check_mock_options, mock_reply
from threadgate.settings import load_settings

pytestmark = pytest.mark.unit


async def collect(options: dict[str, object], attempt: int = 1) -> list[str]:
    source = MockChunkSource(load_settings(mock_chunks=20, mock_delay_ms=0))
    return [c async for c in source.stream(Prompt(messages=[], options=options, attempt=attempt))]


async def test_default_reply_is_deterministic() -> None:
    chunks = await collect({})
    assert chunks == [f"chunk-{i} " for i in range(20)]
    assert "".join(chunks) == mock_reply(20)


async def test_options_override() -> None:
    assert await collect({"chunks": 3, "delay_ms": 1}) == ["chunk-0 ", "chunk-1 ", "chunk-2 "]


async def test_failures() -> None:
    with pytest.raises(TransientModelError):
        await collect({"fail": "transient", "fail_at": 2})
    with pytest.raises(PermanentModelError):
        await collect({"fail": "permanent"})
    # fail_attempts: the first attempts fail, a later one succeeds
    assert (
        len(await collect({"fail": "transient", "fail_attempts": 1, "chunks": 2}, attempt=2)) == 2
    )


@pytest.mark.parametrize(
    "bad",
    [
        {"chunks": -1},
        {"chunks": "3"},
        {"delay_ms": -5},
        {"delay_ms": 10**9},
        {"fail": "sometimes"},
        {"chunks": True},
        {"chunks": 10**9},
    ],
)
def test_bad_options_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(InvalidRequest):
        check_mock_options(bad)
