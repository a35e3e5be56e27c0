"""The JetStream buffer: one stream, one subject per thread, purge and pipelined publish."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from typing import Any, Protocol

import nats
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy, DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import APIError, NotFoundError

from ..errors import ConfigError, StreamUnavailable
from ..settings import Settings
from .events import Event
from .publisher import Acks, AttemptBroken, JetStreamPublisher, with_retry

logger = logging.getLogger(__name__)

# A tail's consumer sends a heartbeat this often when idle; two missed ones and nats-py
# recreates it where the last delivery left off (a server that died took it along).
TAIL_HEARTBEAT_S = 1.0
INSUFFICIENT_RESOURCES = 10047  # JetStream API error: the reservation does not fit
# How long start-up waits for JetStream at least (the startup probe allows 120 s).
START_WAIT_S = 60.0


def _away(exc: Exception) -> bool:
    """JetStream is not answering yet (no meta leader, a server starting, an election): worth
    waiting for. A refusal (a bad config, no room) is not."""
    if isinstance(exc, APIError):
        return (exc.code or 0) >= 500 and exc.err_code != INSUFFICIENT_RESOURCES
    return not isinstance(exc, ConfigError)


__all__ = ["AttemptBroken", "JetStreamBuffer", "JetStreamPublisher", "connect_nats"]


class RunPublisher(Protocol):
    async def publish(self, event: Event, part: str | int) -> None: ...
    def merge(self, text: str) -> bool: ...
    async def part(self, event: Event) -> bool: ...
    async def flush(self) -> None: ...


class StreamBuffer(Protocol):
    """What a run needs from the stream: purge its thread's subject, publish, read it back."""

    async def purge(self, thread_id: str) -> None: ...
    def publisher(self, thread_id: str, run_id: str, attempt: int) -> RunPublisher: ...
    async def read_subject(self, thread_id: str, timeout_s: float = 10.0) -> list[Event]: ...


async def connect_nats(
    settings: Settings, name: str, on_reconnect: Callable[[], Awaitable[None]] | None = None
) -> NATS:
    """A connection that reconnects forever, to any server of the list; callers bound their
    own waits."""
    options: dict[str, Any] = {
        "servers": nats_servers(settings.nats_url),
        "name": f"{settings.pod_name}/{name}",
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
        "connect_timeout": 2,
        "allow_reconnect": True,
        "pending_size": 64 * 1024 * 1024,
        # A server that stops answering (frozen, black-holed) is left after interval x
        # outstanding pings, not nats-py's default of 120 s x 2.
        "ping_interval": settings.nats_ping_interval_s,
        "max_outstanding_pings": settings.nats_max_outstanding_pings,
    }
    if settings.nats_user:
        options["user"] = settings.nats_user
        options["password"] = settings.nats_password.get_secret_value()
    if settings.nats_token.get_secret_value():
        options["token"] = settings.nats_token.get_secret_value()
    if settings.nats_tls_ca:
        import ssl

        options["tls"] = ssl.create_default_context(cafile=settings.nats_tls_ca)

    async def error_cb(exc: Exception) -> None:
        logger.warning("nats %s: %s", name, exc)

    async def disconnected_cb() -> None:
        logger.warning("nats %s disconnected", name)

    async def reconnected_cb() -> None:
        logger.info("nats %s reconnected", name)
        if on_reconnect is not None:
            await on_reconnect()

    return await nats.connect(
        **options,
        error_cb=error_cb,
        disconnected_cb=disconnected_cb,
        reconnected_cb=reconnected_cb,
    )


def nats_servers(url: str) -> list[str]:
    """THREADGATE_NATS_URL may list a cluster's servers, comma-separated (nats-py takes one
    URL per list item: a comma inside one is refused as an invalid URL)."""
    servers = [u.strip() for u in url.split(",") if u.strip()]
    if not servers:
        raise ConfigError("THREADGATE_NATS_URL names no server")
    return servers


