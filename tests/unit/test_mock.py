from __future__ import annotations

import pytest
from threadgate.errors import InvalidRequest, PermanentModelError, TransientModelError
from threadgate.models.mock import MockSource, mock_reply
from threadgate.settings import load_settings
from threadgate.sources import Data, Part, Prompt, check_options

pytestmark = pytest.mark.unit


def mock() -> MockSource:
    return MockSource(load_settings(mock_chunks=20, mock_delay_ms=0))


async def collect(
    options: dict[str, object], attempt: int = 1, prefix: tuple[Part, ...] = ()
) -> list[Part]:
    prompt = Prompt(messages=[], options=options, attempt=attempt, prefix_parts=prefix)
    return [c async for c in mock().stream(prompt)]


async def test_default_reply_is_deterministic() -> None:
    chunks = await collect({})
    assert chunks == [f"chunk-{i} " for i in range(20)]
    assert "".join(str(c) for c in chunks) == mock_reply(20)


async def test_options_override() -> None:
    assert await collect({"chunks": 3, "delay_ms": 1}) == ["chunk-0 ", "chunk-1 ", "chunk-2 "]


async def test_vary_marks_each_chunk_with_its_attempt() -> None:
    assert await collect({"chunks": 2, "vary": True}, attempt=3) == ["chunk-0.3 ", "chunk-1.3 "]


async def test_a_continued_reply_picks_up_after_its_prefix() -> None:
    first = await collect({"chunks": 5, "vary": True}, attempt=1)
    rest = await collect({"chunks": 5, "vary": True}, attempt=2, prefix=tuple(first[:2]))
    assert "".join(str(p) for p in first[:2] + rest) == mock_reply(5, {0: 1, 2: 2})
    assert mock_reply(5, {0: 1, 2: 2}) == "chunk-0.1 chunk-1.1 chunk-2.2 chunk-3.2 chunk-4.2 "


async def test_data_events_share_the_index_sequence() -> None:
    parts = await collect({"chunks": 4, "data_every": 2})
    assert parts == [
        "chunk-0 ",
        Data("tick", {"i": 1, "attempt": 1}),
        "chunk-2 ",
        Data("tick", {"i": 3, "attempt": 1}),
    ]


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
        {"delay_ms": float("nan")},
        {"fail": "sometimes"},
        {"chunks": True},
        {"chunks": 10**9},
        {"vary": "yes"},
        {"temperature": 1},  # unknown to the mock: refused, not silently ignored
    ],
)
def test_bad_options_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(InvalidRequest):
        check_options(mock(), bad)
