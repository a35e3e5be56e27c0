"""Authentication and thread ownership end to end, on the session's pod with auth switched on."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from threadgate.client import AsyncClient, Reply, parse_sse
from threadgate.models.mock import mock_reply

from tests.conftest import unique
from tests.integration.conftest import Pod
from tests.integration.knobs import AUTH_ON, KEYS, bearer, jwt_token, key, pod_settings

pytestmark = pytest.mark.integration

UNAUTHORIZED = {"error": {"code": "unauthorized", "message": "a valid bearer token is required"}}
RUN_NOT_FOUND = "00000000-0000-4000-8000-000000000000"


@pytest.fixture
def auth_on(pod: Pod) -> Iterator[None]:
    with pod_settings(pod, **AUTH_ON):
        yield


def client(pod: Pod, name: str) -> AsyncClient:
    return AsyncClient(pod.url, token=KEYS[name])


async def post(
    pod: Pod,
    thread: str,
    who: str,
    chunks: int = 3,
    idempotency_key: str | None = None,
    **options: Any,
) -> httpx.Response:
    body = {"input": f"hi from {who}", "model_options": {"chunks": chunks, **options}}
    headers = key(who) | ({"Idempotency-Key": idempotency_key} if idempotency_key else {})
    return await pod.http.post(f"/threads/{thread}/runs", json=body, headers=headers)


async def attach_events(
    pod: Pod,
    thread: str,
    headers: dict[str, str] | None = None,
    params: dict[str, str] | None = None,
) -> tuple[int, Reply]:
    """Status and reply of one attach, read to its end."""
    reply = Reply()
    async with pod.http.stream(
        "GET", f"/threads/{thread}/attach", headers=headers or {}, params=params or {}
    ) as resp:
        if resp.status_code != 200:
            await resp.aread()
            return resp.status_code, reply
        async for ev in parse_sse(resp.aiter_lines()):
            reply.apply(ev)
            if ev.event == "done":
                break
    return 200, reply


def thread_routes(thread: str, run_id: str) -> list[tuple[str, str]]:
    return [
        ("POST", f"/threads/{thread}/runs"),
        ("GET", f"/threads/{thread}/runs"),
        ("GET", f"/threads/{thread}/runs/{run_id}"),
        ("POST", f"/threads/{thread}/runs/{run_id}/cancel"),
        ("GET", f"/threads/{thread}/messages"),
        ("GET", f"/threads/{thread}/attach"),
        ("GET", "/admin/stranded"),
        ("POST", "/admin/stranded/adopt"),
    ]


async def test_no_credential_is_401_everywhere(pod: Pod, auth_on: None) -> None:
    thread = unique()
    expired = jwt_token("alice", ttl=-3600)
    wrong_aud = jwt_token("alice", aud="someone-else")
    bad_sig = jwt_token("alice")[:-3] + "AAA"
    for method, path in thread_routes(thread, RUN_NOT_FOUND):
        for headers in (
            {},
            bearer("not-a-key"),
            bearer(expired),
            bearer(wrong_aud),
            bearer(bad_sig),
            {"Authorization": f"Basic {KEYS['alice']}"},
            {"Authorization": "Bearer"},
        ):
            resp = await pod.http.request(
                method, path, headers=headers, json={"input": "hi"} if method == "POST" else None
            )
            assert resp.status_code == 401, (method, path, headers, resp.text)
            # No hint of the cause: every failure reads the same.
            assert resp.json() == UNAUTHORIZED
            assert resp.headers["www-authenticate"] == "Bearer"
    # 401 comes before the thread id is even looked at.
    assert (await pod.http.get("/threads/a.b/runs")).status_code == 401
    assert not await pod.runtime.store.thread_exists(thread)


async def test_public_routes_stay_public(pod: Pod, auth_on: None) -> None:
    for path in ("/healthz", "/readyz", "/metrics", "/docs", "/openapi.json", "/"):
        resp = await pod.http.get(path)
        assert resp.status_code == 200, (path, resp.status_code)


async def test_owner_reads_and_writes_own_thread(pod: Pod, auth_on: None) -> None:
    thread = unique()
    resp = await post(pod, thread, "alice")
    assert resp.status_code == 202, resp.text
    assert await pod.runtime.store.thread_owner(thread) == "alice"
    async with client(pod, "alice") as alice:
        reply = await alice.reply(thread)
        assert reply.text == mock_reply(3)
        assert [r["run_id"] for r in await alice.runs(thread)] == [resp.json()["run_id"]]
        assert len(await alice.messages(thread)) == 2
    second = await post(pod, thread, "alice")
    assert second.status_code == 202


async def test_someone_elses_thread_is_404(pod: Pod, auth_on: None) -> None:
    thread = unique()
    run = (await post(pod, thread, "alice", chunks=200, delay_ms=20)).json()
    run_id = run["run_id"]
    missing = unique()
    bob = key("bob")
    # Run-level routes answer exactly as for a run that does not exist.
    for path in (f"/threads/{thread}/runs/{run_id}", f"/threads/{missing}/runs/{run_id}"):
        resp = await pod.http.get(path, headers=bob)
        assert resp.status_code == 404
        assert resp.json()["error"]["code"] == "run_not_found"
    theirs = await pod.http.get(f"/threads/{thread}/runs/{run_id}", headers=bob)
    nothing = await pod.http.get(f"/threads/{missing}/runs/{RUN_NOT_FOUND}", headers=bob)
    assert theirs.json() == nothing.json()
    for resp in (
        await pod.http.post(f"/threads/{thread}/runs/{run_id}/cancel", headers=bob),
        await pod.http.post(f"/threads/{thread}/runs/{run_id}/cancel?wait=true", headers=bob),
    ):
        assert resp.status_code == 404 and resp.json() == nothing.json()
    # Thread-level routes: 404 thread_not_found.
    for resp in (
        await pod.http.get(f"/threads/{thread}/runs", headers=bob),
        await pod.http.get(f"/threads/{thread}/messages", headers=bob),
        await pod.http.get(f"/threads/{thread}/attach", headers=bob),
        await pod.http.get(f"/threads/{thread}/attach", params={"access_token": KEYS["bob"]}),
        await post(pod, thread, "bob"),
        await post(pod, thread, "bob", idempotency_key="k"),
    ):
        assert resp.status_code == 404, resp.text
        assert resp.json() == {"error": {"code": "thread_not_found", "message": "No such thread."}}
    # Nothing of bob's landed on alice's thread, and her run was not cancelled.
    async with client(pod, "alice") as alice:
        runs = await alice.runs(thread)
        assert [r["run_id"] for r in runs] == [run_id]
        assert runs[0]["status"] in ("pending", "running")
        await alice.cancel(thread, run_id, wait=True)
    # A thread that does not exist reads as empty: it is free to be created.
    empty = await pod.http.get(f"/threads/{missing}/attach?wait=false", headers=bob)
    assert empty.status_code == 204
    assert (await pod.http.get(f"/threads/{missing}/runs", headers=bob)).json()["runs"] == []


async def test_idempotency_key_does_not_leak_across_principals(pod: Pod, auth_on: None) -> None:
    thread = unique()
    headers = {**key("alice"), "Idempotency-Key": "same"}
    body = {"input": "x", "model_options": {"chunks": 1}}
    first = await pod.http.post(f"/threads/{thread}/runs", json=body, headers=headers)
    assert first.status_code == 202
    repeat = await pod.http.post(
        f"/threads/{thread}/runs", json=body, headers={**key("bob"), "Idempotency-Key": "same"}
    )
    assert repeat.status_code == 404  # not alice's run handed to bob


async def test_admin_reads_everything_but_writes_nothing(pod: Pod, auth_on: None) -> None:
    thread = unique()
    run_id = (await post(pod, thread, "alice", chunks=4)).json()["run_id"]
    async with client(pod, "root") as root:
        reply = await root.reply(thread)
        assert reply.run_id == run_id and reply.text == mock_reply(4)
        assert (await root.run(thread, run_id))["status"] == "success"
        assert [r["run_id"] for r in await root.runs(thread)] == [run_id]
        assert len(await root.messages(thread)) == 2
    assert (await post(pod, thread, "root")).status_code == 404
    resp = await pod.http.post(f"/threads/{thread}/runs/{run_id}/cancel", headers=key("root"))
    assert resp.status_code == 404
    # Operator routes: admins only.
    assert (await pod.http.get("/admin/stranded", headers=key("root"))).status_code == 200
    forbidden = await pod.http.get("/admin/stranded", headers=key("alice"))
    assert forbidden.status_code == 403
    assert forbidden.json()["error"]["code"] == "forbidden"


async def test_jwt_principal(pod: Pod, auth_on: None) -> None:
    thread = unique()
    carol = bearer(jwt_token("carol"))
    resp = await pod.http.post(
        f"/threads/{thread}/runs",
        json={"input": "hi", "model_options": {"chunks": 2}},
        headers=carol,
    )
    assert resp.status_code == 202
    assert await pod.runtime.store.thread_owner(thread) == "carol"
    status, reply = await attach_events(pod, thread, carol)
    assert status == 200 and reply.text == mock_reply(2)
    # The same principal by another credential (a fresh token) is the same owner.
    status, _ = await attach_events(pod, thread, bearer(jwt_token("carol", jti="2")))
    assert status == 200
    assert (await attach_events(pod, thread, key("alice")))[0] == 404


async def test_access_token_query_on_attach_only(pod: Pod, auth_on: None) -> None:
    thread = unique()
    await post(pod, thread, "alice", chunks=2)
    status, reply = await attach_events(pod, thread, params={"access_token": KEYS["alice"]})
    assert status == 200 and reply.text == mock_reply(2)
    token = jwt_token("alice")
    assert (await attach_events(pod, thread, params={"access_token": token}))[0] == 200
    for method, path in (
        ("GET", f"/threads/{thread}/runs"),
        ("GET", f"/threads/{thread}/messages"),
        ("POST", f"/threads/{thread}/runs"),
    ):
        resp = await pod.http.request(
            method,
            path,
            params={"access_token": KEYS["alice"]},
            json={"input": "x"} if method == "POST" else None,
        )
        assert resp.status_code == 401, (method, path)
    # A header, when present, decides (even a bad one).
    bad = await pod.http.get(
        f"/threads/{thread}/attach",
        params={"access_token": KEYS["alice"]},
        headers=bearer("wrong"),
    )
    assert bad.status_code == 401


async def test_first_post_race_has_one_owner(pod: Pod, auth_on: None) -> None:
    """Two principals create the same thread at once: one owns it, the other gets 404."""
    for _ in range(8):
        thread = unique()
        alice, bob = await asyncio.gather(
            post(pod, thread, "alice", chunks=1), post(pod, thread, "bob", chunks=1)
        )
        assert sorted([alice.status_code, bob.status_code]) == [202, 404]
        winner = "alice" if alice.status_code == 202 else "bob"
        assert await pod.runtime.store.thread_owner(thread) == winner
        runs = await pod.runtime.store.list_runs(thread)
        assert len(runs) == 1


async def test_streams_never_cross(pod: Pod, auth_on: None) -> None:
    """Concurrent runs of two principals: each attach sees only its own thread's runs."""
    alice_threads = [unique("a") for _ in range(3)]
    bob_threads = [unique("b") for _ in range(3)]
    owners = {t: "alice" for t in alice_threads} | {t: "bob" for t in bob_threads}
    run_ids: dict[str, set[str]] = {"alice": set(), "bob": set()}
    for round_ in range(2):
        accepted = await asyncio.gather(
            *(post(pod, t, who, chunks=15, delay_ms=2) for t, who in owners.items())
        )
        for (_t, who), resp in zip(owners.items(), accepted, strict=True):
            assert resp.status_code == 202, (round_, resp.text)
            run_ids[who].add(resp.json()["run_id"])
        results = await asyncio.gather(
            *(attach_events(pod, t, key(who)) for t, who in owners.items()),
            *(
                attach_events(pod, t, key("bob" if who == "alice" else "alice"))
                for t, who in owners.items()
            ),
        )
        own, crossed = results[: len(owners)], results[len(owners) :]
        for (_t, who), (status, reply) in zip(owners.items(), own, strict=True):
            assert status == 200
            seen = {ev.data["run_id"] for ev in reply.events}
            assert seen and seen <= run_ids[who], (who, seen)
            assert reply.text == mock_reply(15)
        assert all(status == 404 and not reply.events for status, reply in crossed)


