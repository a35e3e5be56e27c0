"""A reply stored by parts (app/store/replies.py) gives back exactly what clients saw."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from threadgate.store.replies import merged, pack, restore, storable, unpack

pytestmark = pytest.mark.unit

# Any text a plug-in may yield: lone surrogates included (st.text() leaves them out), and the
# halves of a pair often, so that parts end and begin with them.
any_text = st.text(
    alphabet=st.sampled_from(["a", "\x00", "\\", "😀", "\ud83d", "\ude00"])
    | st.characters(exclude_categories=())
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | any_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(any_text, inner, max_size=3),
    max_leaves=8,
)
parts = st.lists(any_text | st.tuples(st.text(min_size=1), json_values), max_size=12)


@given(parts)
def test_parts_round_trip_through_text_and_layout(ps: list[object]) -> None:
    text, layout = pack(ps)  # type: ignore[arg-type]
    assert layout.isascii()  # any payload, NUL and lone surrogates included
    assert unpack(text, layout) == [p if isinstance(p, str) else tuple(p) for p in ps]  # type: ignore[misc]


@given(parts)
def test_parts_round_trip_through_storage(ps: list[object]) -> None:
    """The text stored (escaped or not) and read back still fits the layout."""
    text, layout = pack(ps)  # type: ignore[arg-type]
    stored, escaped = storable(text)
    assert unpack(restore(stored, escaped), layout) == unpack(text, layout)


def test_halves_of_a_pair_in_two_parts_stay_two_parts() -> None:
    ps = ["a\ud83d", "\ude00b", "\x00"]
    text, layout = pack(ps)
    assert unpack(restore(*storable(text)), layout) == ps
    assert restore(*storable("😀\x00")) == "😀\x00"


@given(any_text)
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
