"""`threadgate serve`: one pod (one uvicorn worker), configured by the environment; its
--help lists every setting with its default, read from the Settings model."""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import sys
import typing
from typing import Any

from ..errors import ConfigError
from .exits import UNREACHABLE


def settings_help() -> str:
    """Every environment setting and its default, from the Settings model itself."""
    from pydantic import AliasChoices, SecretStr

    from ..settings import Settings

    rows: list[tuple[str, str]] = []
    for name, field in Settings.model_fields.items():
        env = f"THREADGATE_{name.upper()}"
        if isinstance(field.validation_alias, AliasChoices):
            env = str(field.validation_alias.choices[0])
        default: Any = field.get_default(call_default_factory=True)
        if isinstance(default, SecretStr):
            default = default.get_secret_value()
        if isinstance(default, bool):
            shown = str(default).lower()
        elif isinstance(default, float):
            shown = f"{default:g}"
        else:
            shown = str(default) if default != "" else "(empty)"
        if name == "pod_name":
            shown = "dev-<hostname> in dev; required in production"
        choices = typing.get_args(field.annotation)
        if typing.get_origin(field.annotation) is typing.Literal and choices:
            shown += f"  ({'|'.join(str(c) for c in choices)})"
        rows.append((env, shown))
    width = max(len(env) for env, _ in rows)
    lines = [f"  {env:<{width}}  {shown}" for env, shown in rows]
    return "environment settings (default):\n" + "\n".join(lines)


def _set_title(pod_name: str) -> None:
    """`ps` shows `threadgate serve <pod>`: how `threadgate dev kill` and people find a pod."""
    from setproctitle import setproctitle

    from ..devpod import POD_TITLE

    setproctitle(POD_TITLE.format(name=pod_name))


def serve(args: argparse.Namespace) -> int:
    """`threadgate serve`: one pod, configured by the environment."""
    import uvicorn

    from .. import preflight
    from ..logs import setup_logging
    from ..main import begin_drain, create_app
    from ..server import guarded_http
    from ..settings import load_settings

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
    if settings.processes > 1 and settings.listen_fd < 0:
        from ..pod import PodSupervisor

        # Its processes run `python -m threadgate.cli serve` on the socket it binds.
        return asyncio.run(PodSupervisor(settings, __package__ or "threadgate.cli").run())
    try:
        app = create_app(settings)
    except ConfigError as exc:
        print(f"threadgate: {exc.message}", file=sys.stderr)
        return 2
    try:
        preflight.check(settings)
    except preflight.Unreachable as exc:
        print(f"threadgate: {exc.message}", file=sys.stderr)
        return UNREACHABLE
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
    # A process of a pod's supervisor accepts on the socket the supervisor bound (app/pod.py).
    sockets = [socket.socket(fileno=settings.listen_fd)] if settings.listen_fd >= 0 else None
    server.run(sockets=sockets)
    if not server.started:
        # uvicorn returns normally when start-up fails; a failed pod must not look clean.
        print("threadgate: start-up failed (see the log above)", file=sys.stderr)
        return 1
    return 0