async def test_auth_off_is_open(pod: Pod) -> None:
    """Threads created with auth on stay readable and writable when auth is turned off."""
    thread = unique()
    with pod_settings(pod, **AUTH_ON):
        assert (await post(pod, thread, "alice", chunks=1)).status_code == 202
    resp = await pod.http.post(
        f"/threads/{thread}/runs", json={"input": "open", "model_options": {"chunks": 1}}
    )
    assert resp.status_code == 202
    assert len((await pod.http.get(f"/threads/{thread}/runs")).json()["runs"]) == 2
    assert await pod.runtime.store.thread_owner(thread) == "alice"


async def test_a_thread_created_with_auth_off_is_admin_only_once_auth_is_on(pod: Pod) -> None:
    """docs/security.md: a thread created while auth was off has no owner; once auth is on,
    only admins read it, nobody writes to it, and it is 404 to everyone else."""
    thread = unique()
    resp = await pod.http.post(
        f"/threads/{thread}/runs", json={"input": "open", "model_options": {"chunks": 2}}
    )
    assert resp.status_code == 202
    run_id = resp.json()["run_id"]
    assert await pod.runtime.store.thread_owner(thread) == ""
    with pod_settings(pod, **AUTH_ON):
        async with client(pod, "root") as root:
            assert [r["run_id"] for r in await root.runs(thread)] == [run_id]
            assert (await root.reply(thread)).text == mock_reply(2)
        for who in ("alice", "bob"):
            got = await pod.http.get(f"/threads/{thread}/runs", headers=key(who))
            assert got.status_code == 404, (who, got.text)
            assert (await post(pod, thread, who)).status_code == 404
        assert (await post(pod, thread, "root")).status_code == 404  # admins only read
