"""The one place that reads the environment: every knob of a threadgate pod."""

from __future__ import annotations

import contextlib
import hashlib
import re
import socket
from functools import cached_property
from typing import Literal

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from . import __version__
from .buildinfo import app_version
from .errors import ConfigError

POD_NAME_HELP = (
    "POD_NAME is required when THREADGATE_ENV=production: it is the pod's stable "
    "StatefulSet name and the DBOS executor id. Set it from the Kubernetes downward API "
    "(env: - name: POD_NAME, valueFrom: fieldRef: fieldPath: metadata.name)."
)

SERVICE_LINK = re.compile(r"^(tcp|udp|sctp)://")
SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")


# Quotas in force in production when their setting is not given (docs/security.md).
PRODUCTION_QUOTAS = {"runs_per_day": 10_000, "threads": 10_000, "stored_bytes": 1024**3}


def default_dev_pod_name() -> str:
    """A stable dev name: the same machine always gets the same executor id."""
    return f"dev-{socket.gethostname()}"


class Settings(BaseSettings):
    """Settings of one pod. Environment variables are `THREADGATE_<FIELD>` unless noted."""

    model_config = SettingsConfigDict(
        env_prefix="THREADGATE_", extra="ignore", populate_by_name=True
    )

    env: Literal["dev", "production"] = "dev"
    pod_name: str = Field(default="", validation_alias=AliasChoices("POD_NAME", "pod_name"))
    # The DBOS application version: the image's own (app/buildinfo.py); set it only in tests.
    app_version: str = Field(default_factory=lambda: app_version(__version__))
    app_name: str = "threadgate"

    host: str = "0.0.0.0"
    port: int = Field(default=8000, ge=0, le=65535)
    # /metrics on its own port, off the API (0: served on the API port, as in dev).
    metrics_port: int = Field(default=0, ge=0, le=65535)
    workers: int = 1

    database_url: SecretStr = SecretStr("postgresql://postgres@127.0.0.1:5432/threadgate")
    db_pool_size: int = Field(default=8, ge=1)
    dbos_pool_size: int = Field(default=10, ge=2)  # DBOS's own system-database pool
    nats_url: str = "nats://127.0.0.1:4222"
    nats_user: str = ""
    nats_password: SecretStr = SecretStr("")
    nats_token: SecretStr = SecretStr("")
    nats_tls_ca: str = ""

    stream_name: str = "THREADGATE"
    subject_prefix: str = "threadgate"
    control_subject_name: str = Field(
        default="",
        validation_alias=AliasChoices("THREADGATE_CONTROL_SUBJECT", "control_subject_name"),
    )  # stops and start requests between pods; default <prefix>.control
    stream_max_age_s: float = Field(default=24 * 3600, gt=0)
    duplicate_window_s: float = Field(default=600, gt=0)
    stream_replicas: int = Field(default=1, ge=1, le=5)
    stream_max_bytes: int = Field(default=1024**3, ge=-1)  # -1: unbounded
    publish_window: int = Field(default=64, ge=1)
    publish_timeout_s: float = Field(default=5.0, gt=0)
    nats_outage_limit_s: float = Field(default=30.0, gt=0)
    # Under load, text deltas that come while a run's previous message awaits its ack are
    # merged into one message (one part), for at most this long and this many characters;
    # an idle pod's acks come first, so nothing is held then. 0 ms: every delta alone.
    coalesce_ms: float = Field(default=50.0, ge=0)
    coalesce_bytes: int = Field(default=16 * 1024, ge=1)

    max_retries: int = Field(default=5, ge=0)
    # Crash replays a run may have (attempts begun after a pod died mid-reply) before it ends
    # `crashed_repeatedly` without calling the model again: a poison run stops killing pods.
    max_replays: int = Field(default=3, ge=0)
    retry_base_s: float = Field(default=1.0, ge=0)
    retry_cap_s: float = Field(default=30.0, ge=0)
    run_timeout_s: float = Field(default=600.0, gt=0)
    stop_poll_s: float = Field(default=1.0, gt=0)

    # Runs start on events (app/workflows/runner.py); DBOS's queue poll is the safety net for
    # a lost one, and what the idle pod costs: keep it slow.
    queue_polling_s: float = Field(default=2.0, gt=0)
    fast_start: bool = True  # false: runs start at the queue poll only (for comparisons)
    background_polling_s: float = Field(default=30.0, gt=0)  # DBOS internals we do not use
    claim_timeout_s: float = Field(default=30.0, ge=0)
    heartbeat_s: float = Field(default=5.0, gt=0)
    adopt_after_s: float = Field(default=60.0, gt=0)
    adopt_check_s: float = Field(default=30.0, gt=0)  # adoption, reconciling, moving versions
    orphan_after_s: float = Field(default=30.0, gt=0)
    # Runs stranded by a version change whose recorded steps match this version's workflow
    # are adopted by the adoption checks (false: only `threadgate adopt` moves them).
    auto_adopt: bool = True
    drain_timeout_s: float = Field(default=25.0, ge=0)
    keepalive_s: float = Field(default=15.0, gt=0)
    # A tail (and its JetStream consumer) outlives its last client this long: a client back
    # within it finds the thread's replies in memory; any pod serves it without one (v3).
    # A principal keeps at most max_attach_per_principal such idle tails on a pod.
    tail_linger_s: float = Field(default=3.0, ge=0)
    # What one thread's tail holds in memory, at most about (0: unbounded). A 100,000-chunk
    # reply costs ~57 MB; beyond the bound the oldest events are dropped, and a client that
    # needs them reads them from JetStream (streams/tail.py).
    tail_max_bytes: int = Field(default=16 * 1024 * 1024, ge=0)

    # mock | openai | package.module:factory (a plug-in reply source: app/sources.py)
    model: str = "mock"
    mock_chunks: int = Field(default=20, ge=0)
    mock_delay_ms: float = Field(default=50, ge=0)
    openai_base_url: str = "https://api.openai.com/v1"
    openai_api_key: SecretStr = SecretStr("")
    openai_model: str = "gpt-4o-mini"
    openai_timeout_s: float = Field(default=60.0, gt=0)
    openai_continue: Literal["off", "continue_final_message", "prefix", "prefill"] = "off"
    # model_options a client may set (comma-separated); the model and the key are the operator's
    openai_client_options: str = "temperature,max_tokens"
    openai_max_tokens: int = Field(default=4096, ge=1)

    max_input_chars: int = Field(default=32_000, ge=1)
    max_data_bytes: int = Field(default=64 * 1024, ge=1)  # one data event's JSON payload
    max_body_bytes: int = Field(default=256 * 1024, ge=1024)
    # A request's head must arrive within header_timeout_s of its first byte (of the
    # connection, for the first request); its body within body_timeout_s of the head: 408, or
    # the connection is closed (docs/security.md, "Slow clients").
    header_timeout_s: float = Field(default=10.0, gt=0)
    body_timeout_s: float = Field(default=30.0, gt=0)
    max_queued_runs_per_thread: int = Field(default=20, ge=1)
    # Runs pending or running: a principal's across the cluster, and those this pod accepted.
    max_active_runs_per_principal: int = Field(default=50, ge=1)
    max_active_runs_per_pod: int = Field(default=500, ge=1)
    max_attach_per_principal: int = Field(default=50, ge=1)
    max_attach_per_pod: int = Field(default=5000, ge=1)

    # Authentication (docs/security.md): auto = on in production, off in dev.
    auth: Literal["auto", "off", "on"] = "auto"
    api_keys: SecretStr = SecretStr("")
    admin_principals: str = ""
    jwt_secret: SecretStr = SecretStr("")  # HS256
    jwt_public_key_file: str = ""  # RS256, a PEM public key
    jwt_jwks_file: str = ""  # RS256, a local JWKS JSON file (keys picked by `kid`)
    jwt_audience: str = ""
    jwt_issuer: str = ""
    jwt_leeway_s: float = Field(default=30.0, ge=0)

    # Fault injection for the crash tests: the process dies (os._exit(137), like SIGKILL) when
    # a run reaches this point. Points: before_begin, before_purge, after_start, chunk:<i>,
    # attempt_chunk:<n>, after_chunks, after_store, after_done. Empty (the default) in every
    # real deployment.
    fault_point: str = ""
    fault_thread: str = ""  # only runs of this thread die at the fault point (a poison run)

    log_format: Literal["json", "text", "auto"] = "auto"
    log_level: str = "INFO"

    # --- issue 25: day two in production ---
    # Each dependency check of /readyz answers within this (concurrently): one that does not
    # is reported `degraded`, so a hung PostgreSQL or NATS never outlasts the probe's timeout.
    readiness_check_timeout_s: float = Field(default=1.0, gt=0)
    # NATS client pings: a black-holed server is noticed after interval x outstanding (30 s),
    # not nats-py's default 120 s x 2, and the client reconnects to another server.
    nats_ping_interval_s: int = Field(default=10, ge=1)
    nats_max_outstanding_pings: int = Field(default=3, ge=1)
    # TCP settings of every PostgreSQL connection (the app's pool, the fencing claim, DBOS's
    # engine). Keepalives find a dead peer under an idle connection; tcp_user_timeout ends a
    # query whose packets go unacknowledged that long (a black-holed primary), instead of
    # the kernel's ~15 minutes of retransmissions. 0 leaves the kernel's default.
    pg_keepalives_idle_s: int = Field(default=10, ge=1)
    pg_keepalives_interval_s: int = Field(default=5, ge=1)
    pg_keepalives_count: int = Field(default=3, ge=1)
    pg_tcp_user_timeout_s: float = Field(default=15.0, ge=0)
    # Retention (app/retention.py, docs/deploy.md "Storage and retention"); 0 keeps forever.
    # A finished run's DBOS workflow (status, inputs, step outputs) leaves after
    # retention_days; its row and messages (the conversation) after messages_retention_days.
    retention_days: float = Field(default=30, ge=0)
    messages_retention_days: float = Field(default=0, ge=0)
    retention_check_s: float = Field(default=3600, gt=0)  # one pod of the cluster sweeps
    retention_batch: int = Field(default=200, ge=1)  # runs per delete transaction
    # OpenTelemetry traces of runs (app/tracing.py): off unless an OTLP/HTTP endpoint is set,
    # by the standard variable or ours (its base URL: traces go to <endpoint>/v1/traces).
    otel_endpoint: str = Field(
        default="",
        validation_alias=AliasChoices(
            "OTEL_EXPORTER_OTLP_ENDPOINT", "THREADGATE_OTEL_ENDPOINT", "otel_endpoint"
        ),
    )
    otel_service_name: str = Field(
        default="threadgate",
        validation_alias=AliasChoices(
            "OTEL_SERVICE_NAME", "THREADGATE_OTEL_SERVICE_NAME", "otel_service_name"
        ),
    )
    # --- issue 27: database pool wait ---
    # How long a query waits for a connection of the app's pool (psycopg_pool's own default)
    # before failing with PoolTimeout, a transient error its callers retry: tests of an
    # outage set it short instead of waiting out 30 s.
    db_pool_timeout_s: float = Field(default=30.0, gt=0)
    # --- issue 29: process layout ---
    # Executing processes per pod (app/pod.py): one event loop per core. 1: the pod is one
    # process, as before. N: a supervisor and N processes on the API port, executor ids
    # POD_NAME, POD_NAME-1, ..., the pod's probes and metrics on its admin port
    # (THREADGATE_METRICS_PORT, else the API port + 1).
    processes: int = Field(default=1, ge=1, le=64)
    # Set by the pod's supervisor for its processes: the API socket it listens on, inherited.
    listen_fd: int = Field(default=-1, ge=-1)
    metrics_host: str = ""  # where THREADGATE_METRICS_PORT listens (default: THREADGATE_HOST)

    @field_validator("pod_name")
    @classmethod
    def _strip(cls, value: str) -> str:
        return value.strip()

    @field_validator("port", "metrics_port", mode="before")
    @classmethod
    def _not_a_service_link(cls, value: object, info: ValidationInfo) -> object:
        """Kubernetes gives every pod `<SERVICE>_PORT=tcp://10.96.0.12:80` for each Service in
        its namespace (enableServiceLinks): the Service `threadgate` sets THREADGATE_PORT,
        `threadgate-metrics` THREADGATE_METRICS_PORT. Such a value is never ours."""
        if isinstance(value, str) and SERVICE_LINK.match(value):
            return cls.model_fields[str(info.field_name)].default
        return value

    @model_validator(mode="after")
    def _identity(self) -> Settings:
        if not self.pod_name:
            if self.env == "production":
                raise ConfigError(POD_NAME_HELP)
            self.pod_name = default_dev_pod_name()
        if self.auth_enabled and not self.auth_configured:
            raise ConfigError(
                "authentication is on (THREADGATE_AUTH=on, or auto in production) but no "
                "credential is configured: set THREADGATE_API_KEYS, THREADGATE_JWT_SECRET, "
                "THREADGATE_JWT_PUBLIC_KEY_FILE or THREADGATE_JWT_JWKS_FILE "
                "(or THREADGATE_AUTH=off to run without authentication)"
            )
        if self.auth_enabled:
            _ = self.api_key_digests  # malformed or ambiguous keys fail the start
        if self.workers != 1:
            raise ConfigError(
                f"THREADGATE_WORKERS={self.workers}: a pod runs exactly one worker process. "
                "Two processes under one executor id double-execute runs; scale with more pods."
            )
        return self

    @property
    def stream_subjects(self) -> str:
        return f"{self.subject_prefix}.thread.*"

    def thread_subject(self, thread_id: str) -> str:
        return f"{self.subject_prefix}.thread.{thread_id}"

    @property
    def control_subject(self) -> str:
        return self.control_subject_name or f"{self.subject_prefix}.control"

    @property
    def json_logs(self) -> bool:
        return self.log_format == "json" or (self.log_format == "auto" and self.env == "production")

    @property
    def auth_enabled(self) -> bool:
        return self.auth == "on" or (self.auth == "auto" and self.env == "production")

    @property
    def auth_configured(self) -> bool:
        return bool(
            self.api_keys.get_secret_value()
            or self.jwt_secret.get_secret_value()
            or self.jwt_public_key_file
            or self.jwt_jwks_file
        )

    @property
    def openai_client_option_names(self) -> frozenset[str]:
        return frozenset(o.strip() for o in self.openai_client_options.split(",") if o.strip())

    @property
    def admins(self) -> frozenset[str]:
        """Principals that may read every thread (THREADGATE_ADMIN_PRINCIPALS, comma-separated)."""
        return frozenset(p.strip() for p in self.admin_principals.split(",") if p.strip())

    @cached_property
    def api_key_digests(self) -> dict[str, str]:
        """sha256 hex digest of each key → principal. Keys may be given as `sha256:<hex>`."""
        digests: dict[str, str] = {}
        for pair in self.api_keys.get_secret_value().split(","):
            pair = pair.strip()
            if not pair:
                continue
            principal, sep, key = pair.partition(":")
            if not sep or not principal or not key:
                raise ConfigError("THREADGATE_API_KEYS entries must be principal:key")
            if key.startswith("sha256:"):
                digest = key.removeprefix("sha256:")
                if not SHA256_HEX.fullmatch(digest):
                    # It would be accepted and never match: a key that works for nobody.
                    raise ConfigError(
                        f"THREADGATE_API_KEYS: the key of {principal!r} is given as sha256: but"
                        " is not 64 hex digits"
                    )
                digest = digest.lower()
            else:
                digest = hashlib.sha256(key.encode()).hexdigest()
            other = digests.get(digest)
            if other is not None and other != principal:
                # The last one would win silently: the key would log in as someone else.
                raise ConfigError(
                    f"THREADGATE_API_KEYS: one key is given to more than one principal"
                    f" ({other!r} and {principal!r})"
                )
            digests[digest] = principal
        return digests

    # --- issue 26: pages, quotas, secrets in logs ---
    # GET /threads/{t}/messages and /runs: a page's size when the client names none, and the
    # most a client may ask for (400 beyond).
    page_limit_default: int = Field(default=50, ge=1)
    page_limit_max: int = Field(default=200, ge=1)
    # Quotas per principal (docs/security.md): unset takes the environment's default
    # (production: PRODUCTION_QUOTAS; dev: off); 0 turns one off.
    quota_runs_per_day: int | None = Field(default=None, ge=0)
    quota_threads: int | None = Field(default=None, ge=0)
    quota_stored_bytes: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _pages(self) -> Settings:
        if self.page_limit_default > self.page_limit_max:
            raise ConfigError(
                "THREADGATE_PAGE_LIMIT_DEFAULT must not exceed THREADGATE_PAGE_LIMIT_MAX"
            )
        return self

    def quota(self, name: Literal["runs_per_day", "threads", "stored_bytes"]) -> int:
        """A quota in force: its setting, else the environment's default; 0 is off."""
        value: int | None = getattr(self, f"quota_{name}")
        if value is None:
            return PRODUCTION_QUOTAS[name] if self.env == "production" else 0
        return value

    def secret_values(self) -> list[str]:
        """Every secret this pod holds, in plain text: the log masks each (app/logs.py)."""
        from psycopg.conninfo import conninfo_to_dict

        found = [
            s.get_secret_value()
            for s in (self.openai_api_key, self.nats_password, self.nats_token, self.jwt_secret)
        ]
        # An unparsable URL fails the start elsewhere, with its own message.
        with contextlib.suppress(Exception):
            url = self.database_url.get_secret_value()
            found.append(str(conninfo_to_dict(url).get("password") or ""))
        for pair in self.api_keys.get_secret_value().split(","):
            key = pair.partition(":")[2].strip()
            if key and not key.startswith("sha256:"):
                found.append(key)
        return [s for s in found if s]


def load_settings(**overrides: object) -> Settings:
    """Read settings from the environment; `overrides` win (used by tests and the CLI)."""
    return Settings(**overrides)  # type: ignore[arg-type]
