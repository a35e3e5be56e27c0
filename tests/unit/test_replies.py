"""A reply stored by parts (app/store/replies.py) gives back exactly what clients saw."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from threadgate.store.replies import merged, pack, restore, storable, unpack

pytestmark = pytest.mark.unit

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)
parts = st.lists(st.text() | st.tuples(st.text(min_size=1), json_values), max_size=12)


@given(parts)
def test_parts_round_trip_through_text_and_layout(ps: list[object]) -> None:
    text, layout = pack(ps)  # type: ignore[arg-type]
    assert layout.isascii()  # any payload, NUL and lone surrogates included
    assert unpack(text, layout) == [p if isinstance(p, str) else tuple(p) for p in ps]  # type: ignore[misc]


@given(st.text())
def test_any_text_is_stored_in_a_form_that_gives_it_back(text: str) -> None:
    stored, escaped = storable(text)
    assert "\x00" not in stored
    stored.encode("utf-8")  # PostgreSQL takes it
    assert restore(stored, escaped) == text
    assert escaped == ("\x00" in text or not _utf8(text))


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def test_a_conversation_shows_adjacent_text_merged() -> None:
    assert merged(["a", "b", ("n", 1), "c"]) == [
        {"type": "text", "text": "ab"},
        {"type": "data", "name": "n", "payload": 1},
        {"type": "text", "text": "c"},
    ]
    assert json.loads(json.dumps(merged([]))) == []
