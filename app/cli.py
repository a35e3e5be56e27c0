"""`threadgate serve | dev | post | attach | runs | messages | cancel | adopt`: the pod, the
embedded stack, and a client for people and scripts.

The client commands print one line to stderr on failure and exit with a documented status
(README, "The CLI"): see `EXIT`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from .errors import ConfigError

DEFAULT_URL = "http://localhost:8000"
URLS_FILE = Path(".threadgate") / "urls"  # written by `threadgate dev` once its pods are ready

# Exit statuses (the README's table says the same).
OK = 0  # done; a followed run ended `success`
FAILED = 1  # anything else that went wrong (said in one line)
USAGE = 2  # bad arguments; `threadgate dev`: a port in use, a stack already running
UNREACHABLE = 3  # no pod answered (refused, timed out)
REFUSED = 4  # the server refused the request (4xx), or the thread has no run to attach to
SERVER_ERROR = 5  # the server failed (5xx, or 503 from every pod)
RUN_ERROR = 6  # the run ended `error`
RUN_STOPPED = 7  # the run was `cancelled` or `interrupted`
EXIT = {
    OK: "success",
    FAILED: "other failure",
    USAGE: "usage",
    UNREACHABLE: "no pod answered",
    REFUSED: "request refused (4xx) or no run",
    SERVER_ERROR: "server error (5xx)",
    RUN_ERROR: "run ended in error",
    RUN_STOPPED: "run cancelled or interrupted",
}


class CliError(Exception):
    """A failure to report in one line, with its exit status."""

    def __init__(self, message: str, status: int = FAILED) -> None:
        super().__init__(message)
        self.status = status


def _set_title(pod_name: str) -> None:
    """`ps` shows `threadgate serve <pod>`: how `threadgate dev kill` and people find a pod."""
    from setproctitle import setproctitle

    from .supervisor import POD_TITLE

    setproctitle(POD_TITLE.format(name=pod_name))


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .logs import setup_logging
    from .main import begin_drain, create_app
    from .server import guarded_http
    from .settings import load_settings

    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"threadgate: {exc.message}", file=sys.stderr)
        return 2
    _set_title(settings.pod_name)
    setup_logging(
        settings.pod_name,
        json_lines=settings.json_logs,
        level=settings.log_level,
        secrets=settings.secret_values(),
    )
    try:
        app = create_app(settings)
    except ConfigError as exc:
        print(f"threadgate: {exc.message}", file=sys.stderr)
        return 2
    rt = app.state.runtime

    class PodServer(uvicorn.Server):
        """On SIGTERM: stop taking runs, let in-flight replies finish, then exit."""

        draining: asyncio.Task[None] | None = None

        def handle_exit(self, sig: int, frame: Any) -> None:
            if sig == signal.SIGTERM and self.draining is None and rt.launched:
                loop = asyncio.get_event_loop()

                def start() -> None:
                    async def drain_then_exit() -> None:
                        await begin_drain(rt)
                        super(PodServer, self).handle_exit(sig, frame)
                        # uvicorn re-raises captured signals on exit; a drained pod exits 0.
                        self._captured_signals.remove(sig)

                    self.draining = loop.create_task(drain_then_exit())

                loop.call_soon_threadsafe(start)
                return
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        workers=1,
        lifespan="on",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=2,
        timeout_keep_alive=75,
        http=guarded_http(settings),  # deadlines for a request's head and body (app/server.py)
    )
    server = PodServer(config)
    server.run()
    if not server.started:
        # uvicorn returns normally when start-up fails; a failed pod must not look clean.
        print("threadgate: start-up failed (see the log above)", file=sys.stderr)
        return 1
    return 0


def _dev(args: argparse.Namespace) -> int:
    from .supervisor import DevError, DevStack, clean_state, find_pod

    state = Path(args.state_dir)
    try:
        if args.action == "kill":
            pid = find_pod(state, args.name)
            sig = signal.Signals[f"SIG{args.signal}"]
            os.kill(pid, sig)
            print(f"sent {sig.name} to {args.name} (pid {pid}); threadgate dev starts it again")
            return OK
        if args.action == "clean":
            clean_state(state)
            print(f"removed {state} and its PostgreSQL data")
            return OK
        return DevStack(
            state, pods=args.pods, port=args.port, pg_port=args.pg_port, nats_port=args.nats_port
        ).run()
    except DevError as exc:
        raise CliError(f"dev: {exc}", exc.status) from None
    except subprocess.CalledProcessError as exc:
        detail = (exc.stderr or b"").decode(errors="replace").strip().splitlines()
        raise CliError(f"dev: {exc}{': ' + detail[-1] if detail else ''}") from None
    except (RuntimeError, TimeoutError, OSError) as exc:
        raise CliError(f"dev: {exc}") from None


# ---- the client commands -------------------------------------------------------------------


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
        return split(given), "--url"
    # The CLI is a person's tool: its defaults may come from their shell.
    if os.environ.get("THREADGATE_URL"):
        return split(os.environ["THREADGATE_URL"]), "$THREADGATE_URL"
    found = find_urls_file(Path.cwd())
    if found is not None and (urls := split(found.read_text())):
        return urls, str(found)
    return [DEFAULT_URL], "the default URL; is `threadgate dev` running?"


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


def _client(args: argparse.Namespace, fn: ClientFn, *, one_pod: bool = False) -> int:
    """Run a client command; the server's and the network's failures become CliErrors."""
    import httpx

    from .client import AsyncClient, ThreadgateError, Unreachable

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
    from .client import Reply

    reply = Reply()
    retries = len(client.urls) - 1  # each pod once before saying none answers
    if args.json:
        async for ev in client.events(args.thread, wait=wait, connect_retries=retries):
            reply.apply(ev)
    else:
        printed = False
        async for piece in client.attach(
            args.thread, wait=wait, connect_retries=retries, reply=reply
        ):
            sys.stdout.write(piece)
            sys.stdout.flush()
            printed = True
        if printed:
            print()
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
    print(f"{'run_id':<38} {'status':<12} {'attempt':>7}  executor")
    for r in runs:
        print(f"{r['run_id']:<38} {r['status']:<12} {r['attempt']:>7}  {r['executor'] or '-'}")
    return OK


async def _messages(args: argparse.Namespace, client: Any) -> int:
    if args.limit is None and args.cursor is None:
        messages = await client.messages(args.thread)  # the whole conversation, in order
    else:
        messages = list(reversed(await _page(args, client.messages_page, "messages")))
    if args.json:
        _emit(args, messages, "")
        return OK
    for m in messages:
        status = "" if m["status"] in ("complete", "success") else f" [{m['status']}]"
        print(f"{m['role']:>9}{status}: {m['content']}")
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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="threadgate",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="exit statuses: " + "; ".join(f"{k} {v}" for k, v in EXIT.items()),
    )
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run one pod, configured by the environment").set_defaults(
        fn=_serve
    )

    dev = sub.add_parser(
        "dev",
        help="embedded PostgreSQL + nats-server and N supervised pods",
        description="Start PostgreSQL, nats-server and N pods (threadgate-0..N-1); a pod that "
        "dies is started again under its name and port. Ctrl-C stops everything.",
    )
    dev.add_argument("--pods", type=int, default=1, help="how many pods (default 1)")
    dev.add_argument(
        "--port", type=int, default=8000, help="first pod's port, then +1 each (0: any free port)"
    )
    dev.add_argument("--state-dir", default=".threadgate", help="default .threadgate")
    dev.add_argument("--pg-port", type=int, default=0, help="PostgreSQL's port (0: any free)")
    dev.add_argument("--nats-port", type=int, default=0, help="nats-server's port (0: any free)")
    dev.set_defaults(fn=_dev, action=None)
    actions = dev.add_subparsers(dest="action", metavar="{kill,clean}")
    kill = actions.add_parser(
        "kill", help="SIGKILL the pod running under NAME (threadgate dev starts it again)"
    )
    kill.add_argument("name", help="a pod name, e.g. threadgate-1 (`threadgate runs` shows it)")
    kill.add_argument("--signal", default="KILL", choices=["KILL", "TERM"], help="default KILL")
    kill.add_argument("--state-dir", default=argparse.SUPPRESS)
    clean = actions.add_parser("clean", help="remove a stopped stack's state and data")
    clean.add_argument("--state-dir", default=argparse.SUPPRESS)

    def client_cmd(
        name: str, help: str, fn: ClientFn, *, thread: bool = True, one_pod: bool = False
    ) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help, description=help)
        c.add_argument(
            "--url",
            default=None,
            help="pod URL(s), comma-separated (default: $THREADGATE_URL, else the "
            f"{URLS_FILE} of a running `threadgate dev`, else {DEFAULT_URL})",
        )
        c.add_argument("--token", default=None, help="bearer token (default $THREADGATE_TOKEN)")
        c.add_argument("--json", action="store_true", help="print JSON, for scripts")
        if thread:
            c.add_argument("thread")
        c.set_defaults(fn=lambda args: _client(args, fn, one_pod=one_pod))
        return c

    post = client_cmd("post", "post a message to a thread", _post)
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
    attach = client_cmd("attach", "print the thread's latest reply as it streams", _attach)
    attach.add_argument(
        "--wait", action="store_true", help="wait for the thread's first run if it has none"
    )
    runs = client_cmd("runs", "list a thread's runs (newest first), a page at a time", _runs)
    messages = client_cmd(
        "messages",
        "print a thread's conversation (all of it; with --limit or --cursor, one page of its"
        " latest messages, in order)",
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
    cancel = client_cmd("cancel", "cancel a queued or running run", _cancel)
    cancel.add_argument("run_id")
    cancel.add_argument("--no-wait", action="store_true", help="answer before it has stopped")
    adopt = client_cmd(
        "adopt",
        "move runs stranded on a pod by another app version to its version",
        _adopt,
        thread=False,
        one_pod=True,
    )
    adopt.add_argument("--dry-run", action="store_true", help="only list them")
    adopt.add_argument("--force", action="store_true", help="adopt even if their steps differ")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        status = args.fn(args)
    except CliError as exc:
        print(f"threadgate: {exc}", file=sys.stderr)
        status = exc.status
    except KeyboardInterrupt:
        status = 130
    sys.exit(status)


if __name__ == "__main__":
    main()
