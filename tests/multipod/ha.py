"""Highly available dependencies as local processes: a JetStream cluster, a PostgreSQL pair.

Free of pytest (like cluster.py), so that benches can use them too. Every server is a real
process on loopback ports and is ready by what it says, not by a sleep: a nats-server when it
logs "Server is ready" and its monitoring endpoint names a JetStream meta leader; a PostgreSQL
standby when the primary lists it as a synchronous replica.
"""

from __future__ import annotations

import contextlib
import json
import signal
import urllib.request
from pathlib import Path
from typing import Any

from threadgate.devstack import NatsServer, Postgres, free_port, wait_for


class NatsCluster:
    """`size` nats-servers with JetStream, clustered over routes; members are killed and
    started again by name (`n0`, `n1`, ...) on the same ports and store directories."""

    def __init__(self, root: Path, size: int = 3, name: str = "tg") -> None:
        self.root = Path(root)
        self.names = [f"n{i}" for i in range(size)]
        routes = {n: free_port() for n in self.names}
        self.http = {n: free_port() for n in self.names}
        self.servers: dict[str, NatsServer] = {}
        for n in self.names:
            others = ",".join(f"nats://127.0.0.1:{routes[o]}" for o in self.names if o != n)
            self.servers[n] = NatsServer(
                self.root / n,
                args=[
                    *("--server_name", n, "--cluster_name", name),
                    *("--cluster", f"nats://127.0.0.1:{routes[n]}", "--routes", others),
                    *("-m", str(self.http[n])),
                ],
            )

    @property
    def url(self) -> str:
        """THREADGATE_NATS_URL: every member, comma-separated."""
        return ",".join(s.url for s in self.servers.values())

    def alive(self) -> list[str]:
        return [n for n, s in self.servers.items() if s.proc is not None and s.proc.poll() is None]

    def start(self, timeout: float = 60.0) -> None:
        for server in self.servers.values():
            server.start()  # each returns at "Server is ready"; routes connect meanwhile
        self.wait_meta_leader(timeout)

    def kill(self, name: str) -> None:
        """SIGKILL, like an OOM kill: no leadership handed over, no goodbye to the routes."""
        self.servers[name].stop(kill=True)

    def pause(self, name: str) -> None:
        """SIGSTOP: its connections stay open and swallow what is sent to it (a frozen node)."""
        proc = self.servers[name].proc
        assert proc is not None and proc.poll() is None
        proc.send_signal(signal.SIGSTOP)

    def restart(self, name: str, timeout: float = 60.0) -> None:
        self.servers[name].start()
        self.wait_meta_leader(timeout)

    def stop(self) -> None:
        for server in self.servers.values():
            server.stop(kill=True)

    def jsz(self, name: str) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http[name]}/jsz", timeout=2) as r:
            body: dict[str, Any] = json.loads(r.read())
        return body

    def meta_leader(self) -> str | None:
        """The JetStream meta leader every live member agrees on, if there is one."""
        leaders = set()
        for n in self.alive():
            try:
                leaders.add(self.jsz(n).get("meta_cluster", {}).get("leader") or None)
            except OSError:
                return None
        if len(leaders) != 1:
            return None
        return leaders.pop()

    def wait_meta_leader(self, timeout: float = 60.0) -> str:
        """JetStream is usable once its meta group (placement, stream/consumer creation) has
        a leader that every live member knows."""
        wait_for(lambda: self.meta_leader() is not None, timeout, "JetStream meta leader")
        leader = self.meta_leader()
        assert leader is not None
        return leader

    def logs(self, lines: int = 30) -> str:
        parts = []
        for n, s in self.servers.items():
            text = s.log.read_text(errors="replace") if s.log.exists() else ""
            parts.append(
                f"===== nats {n} ({s.url}) =====\n" + "\n".join(text.splitlines()[-lines:])
            )
        return "\n".join(parts)


class PgPair:
    """A PostgreSQL primary and a synchronous streaming standby made with `pg_basebackup -R`.

    `synchronous_standby_names = '*'` (set on the primary once its standby runs, by ALTER
    SYSTEM: the standby's copy of the configuration does not have it) and the default
    `synchronous_commit = on`: a commit returns once the standby has flushed it, so a promoted
    standby holds every commit a client saw succeed. Once promoted, the former standby has no
    standby of its own and does not wait for one.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.primary = Postgres(self.root / "pg-a", max_connections=200)
        self.standby = Postgres(self.root / "pg-b", max_connections=200)

    def url(self, database: str) -> str:
        """libpq's multi-host form: the writable one of the two, whichever it is."""
        return (
            f"postgresql://postgres@127.0.0.1:{self.primary.port},127.0.0.1:{self.standby.port}"
            f"/{database}?target_session_attrs=read-write&connect_timeout=2"
        )

    def start(self, timeout: float = 60.0) -> None:
        import psycopg

        self.primary.start()
        self.standby.clone_from(self.primary)
        self.standby.start()
        with psycopg.connect(self.primary.url("postgres"), autocommit=True) as conn:
            conn.execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
            conn.execute("SELECT pg_reload_conf()")
        wait_for(self._synchronous, timeout, "synchronous standby")

    def _synchronous(self) -> bool:
        import psycopg

        with (
            contextlib.suppress(psycopg.Error),
            psycopg.connect(self.primary.url("postgres"), connect_timeout=2) as conn,
        ):
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'"
            ).fetchone()
            return bool(row and row[0] >= 1)
        return False

    def create_database(self, name: str) -> str:
        """A database on the primary, replicated; the multi-host URL of it."""
        import psycopg

        with psycopg.connect(self.primary.url("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        self.standby.stop(kill=True)
        self.primary.stop(kill=True)
