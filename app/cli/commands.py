"""The client commands: `post`, `attach`, `runs`, `run`, `messages`, `cancel`, `adopt`.

They find their pods (--url, $THREADGATE_URL, a running `threadgate dev`'s urls file) and
print one line to stderr on failure, with a documented exit status (app/cli/exits.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import show
from .exits import (
    OK,
    REFUSED,
    RUN_ERROR,
    RUN_STOPPED,
    SERVER_ERROR,
    UNREACHABLE,
    USAGE,
    CliError,
)

DEFAULT_URL = "http://localhost:8000"
URLS_FILE = Path(".threadgate") / "urls"  # written by `threadgate dev` once its pods are ready


def find_urls_file(start: Path) -> Path | None:
    """`.threadgate/urls` in `start` or the nearest directory above it that has one."""
    for directory in (start, *start.parents):
        candidate = directory / URLS_FILE
        if candidate.is_file():
            return candidate
    return None


def resolve_urls(given: str | None) -> tuple[list[str], str]:
    """The pods to talk to, and where they came from: --url, $THREADGATE_URL, the urls file
    of a running `threadgate dev`, or the default. Several may be given, comma-separated."""

    def split(text: str) -> list[str]:
        return [u.strip().rstrip("/") for u in text.replace("\n", ",").split(",") if u.strip()]

    if given:
        return checked(split(given), "--url"), "--url"
    # The CLI is a person's tool: its defaults may come from their shell.
    if os.environ.get("THREADGATE_URL"):
        urls = checked(split(os.environ["THREADGATE_URL"]), "$THREADGATE_URL")
        return urls, "$THREADGATE_URL"
    found = find_urls_file(Path.cwd())
    if found is not None and (urls := split(found.read_text())):
        return urls, str(found)
    return [DEFAULT_URL], "the default URL; is `threadgate dev` running?"


def checked(urls: list[str], source: str) -> list[str]:
    """A URL without http:// or https:// is a usage mistake (httpx would call it an
    unsupported protocol, or take `localhost:8001` for a scheme), not an unreachable pod."""
    for url in urls:
        if not re.match(r"^https?://[^/\s]", url, re.IGNORECASE):
            hint = f"; did you mean http://{url}?" if "://" not in url else ""
            raise CliError(f"{source}: {url!r} is not an http:// or https:// URL{hint}", USAGE)
    return urls


THREAD_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")


def thread_id(text: str) -> str:
    """A thread id as the server takes it (it becomes part of a NATS subject), checked before
    anything is sent: `post "" hi` and `messages x/y` would meet no route and get 404."""
    if not THREAD_ID.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a thread id: 1 to 128 of A-Z a-z 0-9 _ - (no . / * > or spaces)"
        )
    return text


def parse_option(text: str) -> tuple[str, Any]:
    """`key=value`; the value is JSON when it parses (3, true, {"a": 1}), else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        return key.strip(), json.loads(value)
    except ValueError:
        return key.strip(), value


def _emit(args: argparse.Namespace, obj: Any, text: str) -> None:
    print(json.dumps(obj, ensure_ascii=False, default=str) if args.json else text)


ClientFn = Callable[[argparse.Namespace, Any], Awaitable[int]]


def run_client(args: argparse.Namespace, fn: ClientFn, *, one_pod: bool = False) -> int:
    """Run a client command; the server's and the network's failures become CliErrors."""
    import httpx

    from ..client import AsyncClient, ThreadgateError, Unreachable

    urls, source = resolve_urls(args.url)
    if one_pod:
        urls = urls[:1]
    token = args.token or os.environ.get("THREADGATE_TOKEN")

    async def main() -> int:
        async with AsyncClient(urls, token=token) as client:
            return await fn(args, client)

    try:
        return asyncio.run(main())
    except ThreadgateError as exc:
        status = SERVER_ERROR if exc.status >= 500 else REFUSED
        code = f"{exc.code}, " if exc.code else ""
        raise CliError(f"{exc.message} ({code}HTTP {exc.status})", status) from None
    except Unreachable as exc:
        where = ", ".join(urls)
        raise CliError(f"cannot reach {where} ({source}): {exc.reason}", UNREACHABLE) from None
    except httpx.HTTPError as exc:
        where = ", ".join(urls)
        raise CliError(f"cannot reach {where} ({source}): {exc!r}", UNREACHABLE) from None
    except (ValueError, KeyError, TypeError) as exc:  # an answer this client cannot read
        raise CliError(f"unexpected answer from {', '.join(urls)}: {exc!r}") from None


