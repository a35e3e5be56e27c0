"""Before a pod starts: can it reach PostgreSQL and NATS? If not, one line that names the
setting and the address tried, within seconds (not a pool's 30 s wait and its traceback)."""

from __future__ import annotations

import socket
import time
from urllib.parse import urlsplit

from .errors import ThreadgateError
from .settings import Settings

ATTEMPT_S = 2.0  # one connection attempt
WITHIN_S = 3.0  # a server still starting (a compose stack's first seconds) gets this long


class Unreachable(ThreadgateError):
    """A dependency of the pod does not answer at the address its setting gives."""

    code = "dependency_unreachable"
    status = 503


def _setting(settings: Settings, field: str, env: str) -> str:
    given = field in settings.model_fields_set
    return env if given else f"{env} is not set: this is its default"


def _first_line(text: str) -> str:
    """libpq's message without its prefix and its hint lines."""
    line = text.strip().splitlines()[0] if text.strip() else "failed"
    line = line.rsplit(" failed: ", 1)[-1] if " failed: " in line else line
    return line.removeprefix("connection failed: ").strip().rstrip(".")


def database(settings: Settings) -> None:
    """One real connection (libpq, so the URL's every form and option is honoured)."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    url = settings.database_url.get_secret_value()
    try:
        params = conninfo_to_dict(url)
    except psycopg.ProgrammingError as exc:
        raise Unreachable(f"THREADGATE_DATABASE_URL is not a PostgreSQL URL: {exc}") from None
    hosts = str(params.get("host") or "localhost").split(",")
    ports = str(params.get("port") or "5432").split(",")
    where = ", ".join(
        f"{h}:{ports[i] if i < len(ports) else ports[-1]}" for i, h in enumerate(hosts)
    )
    deadline = time.monotonic() + WITHIN_S
    while True:
        try:
            with psycopg.connect(url, connect_timeout=max(int(ATTEMPT_S), 1)):
                return
        except psycopg.OperationalError as exc:
            reason = _first_line(str(exc))
            refused = "refused" in reason.lower() or "timeout" in reason.lower()
            if refused and time.monotonic() < deadline:
                time.sleep(0.25)  # paces attempts while the server may be starting
                continue
            unknown = "resolve host" in reason or "translate host" in reason
            what = "cannot reach" if refused or unknown else "cannot use"
            raise Unreachable(
                f"{what} PostgreSQL at {where} ({_setting(settings, 'database_url', 'THREADGATE_DATABASE_URL')}): {reason}"
            ) from None


def nats(settings: Settings) -> None:
    """A TCP connection to any server of the list that answers with NATS's INFO line."""
    from .streams.buffer import nats_servers

    servers = nats_servers(settings.nats_url)
    deadline = time.monotonic() + WITHIN_S
    reasons: list[str] = []
    tried: list[str] = []
    while True:
        reasons.clear()
        tried.clear()
        for server in servers:
            parts = urlsplit(server if "://" in server else f"nats://{server}")
            host, port = parts.hostname or "localhost", parts.port or 4222
            tried.append(f"{host}:{port}")
            try:
                with socket.create_connection((host, port), timeout=ATTEMPT_S) as conn:
                    conn.settimeout(ATTEMPT_S)
                    first = conn.recv(5)
                if first.startswith(b"INFO"):
                    return
                reasons.append("it answered, but not as NATS does")
            except socket.gaierror:
                reasons.append(f"unknown host {host}")
            except OSError as exc:
                reasons.append((exc.strerror or type(exc).__name__).lower())
        if time.monotonic() >= deadline or any("unknown host" in r for r in reasons):
            break
        time.sleep(0.25)  # paces attempts while the server may be starting
    said = reasons[0] if len(set(reasons)) == 1 else "; ".join(reasons)
    raise Unreachable(
        f"cannot reach NATS at {', '.join(tried)} "
        f"({_setting(settings, 'nats_url', 'THREADGATE_NATS_URL')}): {said}"
    )


def check(settings: Settings) -> None:
    """Both dependencies, NATS first (the cheaper check); `Unreachable` names the first that
    does not answer."""
    nats(settings)
    database(settings)
