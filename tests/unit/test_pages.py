"""A stored reply written as JSON in slices (app/store/pages.py) reads as the store's reader
gives it, wherever the slices cut its layout and its content."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from threadgate.store import pages
from threadgate.store.replies import (
    StoredPart,
    escape,
    merged,
    pack,
    restore,
    storable,
    unpack,
)

pytestmark = pytest.mark.unit

# Text as a plug-in may yield it: NUL, lone surrogates (each half of a pair alone too),
# characters of every UTF-8 width, what JSON escapes.
odd_text = st.text(
    alphabet=st.sampled_from(
        ["a", " ", "\x00", "\x01", "\n", '"', "\\", "é", "€", "😀", "\ud83d", "\ude00", "\udfff"]
    )
    | st.characters(),
    max_size=12,
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | odd_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(odd_text, inner, max_size=3),
    max_leaves=6,
)
names = st.from_regex(r"[A-Za-z0-9_.:-]{1,8}", fullmatch=True)
replies = st.lists(odd_text | st.tuples(names, json_values), max_size=10)


async def _slices(text: str, cuts: list[int]) -> AsyncIterator[str]:
    """`text` cut where `cuts` say (sizes, repeated), as a reader of slices gets it."""
    at, i = 0, 0
    while at < len(text):
        size = cuts[i % len(cuts)] if cuts else len(text)
        yield text[at : at + size]
        at += size
        i += 1


async def _collect(pieces: AsyncIterator[bytes]) -> bytes:
    return b"".join([p async for p in pieces])


def as_json(value: Any) -> Any:
    """What a JSON client reads of `value` (an escaped high and low surrogate read as one)."""
    return json.loads(json.dumps(value))


def written(reply: list[StoredPart], cuts: list[int], slice_bytes: int) -> tuple[Any, Any]:
    """(content, parts) as a page writes them, from the reply as stored, read in slices."""
    text, layout = pack(reply)
    stored, escaped = storable(text)

    def content() -> AsyncIterator[str]:
        return _slices(stored, cuts)

    async def both() -> tuple[bytes, bytes]:
        body = await _collect(pages.text_json(content(), escaped=escaped))
        source = pages.unescaped(content()) if escaped else content()
        parts = await _collect(
            pages.parts_json(
                _slices(layout, cuts), source, ascii_only=escaped, slice_bytes=slice_bytes
            )
        )
        return body, parts

    body, parts = asyncio.run(both())
    return json.loads(body), json.loads(parts)


@settings(max_examples=300, deadline=None)
@given(replies, st.lists(st.integers(1, 9), max_size=4), st.integers(1, 64))
def test_a_reply_written_in_slices_reads_as_the_store_reads_it(
    reply: list[StoredPart], cuts: list[int], slice_bytes: int
) -> None:
    reply = [p if isinstance(p, str) else (p[0], p[1]) for p in reply]
    text, layout = pack(reply)
    stored, escaped = storable(text)
    want = merged(unpack(restore(stored, escaped), layout))  # the store's reader (store.messages)
    content, parts = written(reply, cuts, slice_bytes)
    assert content == as_json(restore(stored, escaped))
    assert parts == as_json(want)


@given(odd_text, st.lists(st.integers(1, 13), min_size=1, max_size=5))
def test_escaped_text_read_in_slices_is_the_text(text: str, cuts: list[int]) -> None:
    stored = escape(text)

    async def read() -> str:
        return "".join([p async for p in pages.unescaped(_slices(stored, cuts))])

    assert asyncio.run(read()) == text


@pytest.mark.parametrize(
    ("escaped", "cut"),
    [
        ("ab", 2),
        ("a\\u00", 1),  # an escape cut short: before it
        ("a\\u0000", 7),
        ("a\\\\", 3),  # an escaped backslash, whole
        ("a\\\\\\", 3),  # then a backslash that opens an escape
        ("a\\ud83d", 7),  # a lone surrogate's escape stands alone (never joined)
        ("a\\ud83d\\ude00", 13),
        ("a\\ud83d\\ude0", 7),  # the second escape cut short: before it
        ("a\\\\ud83d", 8),  # not an escape: a backslash, then text
        ("\\n", 2),
        ("\\", 0),
    ],
)
def test_escaped_text_is_cut_between_escapes(escaped: str, cut: int) -> None:
    assert pages.escape_cut(escaped) == cut


def test_a_text_part_is_taken_across_the_contents_slices() -> None:
    reply: list[StoredPart] = ["abc" * 10, ("n", {"x": '"'}), "d", "é€😀" * 5, "", ("m", None)]
    content, parts = written(reply, [4], 8)
    assert content == "abc" * 10 + "d" + "é€😀" * 5
    assert parts == merged(reply)
    assert written(["only text"], [2], 4)[1] == [{"type": "text", "text": "only text"}]
    assert written([], [2], 4) == ("", [])