def _reply_json(thread: str, reply: Any) -> dict[str, Any]:
    return {
        "thread_id": thread,
        "run_id": reply.run_id,
        "status": reply.status,
        "attempt": reply.attempt,
        "text": reply.text,
        "parts": [
            {"type": "text", "text": p.text}
            if p.type == "text"
            else {"type": "data", "name": p.name, "payload": p.payload}
            for p in reply.parts
        ],
        "error": reply.error,
        "resets": reply.resets,
    }


async def _follow(args: argparse.Namespace, client: Any, *, wait: bool) -> int:
    """Print the thread's latest run as it streams (or, with --json, its outcome at the end);
    the exit status says how the run ended."""
    from ..client import Reply

    reply = Reply()
    retries = len(client.urls) - 1  # each pod once before saying none answers
    if args.json:
        async for ev in client.events(args.thread, wait=wait, connect_retries=retries):
            reply.apply(ev)
    else:
        last = ""
        async for piece in client.attach(
            args.thread, wait=wait, connect_retries=retries, reply=reply
        ):
            sys.stdout.write(piece)
            sys.stdout.flush()
            last = piece or last
        if last and not last.endswith("\n"):
            print()  # end the reply's line (a data part already ended its own)
    if reply.run_id is None:
        raise CliError(
            f"thread {args.thread} has no run (post one, or attach with --wait)", REFUSED
        )
    if args.json:
        print(json.dumps(_reply_json(args.thread, reply), ensure_ascii=False, default=str))
    if reply.status == "success":
        return OK
    if reply.status == "error":
        err = reply.error or {}
        detail = f"{err.get('message', '')} ({err.get('code', 'error')})"
        print(f"threadgate: run {reply.run_id} ended in error: {detail}", file=sys.stderr)
        return RUN_ERROR
    if reply.status in ("cancelled", "interrupted"):
        print(f"threadgate: run {reply.run_id} was {reply.status}", file=sys.stderr)
        return RUN_STOPPED
    raise CliError(f"the stream of run {reply.run_id} ended before the run did", UNREACHABLE)


async def _post(args: argparse.Namespace, client: Any) -> int:
    accepted = await client.post(
        args.thread,
        args.text,
        strategy=args.strategy,
        model_options=dict(args.option),
        idempotency_key=args.idempotency_key,
    )
    line = f"run {accepted['run_id']} accepted ({accepted['status']})"
    if not args.attach:
        _emit(args, accepted, line)
        return OK
    if not args.json:
        print(line, file=sys.stderr)
    return await _follow(args, client, wait=True)


async def _attach(args: argparse.Namespace, client: Any) -> int:
    return await _follow(args, client, wait=args.wait)


async def _page(args: argparse.Namespace, read: Any, items: str) -> list[dict[str, Any]]:
    """One page (newest first) as --limit and --cursor say; where the next one starts goes
    to stderr."""
    page = await read(args.thread, limit=args.limit, cursor=args.cursor)
    if page.get("next_cursor"):
        print(f"older {items}: --cursor {page['next_cursor']}", file=sys.stderr)
    return list(page[items])


async def _runs(args: argparse.Namespace, client: Any) -> int:
    runs = await _page(args, client.runs_page, "runs")
    if args.json:
        _emit(args, runs, "")
        return OK
    if not runs:
        print(f"thread {args.thread} has no run", file=sys.stderr)
        return OK
    print("\n".join(show.runs_table(runs)))
    return OK


async def _run(args: argparse.Namespace, client: Any) -> int:
    run = await client.run(args.thread, args.run_id)
    _emit(args, run, "\n".join(show.run_lines(run)))
    return OK


async def _messages(args: argparse.Namespace, client: Any) -> int:
    if args.limit is None and args.cursor is None:
        messages = await client.messages(args.thread)  # the whole conversation, in order
    else:
        messages = list(reversed(await _page(args, client.messages_page, "messages")))
    if args.json:
        _emit(args, messages, "")
        return OK
    replied = {m["run_id"] for m in messages if m["role"] == "assistant"}
    waiting = [m["run_id"] for m in messages if m["role"] == "user" and m["run_id"] not in replied]
    # A run without a stored reply: its status says why (an error, still running, ...).
    limit = asyncio.Semaphore(8)

    async def status(run_id: str) -> dict[str, Any]:
        async with limit:
            return dict(await client.run(args.thread, run_id))

    found = await asyncio.gather(*(status(r) for r in waiting))
    runs = dict(zip(waiting, found, strict=True))
    print("\n".join(show.conversation(messages, runs)))
    return OK


