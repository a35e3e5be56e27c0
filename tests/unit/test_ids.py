from __future__ import annotations

import pytest
from threadgate.errors import InvalidThreadId, RunNotFound
from threadgate.ids import check_run_id, check_thread_id, message_id, new_run_id

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("good", ["a", "demo", "A-b_9", "x" * 128])
def test_good_thread_ids(good: str) -> None:
    assert check_thread_id(good) == good


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "a.b",
        "a*",
        ">",
        "a b",
        "x" * 129,
        "a\n",
        "a\x00",
        "caf\u00e9",
        "\u0430bc",
        "a%2Eb",
        "a/b",
        "a\t",
    ],
)
def test_bad_thread_ids(bad: str) -> None:
    with pytest.raises(InvalidThreadId):
        check_thread_id(bad)


def test_run_ids() -> None:
    rid = new_run_id()
    assert check_run_id(rid) == rid
    with pytest.raises(RunNotFound):
        check_run_id("nope")


def test_message_id_carries_the_attempt() -> None:
    assert message_id("r", 2, "done") != message_id("r", 3, "done")


def test_the_same_message_gets_the_same_id() -> None:
    """JetStream drops a republished message only if its id is the one it stored: a publish
    retried after a lost ack (or a NATS restart) must carry exactly the same id."""
    run = new_run_id()
    for part in ("start", 0, 7, "done"):
        assert message_id(run, 2, part) == message_id(run, 2, part)
    ids = {message_id(run, a, p) for a in (1, 2) for p in ("start", 0, 1, "done")}
    assert len(ids) == 8  # and different parts or attempts never collide
    assert message_id(run, 1, 0) != message_id(new_run_id(), 1, 0)