class JetStreamBuffer:
    """The real buffer over one NATS connection."""

    def __init__(
        self,
        settings: Settings,
        nc: NATS,
        on_republish: Callable[[int], None] | None = None,
    ) -> None:
        self.settings = settings
        self.nc = nc
        self.on_republish = on_republish  # told how many messages each republish sends again
        self.js: JetStreamContext = nc.jetstream(timeout=settings.publish_timeout_s)
        self.acks = Acks(nc)

    @property
    def stream(self) -> str:
        return self.settings.stream_name

    def subject(self, thread_id: str) -> str:
        return self.settings.thread_subject(thread_id)

    async def ensure_stream(self) -> None:
        """Ready the buffer: the publishers' ack inbox, and the stream, created or with the
        settings we own brought up to date.

        Replicas only ever grow here: an operator who raised them by hand (`nats stream edit`)
        keeps them; lowering is theirs to do. JetStream not answering yet (a cluster without
        quorum or still electing its meta leader) is waited out: a starting pod loses nothing by
        waiting (START_WAIT_S at least; THREADGATE_NATS_OUTAGE_LIMIT_S if longer).
        """
        await self.acks.start()
        warned: list[bool] = []

        def waiting() -> None:
            if not warned:
                warned.append(True)
                logger.warning("JetStream does not answer the stream set-up yet: waiting")

        await with_retry(
            self._ensure_stream,
            max(self.settings.nats_outage_limit_s, START_WAIT_S),
            "stream set-up",
            on_retry=waiting,
            retry_if=_away,
        )

    async def _ensure_stream(self) -> None:
        config = StreamConfig(
            name=self.stream,
            subjects=[self.settings.stream_subjects],
            storage=StorageType.FILE,
            retention=RetentionPolicy.LIMITS,
            discard=DiscardPolicy.OLD,
            max_age=self.settings.stream_max_age_s,
            max_bytes=self.settings.stream_max_bytes,
            duplicate_window=self.settings.duplicate_window_s,
            num_replicas=self.settings.stream_replicas,
        )
        try:
            info = await self.js.stream_info(self.stream)
        except NotFoundError:
            with self._room_for(config):
                await self.js.add_stream(config)
            logger.info("stream %s created", self.stream)
            return
        current = info.config
        config.num_replicas = max(current.num_replicas or 1, config.num_replicas or 1)
        owned = ("subjects", "max_age", "max_bytes", "duplicate_window", "num_replicas")
        if any(getattr(current, f) != getattr(config, f) for f in owned):
            with self._room_for(config):
                await self.js.update_stream(config)
            logger.info("stream %s updated", self.stream)

    @contextlib.contextmanager
    def _room_for(self, config: StreamConfig) -> Iterator[None]:
        """JetStream reserves a stream's max_bytes up front: a server without that much room
        refuses the stream, which start-up reports as the setting to change."""
        try:
            yield
        except APIError as exc:
            if exc.err_code != INSUFFICIENT_RESOURCES:
                raise
            raise ConfigError(
                f"nats-server has no room for stream {self.stream}: JetStream reserves its "
                f"THREADGATE_STREAM_MAX_BYTES={config.max_bytes} (x{config.num_replicas} "
                "replicas) up front; lower it, or give the server more storage "
                "(jetstream max_file_store)"
            ) from exc

    async def ping(self) -> bool:
        if not self.nc.is_connected:
            return False
        try:
            await self.js.account_info()
            return True
        except Exception:
            return False

    async def purge(self, thread_id: str) -> None:
        await with_retry(
            lambda: self.js.purge_stream(self.stream, subject=self.subject(thread_id)),
            self.settings.nats_outage_limit_s,
            "purge",
        )

    def publisher(self, thread_id: str, run_id: str, attempt: int) -> JetStreamPublisher:
        return JetStreamPublisher(
            self.settings,
            self.nc,
            self.js,
            self.acks,
            self.subject(thread_id),
            run_id,
            attempt,
            on_republish=self.on_republish,
        )

    async def last_sequence(self, thread_id: str) -> int:
        """The sequence of the newest message on a thread's subject, 0 when it has none.

        Waited out across a stream leader election (no leader answers for a few seconds),
        then StreamUnavailable (503): an attach must not fail with a 500 meanwhile.
        """

        async def last() -> int:
            try:
                msg = await self.js.get_last_msg(self.stream, self.subject(thread_id))
            except NotFoundError:
                return 0
            return int(msg.seq or 0)

        seq: int = await with_retry(last, self.settings.nats_outage_limit_s, "read")
        return seq

    async def read_subject(self, thread_id: str, timeout_s: float = 10.0) -> list[Event]:
        """Every event on a thread's subject now, in stream order (what a continuing attempt
        reads its prefix from). StreamUnavailable if it cannot be read whole."""
        try:
            last = await self.last_sequence(thread_id)
            if last == 0:
                return []
            events: list[Event] = []
            whole = asyncio.Event()

            async def on_msg(msg: Any) -> None:
                seq = stream_seq(msg)
                with contextlib.suppress(Exception):  # not ours: no part of any reply
                    events.append(Event.from_bytes(msg.data, seq=seq))
                if seq >= last:
                    whole.set()

            sub = await self.ordered_subscribe(thread_id, 0, on_msg)
            try:
                await asyncio.wait_for(whole.wait(), timeout_s)
            finally:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
            return events
        except StreamUnavailable:
            raise
        except Exception as exc:
            raise StreamUnavailable(f"reading {self.subject(thread_id)}: {exc!r}") from exc

    def read_after(self, thread_id: str, after_seq: int) -> AsyncGenerator[list[Event], None]:
        """A thread's events after `after_seq` (0: all), in pages, up to its newest now
        (streams/history.py): what a tail does not hold, for a client that needs it."""
        from .history import read_after

        return read_after(self.js, self.stream, self.subject(thread_id), after_seq)

    async def event_at(self, thread_id: str, seq: int) -> Event | None:
        """The thread's event at stream sequence `seq`, if the stream still holds it."""
        from .history import event_at

        return await event_at(self.js, self.stream, self.subject(thread_id), seq)

    async def close_subscription(self, sub: Any) -> None:
        await close_ordered(self.js, self.stream, sub)

    async def ordered_subscribe(
        self, thread_id: str, start_seq: int, cb: Callable[[Any], Awaitable[None]]
    ) -> Any:
        """An ordered consumer of a thread's subject: from `start_seq`, or all when 0.

        Its creation is retried across a leader election. Once it runs, nats-py recreates it
        from the last sequence delivered when its heartbeats stop for two intervals: the
        consumer (one replica, in memory) lives on one server, and a SIGKILLed server takes
        it along without the client's connection noticing anything.
        """
        subject = self.subject(thread_id)

        async def subscribe() -> Any:
            start = start_seq > 0
            return await self.js.subscribe(
                subject,
                cb=cb,
                stream=self.stream,  # else nats-py asks the server which stream, every time
                ordered_consumer=True,
                idle_heartbeat=TAIL_HEARTBEAT_S,
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE if start else DeliverPolicy.ALL,
                config=_start_at(start_seq) if start else None,  # nats-py fills it in: anew
                pending_msgs_limit=1_000_000,
                pending_bytes_limit=512 * 1024 * 1024,
            )

        return await with_retry(subscribe, self.settings.nats_outage_limit_s, "subscribe")


async def close_ordered(js: JetStreamContext, stream: str, sub: Any) -> None:
    """Unsubscribe an ordered consumer and delete it on the server at once (left alone, an
    ephemeral consumer stays until its inactive threshold: a thousand attach-and-hang-ups
    would leave a thousand consumers heartbeating)."""
    with contextlib.suppress(Exception):
        await sub.unsubscribe()
    name = getattr(sub, "_consumer", None)
    if name:
        with contextlib.suppress(Exception):
            await js.delete_consumer(stream, name)


def stream_seq(msg: Any) -> int:
    """A delivery's stream sequence, read from its reply subject: nats-py's `msg.metadata`
    builds a frozen dataclass and a datetime per message for it.

    `$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<ts>.<pending>`;
    any other form (a server with domains) goes through nats-py's parser.
    """
    tokens: list[str] = msg.reply.split(".") if msg.reply else []
    if len(tokens) == 9 and tokens[0] == "$JS" and tokens[1] == "ACK":
        return int(tokens[5])
    return int(msg.metadata.sequence.stream)


def _start_at(seq: int) -> Any:
    from nats.js.api import ConsumerConfig

    return ConsumerConfig(opt_start_seq=seq, deliver_policy=DeliverPolicy.BY_START_SEQUENCE)
