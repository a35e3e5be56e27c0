"""Paged /messages and /runs: newest first, opaque cursors, values streamed whole and once."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from psycopg.types.json import Jsonb
from threadgate.ids import new_run_id
from threadgate.store import pages
from threadgate.store.replies import StoredPart, merged
from threadgate.store.runs import NewRun, RunStatus

from tests.conftest import unique
from tests.integration.conftest import Pod
from tests.integration.knobs import AUTH_ON, key, pod_settings

pytestmark = pytest.mark.integration


async def stored_run(
    pod: Pod,
    thread: str,
    reply: str | list[StoredPart] | None,
    *,
    owner: str = "",
    user: str = "hello",
    status: RunStatus = "success",
) -> str:
    """A run written by the store's own functions (the path a run takes to store its reply
    and end), without running it: a reply of any size in no time. `reply`: its text, or its
    parts (text, or (name, payload)); None: no reply and the run not ended."""
    store = pod.runtime.store
    run_id = new_run_id()
    async with pod.runtime.db.pool.connection() as conn:
        await store.insert_run(
            conn,
            NewRun(run_id=run_id, thread_id=thread, input=user, accepted_by="test", owner=owner),
        )
    if reply is not None:
        parts = [reply] if isinstance(reply, str) else reply
        assert await store.store_reply(run_id, thread, 0, parts, "complete")
        await store.finish(run_id, status)
    return run_id


def conversation(messages: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return [(m["run_id"], m["role"], m["content"]) for m in messages]


async def old_order(pod: Pod, thread: str) -> list[tuple[str, str, str]]:
    """The conversation as the store's list reader gives it (oldest first): the oracle."""
    return [(m.run_id, m.role, m.content) for m in await pod.runtime.store.messages(thread)]


