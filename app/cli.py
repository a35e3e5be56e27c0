"""`threadgate serve | dev | post | attach | runs`: the pod, the embedded stack, a client."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .errors import ConfigError

DEFAULT_URL = "http://localhost:8000"


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .logs import setup_logging
    from .main import begin_drain, create_app
    from .settings import load_settings

    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"threadgate: {exc.message}", file=sys.stderr)
        return 2
    setup_logging(settings.pod_name, json_lines=settings.json_logs, level=settings.log_level)
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
    )
    server = PodServer(config)
    server.run()
    if not server.started:
        # uvicorn returns normally when start-up fails; a failed pod must not look clean.
        print("threadgate: start-up failed (see the log above)", file=sys.stderr)
        return 1
    return 0


def _dev(args: argparse.Namespace) -> int:
    from .devstack import NatsServer, Postgres, free_port, make_state_dir, wait_for

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)  # stop cleanly under a supervisor, as on Ctrl-C
    state = make_state_dir(Path(args.state_dir))
    t0 = time.monotonic()
    print(f"threadgate dev: state in {state}", flush=True)
    pg = Postgres(state / "pg", port=args.pg_port or None)
    nats = NatsServer(state / "nats", port=args.nats_port or None)
    pods: list[subprocess.Popen[bytes]] = []
    try:
        print(f"  starting PostgreSQL ({pg.bin}) ...", flush=True)
        pg.start()
        print(f"  starting nats-server with JetStream on {nats.url} ...", flush=True)
        nats.start()
        urls = []
        for i in range(args.pods):
            port = args.port + i if args.port else free_port()
            env = dict(os.environ)
            env.update(
                POD_NAME=f"threadgate-{i}",
                THREADGATE_PORT=str(port),
                THREADGATE_DATABASE_URL=pg.url(),
                THREADGATE_NATS_URL=nats.url,
            )
            pods.append(
                subprocess.Popen([sys.executable, "-m", "threadgate.cli", "serve"], env=env)
            )
            urls.append(f"http://localhost:{port}")
        print(f"  starting {args.pods} pod(s) ...", flush=True)
        for url, proc in zip(urls, pods, strict=True):
            wait_for(lambda u=url: _ready(u), 60, f"pod at {url}", proc)
        took = time.monotonic() - t0
        print(f"\nthreadgate is ready in {took:.1f}s\n")
        print(f"  {'pod':<14} {'url':<28}")
        for i, url in enumerate(urls):
            print(f"  threadgate-{i:<3} {url:<28}")
        print(f"\n  postgres  {pg.url()}\n  nats      {nats.url}\n")
        print(f"  try:  curl -N {urls[0]}/threads/demo/attach")
        print(
            f"        curl -X POST {urls[0]}/threads/demo/runs -H 'content-type: application/json'"
            ' -d \'{"input": "hello"}\''
        )
        print("  Ctrl-C stops everything.\n", flush=True)
        while all(p.poll() is None for p in pods):
            time.sleep(0.5)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        for p in pods:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in pods:
            try:
                p.wait(35)
            except subprocess.TimeoutExpired:
                p.kill()
        nats.stop()
        pg.stop()
        print("threadgate dev: stopped", flush=True)


def _ready(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _post(args: argparse.Namespace) -> int:
    from .client import Client

    client = Client(args.url, token=args.token)
    accepted = client.post(args.thread, args.text)
    print(f"run {accepted['run_id']} accepted ({accepted['status']})", file=sys.stderr)
    if args.attach:
        return _print_reply(client, args.thread)
    return 0


def _print_reply(client: Any, thread: str) -> int:
    for text in client.attach(thread):
        print(text, end="", flush=True)
    print()
    return 0


def _attach(args: argparse.Namespace) -> int:
    from .client import Client

    return _print_reply(Client(args.url, token=args.token), args.thread)


def _runs(args: argparse.Namespace) -> int:
    from .client import Client

    runs = Client(args.url, token=args.token).runs(args.thread)
    print(f"{'run_id':<38} {'status':<12} {'attempt':>7}  executor")
    for r in runs:
        print(f"{r['run_id']:<38} {r['status']:<12} {r['attempt']:>7}  {r['executor'] or '-'}")
    return 0


def _adopt(args: argparse.Namespace) -> int:
    import httpx

    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    base = args.url.rstrip("/")
    listing = httpx.get(f"{base}/admin/stranded", headers=headers, timeout=30)
    listing.raise_for_status()
    body = listing.json()
    print(f"pod {body['pod']} (version {body['app_version']}): {len(body['runs'])} stranded runs")
    for r in body["runs"]:
        ok = "ok" if r["compatible"] else "STEPS DIFFER"
        print(f"  {r['run_id']}  version {r['app_version']}  steps {r['steps']}  {ok}")
    if args.dry_run or not body["runs"]:
        return 0
    resp = httpx.post(
        f"{base}/admin/stranded/adopt", params={"force": args.force}, headers=headers, timeout=60
    )
    resp.raise_for_status()
    result = resp.json()
    print(f"adopted {len(result['adopted'])}, refused {len(result['refused'])}")
    return 0 if not result["refused"] else 3


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="threadgate", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run one pod, configured by the environment").set_defaults(
        fn=_serve
    )
    dev = sub.add_parser("dev", help="embedded PostgreSQL + nats-server and N pods")
    dev.add_argument("--pods", type=int, default=1)
    dev.add_argument("--port", type=int, default=8000, help="first pod's port (0: any free port)")
    dev.add_argument("--state-dir", default=".threadgate")
    dev.add_argument("--pg-port", type=int, default=0)
    dev.add_argument("--nats-port", type=int, default=0)
    dev.set_defaults(fn=_dev)

    def client_cmd(name: str, help: str, fn: Any) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help)
        c.add_argument("--url", default=None, help=f"default $THREADGATE_URL or {DEFAULT_URL}")
        c.add_argument("--token", default=None, help="bearer token (default $THREADGATE_TOKEN)")
        c.add_argument("thread")
        c.set_defaults(fn=fn)
        return c

    post = client_cmd("post", "post a message to a thread", _post)
    post.add_argument("text")
    post.add_argument("--attach", action="store_true", help="print the reply as it streams")
    client_cmd("attach", "print the thread's latest reply as it streams", _attach)
    client_cmd("runs", "list a thread's runs", _runs)
    adopt = sub.add_parser(
        "adopt", help="move runs stranded on a pod by another app version to its version"
    )
    adopt.add_argument(
        "--url", default=None, help=f"the pod (default $THREADGATE_URL or {DEFAULT_URL})"
    )
    adopt.add_argument("--token", default=None)
    adopt.add_argument("--dry-run", action="store_true", help="only list them")
    adopt.add_argument("--force", action="store_true", help="adopt even if their steps differ")
    adopt.set_defaults(fn=_adopt)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if hasattr(args, "url"):
        # The CLI is a person's tool: its defaults may come from their shell.
        args.url = args.url or os.environ.get("THREADGATE_URL") or DEFAULT_URL
        args.token = args.token or os.environ.get("THREADGATE_TOKEN")
    sys.exit(args.fn(args))


if __name__ == "__main__":
    main()