async def _cancel(args: argparse.Namespace, client: Any) -> int:
    run = await client.cancel(args.thread, args.run_id, wait=not args.no_wait)
    _emit(args, run, f"run {run['run_id']}: {run['status']}")
    return OK


async def _adopt(args: argparse.Namespace, client: Any) -> int:
    body = await client._call("GET", "/admin/stranded")
    if not args.json:
        print(
            f"pod {body['pod']} (version {body['app_version']}): {len(body['runs'])} stranded runs"
        )
        for r in body["runs"]:
            ok = "ok" if r["compatible"] else "STEPS DIFFER"
            print(f"  {r['run_id']}  version {r['app_version']}  steps {r['steps']}  {ok}")
    if args.dry_run or not body["runs"]:
        if args.json:
            _emit(args, body, "")
        return OK
    result = await client._call(
        "POST", "/admin/stranded/adopt", params={"force": args.force}, timeout=60
    )
    _emit(args, result, f"adopted {len(result['adopted'])}, refused {len(result['refused'])}")
    return OK if not result["refused"] else REFUSED


if TYPE_CHECKING:
    Sub = argparse._SubParsersAction[Any]  # what add_subparsers() gives


def client_cmd(
    sub: Sub, name: str, help: str, fn: ClientFn, *, thread: bool = True, one_pod: bool = False
) -> argparse.ArgumentParser:
    c: argparse.ArgumentParser = sub.add_parser(name, help=help, description=help)
    c.add_argument(
        "--url",
        default=None,
        help="pod URL(s), comma-separated (default: $THREADGATE_URL, else the "
        f"{URLS_FILE} of a running `threadgate dev`, else {DEFAULT_URL})",
    )
    c.add_argument("--token", default=None, help="bearer token (default $THREADGATE_TOKEN)")
    c.add_argument("--json", action="store_true", help="print JSON, for scripts")
    if thread:
        c.add_argument("thread", type=thread_id)
    c.set_defaults(fn=lambda args: run_client(args, fn, one_pod=one_pod))
    return c


def add_parsers(sub: Sub) -> None:
    """The client commands' parsers."""
    post = client_cmd(sub, "post", "post a message to a thread", _post)
    post.add_argument("text")
    post.add_argument("--attach", action="store_true", help="print the reply as it streams")
    post.add_argument(
        "--strategy",
        choices=["enqueue", "reject", "interrupt"],
        default="enqueue",
        help="when the thread has an active run (default enqueue)",
    )
    post.add_argument(
        "-o",
        "--option",
        type=parse_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a model option (JSON value or string), e.g. -o chunks=200 -o delay_ms=50",
    )
    post.add_argument("--idempotency-key", default=None)
    attach = client_cmd(sub, "attach", "print the thread's latest reply as it streams", _attach)
    attach.add_argument(
        "--wait", action="store_true", help="wait for the thread's first run if it has none"
    )
    runs = client_cmd(sub, "runs", "list a thread's runs (newest first), a page at a time", _runs)
    run = client_cmd(
        sub,
        "run",
        "a run's status and what each attempt did to the reply (continued, regenerated)",
        _run,
    )
    run.add_argument("run_id")
    messages = client_cmd(
        sub,
        "messages",
        "print a thread's conversation (data parts, and why a run has no reply); with --limit"
        " or --cursor, one page of its latest messages, in order",
        _messages,
    )
    for paged in (runs, messages):
        paged.add_argument(
            "--limit",
            type=int,
            default=None,
            help="items in the page (default: the server's, 50; at most its maximum, 200)",
        )
        paged.add_argument(
            "--cursor", default=None, help="the page after this one (printed with each page)"
        )
    cancel = client_cmd(sub, "cancel", "cancel a queued or running run", _cancel)
    cancel.add_argument("run_id")
    cancel.add_argument("--no-wait", action="store_true", help="answer before it has stopped")
    adopt = client_cmd(
        sub,
        "adopt",
        "move runs stranded on a pod by another app version to its version",
        _adopt,
        thread=False,
        one_pod=True,
    )
    adopt.add_argument("--dry-run", action="store_true", help="only list them")
    adopt.add_argument("--force", action="store_true", help="adopt even if their steps differ")