async def test_messages_page_newest_first_with_cursors(pod: Pod) -> None:
    thread = unique()
    for i in range(7):
        await stored_run(pod, thread, f"reply {i}", user=f"ask {i}")
    await stored_run(pod, thread, None, user="no reply yet")  # a run still going
    expected = list(reversed(await old_order(pod, thread)))
    assert len(expected) == 15
    seen: list[tuple[str, str, str]] = []
    cursor = None
    sizes = []
    while True:
        params: dict[str, Any] = {"limit": 4}
        if cursor:
            params["cursor"] = cursor
        resp = await pod.http.get(f"/threads/{thread}/messages", params=params)
        assert resp.status_code == 200 and resp.headers["content-type"] == "application/json"
        page = resp.json()
        assert page["thread_id"] == thread
        sizes.append(len(page["messages"]))
        seen += conversation(page["messages"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == expected
    assert sizes == [4, 4, 4, 3]  # no empty last page
    # The newest page opens on the latest turn: the run still going (no reply), then the last reply.
    assert seen[0][2] == "no reply yet" and seen[1][1:] == ("assistant", "reply 6")


async def test_page_sizes_and_cursors_are_checked(pod: Pod) -> None:
    thread = unique()
    for _ in range(3):
        await stored_run(pod, thread, "r")
    for path in (f"/threads/{thread}/messages", f"/threads/{thread}/runs"):
        default = (await pod.http.get(path)).json()
        assert default["next_cursor"] is None
        with pod_settings(pod, page_limit_default=2, page_limit_max=5):
            page = (await pod.http.get(path)).json()
            items = page.get("messages", page.get("runs"))
            assert len(items) == 2 and page["next_cursor"]
            assert (await pod.http.get(path, params={"limit": 5})).status_code == 200
            too_many = await pod.http.get(path, params={"limit": 6})
            assert too_many.status_code == 400
            assert "at most" in too_many.text or "from 1 to 5" in too_many.text
        for bad in (
            "x",
            "bTE6MTox",
            "cjE6MQ",
            "!!",
            "m1:1:0",
            "bTE6OTk5OTk5OTk5OTk5OTk5OTk5OTk6MA",
        ):
            resp = await pod.http.get(path, params={"cursor": bad})
            if resp.status_code == 200:  # a well-formed cursor of this route: a page
                continue
            assert resp.status_code == 400, (bad, resp.text)
            assert resp.json()["error"]["code"] in ("invalid_cursor", "invalid_request")
    # A cursor of one route is no cursor of the other.
    runs = (await pod.http.get(f"/threads/{thread}/runs", params={"limit": 1})).json()
    wrong = await pod.http.get(
        f"/threads/{thread}/messages", params={"cursor": runs["next_cursor"]}
    )
    assert wrong.status_code == 400 and wrong.json()["error"]["code"] == "invalid_cursor"


async def test_runs_pages_follow_the_cursor_and_the_old_before(pod: Pod) -> None:
    thread = unique()
    ids = [await stored_run(pod, thread, f"out {i}") for i in range(5)]
    listed: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = (await pod.http.get(f"/threads/{thread}/runs", params=params)).json()
        listed += [r["run_id"] for r in page["runs"]]
        for r in page["runs"]:
            assert r["output"] == f"out {ids.index(r['run_id'])}"
            assert set(r) >= {"status", "attempt", "executor", "created_at", "attempts", "error"}
        cursor = page["next_cursor"]
        if cursor is None:
            assert page["next_before"] is None
            break
        old = await pod.http.get(
            f"/threads/{thread}/runs", params={"limit": 2, "before": page["next_before"]}
        )
        assert [r["run_id"] for r in old.json()["runs"]] == [
            r["run_id"]
            for r in (
                await pod.http.get(f"/threads/{thread}/runs", params={"limit": 2, "cursor": cursor})
            ).json()["runs"]
        ]
    assert listed == list(reversed(ids))
    # The Python client pages through.
    assert [r["run_id"] for r in await pod.client.runs(thread, limit=None)] == listed
    assert [r["run_id"] for r in await pod.client.runs(thread, limit=3)] == listed[:3]


async def test_parts_only_for_messages_with_data_and_never_doubled(pod: Pod) -> None:
    thread = unique()
    await stored_run(pod, thread, "plain text reply")
    await stored_run(pod, thread, ["a ", ("tick", {"i": 1}), "b", "c"])
    messages = (await pod.http.get(f"/threads/{thread}/messages")).json()["messages"]
    by_role = [(m["role"], m["content"], m["parts"]) for m in messages]
    assert by_role == [
        (
            "assistant",
            "a bc",
            [
                {"type": "text", "text": "a "},
                {"type": "data", "name": "tick", "payload": {"i": 1}},
                {"type": "text", "text": "bc"},  # merged, as the store's reader merges them
            ],
        ),
        ("user", "hello", None),
        ("assistant", "plain text reply", None),  # was copied into parts: doubled
        ("user", "hello", None),
    ]


async def test_a_reply_shows_once_its_run_has_ended(pod: Pod) -> None:
    """As the store's reader: the reply of a run still going is not shown (it may be stored
    again); a stopped run's partial reply is, with its status."""
    thread = unique()
    going = await stored_run(pod, thread, None)
    await pod.runtime.store.store_reply(going, thread, 0, ["not final"], "complete")
    stopped = await stored_run(pod, thread, ["half", ("t", 1)], status="cancelled")
    async with pod.runtime.db.pool.connection() as conn:
        await conn.execute(
            "UPDATE threadgate.messages SET status = 'cancelled' WHERE run_id = %s", (stopped,)
        )
    page = (await pod.http.get(f"/threads/{thread}/messages")).json()["messages"]
    assert [(m["run_id"], m["role"]) for m in page] == [
        (stopped, "assistant"),
        (stopped, "user"),
        (going, "user"),
    ]
    listed = [(m["run_id"], m["role"], m["content"]) for m in page]
    assert listed == list(reversed(await old_order(pod, thread)))
    assert (going, "assistant", "not final") not in listed
    assert page[0]["status"] == "cancelled" and page[0]["content"] == "half"


SLICE = pages.SLICE_BYTES


def as_json(value: Any) -> Any:
    """What a JSON client reads of `value` (an escaped high and low surrogate read as one)."""
    return json.loads(json.dumps(value))


# A reply PostgreSQL cannot store as it is: stored escaped; every odd character a text may hold.
ODD = ["p1\x00 ", ("blob", {"s": "a\x00b", "u": "\ud800"}), "p2 \ud83d", "end", '😀é€"\\\n']


@pytest.mark.parametrize("size", ["small", "large"])
async def test_unstorable_text_comes_back_as_the_reply_was(pod: Pod, size: str) -> None:
    """Escaped content (NUL, lone surrogates) in /messages, /runs and GET of a run: the
    stored reply as the store reads it, small (read whole) and past a slice (read in pieces,
    an escape never cut)."""
    thread = unique()
    many = 1 if size == "small" else 3 * SLICE // 40
    reply: list[StoredPart] = [
        p if isinstance(p, str) else (p[0], {**p[1], "n": i}) for i in range(many) for p in ODD
    ]
    run_id = await stored_run(pod, thread, reply, user="ask \x00 \udfff")
    head = (await pages.message_heads(pod.runtime.db, thread, limit=2))[0]
    assert head.escaped and head.has_data and (head.size > SLICE) == (size == "large")
    want = [
        [m.run_id, m.role, m.content, m.parts] for m in await pod.runtime.store.messages(thread)
    ]
    resp = await pod.http.get(f"/threads/{thread}/messages")
    assert resp.status_code == 200
    page = resp.json()["messages"]
    got = [[m["run_id"], m["role"], m["content"], m["parts"]] for m in page]
    assert got == as_json(list(reversed(want)))
    assert page[0]["parts"] == as_json(merged(reply))
    assert page[1]["content"] == "ask \x00 \udfff" and page[1]["parts"] is None
    text = "".join(p for p in reply if isinstance(p, str))
    for path in (f"/threads/{thread}/runs/{run_id}", f"/threads/{thread}/runs"):
        body = (await pod.http.get(path)).json()
        run = body["runs"][0] if "runs" in body else body
        assert run["output"] == as_json(text)


async def test_replies_stored_before_layouts_are_read_from_their_parts(pod: Pod) -> None:
    """A reply stored as jsonb parts and no layout (rows from before): read as they are,
    small and past a slice (in ranges of whole parts)."""
    thread = unique()
    small = [{"type": "text", "text": "old "}, {"type": "data", "name": "d", "payload": [1]}]
    large = [{"type": "data", "name": "tick", "payload": {"i": i}} for i in range(20000)]
    ids = {}
    for name, parts in (("small", small), ("large", large), ("text", None)):
        ids[name] = await stored_run(pod, thread, "old ")
        async with pod.runtime.db.pool.connection() as conn:
            await conn.execute(
                "UPDATE threadgate.messages SET layout = NULL, parts = %s"
                " WHERE run_id = %s AND role = 'assistant'",
                (Jsonb(parts) if parts is not None else None, ids[name]),
            )
    heads = {
        h.run_id: h
        for h in await pages.message_heads(pod.runtime.db, thread, limit=9)
        if h.role == "assistant"
    }
    assert heads[ids["large"]].size > SLICE and heads[ids["small"]].size < SLICE
    page = (await pod.http.get(f"/threads/{thread}/messages")).json()["messages"]
    replies = {m["run_id"]: m for m in page if m["role"] == "assistant"}
    assert replies[ids["small"]]["parts"] == small
    assert replies[ids["large"]]["parts"] == large
    assert replies[ids["text"]]["parts"] is None
    assert all(m["content"] == "old " for m in replies.values())


@pytest.mark.parametrize("chars", ["x", "é", "€", "😀", 'q"\\\n\x01'])
async def test_values_past_a_slice_come_whole(pod: Pod, chars: str) -> None:
    """A value read in slices: characters of every width, JSON escapes, every byte there;
    text parts taken from the content as the layout says, across the content's slices."""
    thread = unique()
    text = (chars * (3 * SLICE // len(chars.encode()) + 7))[: 3 * SLICE // 2 + 3]
    text = "start " + text + " end"
    many: list[StoredPart] = []
    for i in range(20000):
        many += [("tick", {"i": i, "s": chars}), chars * (i % 3)]
    reply: list[StoredPart] = [text, *many]
    big = await stored_run(pod, thread, reply)
    small = await stored_run(pod, thread, "small")
    resp = await pod.http.get(f"/threads/{thread}/messages")
    messages = resp.json()["messages"]
    assert [m["run_id"] for m in messages] == [small, small, big, big]
    whole = "".join(p for p in reply if isinstance(p, str))
    got = messages[2]
    assert got["content"] == whole and got["parts"] == merged(reply)
    assert len(json.dumps(got["parts"])) > 2 * SLICE  # the parts too were read in slices
    runs = (await pod.http.get(f"/threads/{thread}/runs")).json()["runs"]
    assert [r["output"] for r in runs] == ["small", whole]
    one = (await pod.http.get(f"/threads/{thread}/runs/{big}")).json()
    assert one["output"] == whole and one["run_id"] == big and one["status"] == "success"
    assert {k: v for k, v in one.items() if k != "output"} == {
        k: v for k, v in runs[1].items() if k != "output"
    }


async def test_the_python_client_reads_the_conversation_in_order(pod: Pod) -> None:
    thread = unique()
    for i in range(4):
        await stored_run(pod, thread, f"r{i}", user=f"u{i}")
    everything = await old_order(pod, thread)
    assert conversation(await pod.client.messages(thread)) == everything
    assert conversation(await pod.client.messages(thread, limit=3)) == everything[-3:]
    page = await pod.client.messages_page(thread, limit=2)
    assert conversation(page["messages"]) == list(reversed(everything))[:2]
    older = await pod.client.messages_page(thread, limit=2, cursor=page["next_cursor"])
    assert conversation(older["messages"]) == list(reversed(everything))[2:4]


async def test_pages_read_only_the_readers_threads(pod: Pod) -> None:
    thread = unique()
    await stored_run(pod, thread, "alice's", owner="alice")
    with pod_settings(pod, **AUTH_ON):
        for path in (f"/threads/{thread}/messages", f"/threads/{thread}/runs"):
            assert (await pod.http.get(path, headers=key("bob"))).status_code == 404
            mine = await pod.http.get(path, headers=key("alice"))
            assert mine.status_code == 200 and "alice's" in mine.text
            # A cursor carries no authority: bob's cursor on alice's thread is still a 404.
            cursor = (await pod.http.get(path, headers=key("alice"), params={"limit": 1})).json()[
                "next_cursor"
            ]
            if cursor:
                resp = await pod.http.get(path, headers=key("bob"), params={"cursor": cursor})
                assert resp.status_code == 404


async def test_concurrent_readers_of_a_thread_being_written(pod: Pod) -> None:
    """Pages read while runs are added: each page is consistent, nothing is listed twice."""
    thread = unique()
    for _ in range(5):
        await stored_run(pod, thread, "r")

    async def reader() -> list[tuple[str, str, str]]:
        return conversation(await pod.client.messages(thread))

    writer = asyncio.gather(*(stored_run(pod, thread, "w") for _ in range(5)))
    lists = await asyncio.gather(*(reader() for _ in range(5)), writer)
    for listed in lists[:5]:
        assert len(listed) == len(set(listed))
