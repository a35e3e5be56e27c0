"""Pods started as a kubelet starts them, from the rendered manifests of each overlay.

There is no cluster here, so this is the closest thing: for the threadgate StatefulSet of
dev, prod and prod-bundled, the container's environment is built as the kubelet builds it
(tests/unit/test_deploy.kubelet_env: envFrom as rendered, env with $(VAR) expansion, the
downward API, secretKeyRef, the service-link variables of every Service in the namespace
unless the pod turns them off), on top of the image's own ENV (Dockerfile). The container's
command (the manifest's, else the Dockerfile's ENTRYPOINT/CMD) runs as a local process with
that environment, as the manifest's runAsUser when the test runs as root, in the image's
WORKDIR. What is changed, and only that: the addresses of PostgreSQL, NATS and the model
endpoint (the test session's servers and a local fake), the ports (several pods share this
machine; each declared containerPort maps to a free one, and probes follow the map), the
stream's name (a namespace of its own on the shared nats-server) and, for prod, the stream's
replicas (the test's nats-server is one node; prod's 3 need a NATS cluster).

Then, with the manifest's own numbers: the startup, readiness and liveness probes answer as
declared on the declared ports; a deletion (preStop, then SIGTERM) with a run in flight ends
within terminationGracePeriodSeconds with the run finished; the shutdown after a drain that
timed out fits the margin the grace period leaves; three ordinals run and recover like the
multipod suite's pods.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import psycopg
import pytest
import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route
from threadgate.client import AsyncClient, Reply
from threadgate.devstack import free_port
from threadgate.models.mock import mock_reply

from tests.conftest import Stack, unavailable, unique
from tests.fakes.openai_server import serve_app
from tests.multipod.cluster import wait_run
from tests.unit.test_deploy import (
    BUILDS,
    THREADGATE,
    container_of,
    copy_clone,
    dockerfile_instructions,
    find,
    image_tag,
    kubelet_env,
    kustomize,
    link_variables,
    pod_spec,
    tg_statefulset,
)

pytestmark = pytest.mark.multipod

OVERLAYS = ("dev", "prod", "prod-bundled")
VENV = Path(sys.prefix)
# python:3.11-slim's own ENV (docker-library/repo-info, the digest the Dockerfile pins).
BASE_IMAGE_ENV = {
    "PATH": "/usr/local/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "PYTHON_VERSION": "3.11.15",
}
IMAGE_VENV = "/opt/venv"  # where the Dockerfile installs; here, this test's venv


# ---------------------------------------------------------------------------- the image


@dataclass
class Image:
    """What the Dockerfile's final stage gives a container: ENV, WORKDIR, ENTRYPOINT, CMD."""

    env: dict[str, str]
    workdir: str
    entrypoint: list[str]
    cmd: list[str]

    @classmethod
    def from_dockerfile(cls, venv: Path) -> Image:
        stages: list[list[tuple[str, str]]] = []
        for word, rest in dockerfile_instructions():
            if word == "FROM":
                stages.append([])
            elif stages:
                stages[-1].append((word, rest))
        env = dict(BASE_IMAGE_ENV)
        workdir, entrypoint, cmd = "/", [], []
        for word, rest in stages[-1]:
            if word == "ENV":
                for pair in shlex.split(rest):
                    name, _, value = pair.partition("=")
                    env[name] = re.sub(r"\$(\w+)", lambda m: env.get(m.group(1), ""), value)
            elif word == "WORKDIR":
                workdir = rest
            elif word == "ENTRYPOINT":
                entrypoint = yaml.safe_load(rest)
            elif word == "CMD":
                cmd = yaml.safe_load(rest)
        # The image's venv is this test's (same packages, same console script).
        env = {k: v.replace(IMAGE_VENV, str(venv)) for k, v in env.items()}
        return cls(env, workdir, entrypoint, cmd)


def reachable_by_others(path: Path) -> bool:
    real = Path(os.path.realpath(path))
    return all(p.stat().st_mode & 0o001 for p in (real, *real.parents))


@pytest.fixture(scope="module")
def image() -> Iterator[Image]:
    """The Dockerfile's image, its /opt/venv being this test's venv.

    The pod's user must be able to run it. This venv's interpreter may live where only root
    can go (/root/.pyenv here): then a venv on the system's Python of the same minor version
    that sees this venv's packages stands in for it (the packages and the console script are
    the same; the interpreter is the one any account can run).
    """
    if os.geteuid() != 0 or reachable_by_others(Path(sys.executable)):
        yield Image.from_dockerfile(VENV)
        return
    minor = f"python{sys.version_info.major}.{sys.version_info.minor}"
    system = shutil.which(minor, path="/usr/local/bin:/usr/bin:/bin")
    if system is None or not reachable_by_others(Path(system)):
        unavailable(f"no {minor} that the pod's user can run (this one is {sys.executable})")
    if not reachable_by_others(VENV / "lib" / minor / "site-packages"):
        # A checkout in a private folder (a clone under mktemp -d): its .venv, and the
        # package it installs in editable mode, are out of the pod's user's reach.
        unavailable(f"the pod's user cannot read {VENV} (a checkout in a private folder)")
    venv = Path(tempfile.mkdtemp(prefix="threadgate-pod-venv-", dir="/tmp"))
    venv.chmod(0o755)
    subprocess.run([system, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = venv / "lib" / minor / "site-packages"
    ours = VENV / "lib" / minor / "site-packages"
    (site / "threadgate-test.pth").write_text(f"import site; site.addsitedir({str(ours)!r})\n")
    script = (VENV / "bin" / "threadgate").read_text().split("\n", 1)[1]
    (venv / "bin" / "threadgate").write_text(f"#!{venv}/bin/python\n{script}")
    (venv / "bin" / "threadgate").chmod(0o755)
    try:
        yield Image.from_dockerfile(venv)
    finally:
        shutil.rmtree(venv, ignore_errors=True)


# ---------------------------------------------------------------------------- a fake model


def words(n: int) -> str:
    return "".join(f"word-{i} " for i in range(n))


class SlowOpenAI:
    """An OpenAI-compatible chat-completions stream: `slow:N:MS` → N words, one every MS ms."""

    def __init__(self) -> None:
        self.app = Starlette(routes=[Route("/v1/chat/completions", self.chat, methods=["POST"])])

    async def chat(self, request: Request) -> StreamingResponse:
        prompt = (await request.json())["messages"][-1]["content"]
        m = re.fullmatch(r"slow:(\d+):(\d+)", prompt)
        n, ms = (int(m.group(1)), int(m.group(2))) if m else (5, 0)
        return StreamingResponse(self.events(n, ms), media_type="text/event-stream")

    async def events(self, n: int, ms: int) -> AsyncIterator[bytes]:
        for i in range(n):
            await asyncio.sleep(ms / 1000)  # the model's pace: what makes a reply long
            delta = {"choices": [{"index": 0, "delta": {"content": f"word-{i} "}}]}
            yield f"data: {json.dumps(delta)}\n\n".encode()
        yield b'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}\n\n'
        yield b"data: [DONE]\n\n"


@pytest.fixture
async def model_url() -> AsyncIterator[str]:
    async with serve_app(SlowOpenAI().app) as url:
        yield f"{url}/v1"


# ---------------------------------------------------------------------------- manifests


@pytest.fixture(scope="module")
def clone_k8s(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_clone(tmp_path_factory.mktemp("clone"))


def operator_secret() -> dict[str, Any]:
    """The Secret an operator creates for prod/prod-bundled (secret.example.yaml's keys)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "threadgate-secrets"},
        "stringData": {
            "THREADGATE_DATABASE_URL": (
                f"postgresql://threadgate:{secrets.token_hex(8)}@db.example.internal:5432/threadgate"
            ),
            "THREADGATE_API_KEYS": f"ops:{secrets.token_hex(12)}",
            "THREADGATE_OPENAI_API_KEY": "sk-test",
            "POSTGRES_PASSWORD": secrets.token_hex(12),
        },
    }


@dataclass
class Manifest:
    """The threadgate pod of one rendered overlay, and the namespace it lands in."""

    build: str
    objs: tuple[dict[str, Any], ...]
    extra: tuple[dict[str, Any], ...]  # in the namespace, not rendered: the operator's Secret

    @property
    def spec(self) -> dict[str, Any]:
        return pod_spec(self.objs)

    @property
    def container(self) -> dict[str, Any]:
        return container_of(self.objs)

    @property
    def ports(self) -> dict[str, int]:
        return {p["name"]: p["containerPort"] for p in self.container["ports"]}

    @property
    def grace_s(self) -> float:
        return float(self.spec.get("terminationGracePeriodSeconds", 30))

    def env(self, pod_name: str) -> dict[str, str]:
        return kubelet_env(self.objs, pod_name=pod_name, extra=self.extra)

    def command(self, image: Image) -> list[str]:
        """Kubernetes' rule: `command` replaces ENTRYPOINT (and drops CMD), `args` replaces CMD."""
        command = self.container.get("command")
        args = self.container.get("args")
        if command:
            return [*command, *(args or [])]
        return [*image.entrypoint, *(args if args is not None else image.cmd)]


def manifest(clone_k8s: Path, build: str) -> Manifest:
    objs = kustomize(clone_k8s / BUILDS[build])
    rendered_secret = find(objs, "Secret", "threadgate-secrets")
    return Manifest(build, objs, () if rendered_secret else (operator_secret(),))


# ---------------------------------------------------------------------------- the pods


def run_as(spec: dict[str, Any]) -> dict[str, Any]:
    """Popen arguments that drop to the pod's runAsUser/runAsGroup, when this test is root."""
    ctx = spec.get("securityContext", {})
    uid, gid = ctx.get("runAsUser"), ctx.get("runAsGroup", ctx.get("runAsUser"))
    assert uid not in (None, 0) and ctx.get("runAsNonRoot") is True
    if os.geteuid() != 0:
        return {}
    try:
        pwd.getpwuid(uid)
    except KeyError:  # the image has this account; give this machine one like it
        subprocess.run(["groupadd", "--system", "--gid", str(gid), f"tg{gid}"], check=False)
        subprocess.run(
            [
                "useradd",
                "--system",
                "--uid",
                str(uid),
                "--gid",
                str(gid),
                "--no-create-home",
                "--home-dir",
                "/tmp",
                "--shell",
                "/usr/sbin/nologin",
                f"tg{uid}",
            ],
            check=True,
            capture_output=True,
        )
    return {"user": uid, "group": gid, "extra_groups": []}


@dataclass
class Namespace:
    """What the pods of one overlay share: their database, stream and the local addresses."""

    manifest: Manifest
    image: Image
    stack: Stack
    database: str
    model_url: str
    log_dir: Path
    stream: str = field(default_factory=lambda: f"KUBELET_{uuid.uuid4().hex[:8]}")

    def overrides(self, env: dict[str, str], ports: dict[int, int]) -> dict[str, str]:
        """Addresses and ports of this machine instead of the cluster's, and a small stream."""
        db = urlsplit(env["THREADGATE_DATABASE_URL"])
        local = urlsplit(self.stack.pg.url(self.database))
        netloc = f"{db.username}:{db.password}@" if db.password else f"{db.username}@"
        out = {
            "THREADGATE_DATABASE_URL": urlunsplit(
                db._replace(netloc=f"{netloc}{local.hostname}:{local.port}", path=local.path)
            ),
            "THREADGATE_NATS_URL": self.stack.nats.url,
            "THREADGATE_STREAM_NAME": self.stream,
            "THREADGATE_SUBJECT_PREFIX": self.stream.lower(),
            "THREADGATE_PORT": str(ports[self.manifest.ports["http"]]),
            "THREADGATE_METRICS_PORT": str(ports[self.manifest.ports["metrics"]]),
        }
        if env.get("THREADGATE_MODEL") == "openai":
            out["THREADGATE_OPENAI_BASE_URL"] = self.model_url
        # The manifests' 1 GiB is reserved up front on the suite's shared nats-server
        # (tests/conftest.py): a test's stream is small.
        out["THREADGATE_STREAM_MAX_BYTES"] = str(256 * 1024**2)
        if env.get("THREADGATE_STREAM_REPLICAS", "1") != "1":
            out["THREADGATE_STREAM_REPLICAS"] = "1"  # one nats-server here (module docstring)
        return out

    def pod(self, ordinal: int) -> Pod:
        name = f"{tg_statefulset(self.manifest.objs)['metadata']['name']}-{ordinal}"
        return Pod(self, name, {port: free_port() for port in self.manifest.ports.values()})


@dataclass
class Pod:
    ns: Namespace
    name: str
    ports: dict[int, int]  # containerPort → this machine's port
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)
    starts: int = 0
    started_at: float = 0.0
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def log_path(self) -> Path:
        return self.ns.log_dir / f"{self.ns.manifest.build}-{self.name}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports[self.ns.manifest.ports['http']]}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def build_env(self) -> dict[str, str]:
        """The image's ENV, the runtime's HOSTNAME/HOME, then the kubelet's variables."""
        kubelet = self.ns.manifest.env(self.name)
        env = {**self.ns.image.env, "HOSTNAME": self.name, "HOME": "/tmp", **kubelet}
        env.update(self.ns.overrides(kubelet, self.ports))
        env.update(self.extra_env)
        return env

    def start(self) -> None:
        assert not self.alive, f"{self.name} still runs: one process per name"
        m = self.ns.manifest
        self.env = self.build_env()
        argv = m.command(self.ns.image)
        exe = shutil.which(argv[0], path=self.env["PATH"])  # as the runtime resolves it
        assert exe, f"{argv[0]} not on the container's PATH {self.env['PATH']}"
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"=== {self.name} start #{self.starts}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [exe, *argv[1:]],
                env=self.env,
                cwd=self.ns.image.workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                **run_as(m.spec),
            )
        self.started_at = time.monotonic()

    # -- probes, as the kubelet's prober runs them

    def probe_url(self, probe: dict[str, Any]) -> str:
        http = probe["httpGet"]
        port = http["port"]
        container_port = self.ns.manifest.ports[port] if isinstance(port, str) else port
        scheme = http.get("scheme", "HTTP").lower()
        return f"{scheme}://127.0.0.1:{self.ports[container_port]}{http['path']}"

    async def probe(self, kind: str) -> bool:
        spec = self.ns.manifest.container[kind]
        try:
            async with httpx.AsyncClient(timeout=spec.get("timeoutSeconds", 1)) as http:
                resp = await http.get(self.probe_url(spec))
        except httpx.HTTPError:
            return False
        return 200 <= resp.status_code < 400

    async def until_probe(self, kind: str, budget_s: float) -> float:
        """Seconds until `kind` succeeds; fails past the budget or if the process exits."""
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        delay = 0.05
        while not await self.probe(kind):
            assert self.alive, f"{self.name} exited {self.proc and self.proc.poll()}\n{self.tail()}"
            assert loop.time() - t0 < budget_s, f"{kind} failed for {budget_s}s\n{self.tail()}"
            await asyncio.sleep(delay)  # the prober's next period (shortened: same verdict)
            delay = min(delay * 1.5, 0.5)
        return loop.time() - t0

    async def started(self) -> None:
        """The startup probe within its budget, then readiness, as the kubelet sequences them."""
        c = self.ns.manifest.container
        s = c["startupProbe"]
        budget = s.get("initialDelaySeconds", 0) + s["periodSeconds"] * s["failureThreshold"]
        await self.until_probe("startupProbe", budget - (time.monotonic() - self.started_at))
        r = c["readinessProbe"]
        await self.until_probe("readinessProbe", r["periodSeconds"] * r["failureThreshold"])

    async def kill(self) -> None:
        assert self.proc is not None
        if self.alive:
            self.proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(self.proc.wait, 10)

    async def delete(self) -> tuple[int | None, float]:
        """A pod deletion: preStop (the manifest's exec hook, as the pod's user), then SIGTERM,
        then SIGKILL at terminationGracePeriodSeconds. (exit code or None if killed, seconds)."""
        assert self.proc is not None and self.alive
        m = self.ns.manifest
        t0 = time.monotonic()
        hook = m.container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
        if hook:
            exe = shutil.which(hook[0], path=self.env["PATH"])
            assert exe, hook
            await asyncio.to_thread(
                subprocess.run, [exe, *hook[1:]], env=self.env, check=True, **run_as(m.spec)
            )
        self.proc.send_signal(signal.SIGTERM)
        return await self.wait_exit(t0, m.grace_s)

    async def wait_exit(self, t0: float, grace_s: float) -> tuple[int | None, float]:
        assert self.proc is not None
        left = grace_s - (time.monotonic() - t0)
        try:
            code: int | None = await asyncio.to_thread(self.proc.wait, max(left, 0))
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGKILL)  # the kubelet, at the end of the grace period
            await asyncio.to_thread(self.proc.wait, 10)
            code = None
        return code, time.monotonic() - t0

    def tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def records(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out


@pytest.fixture
async def namespace(
    stack: Stack,
    clone_k8s: Path,
    image: Image,
    model_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Any]:
    """namespace(build) → a Namespace; every pod started in it is killed at teardown."""
    made: list[Namespace] = []
    pods: list[Pod] = []

    def make(build: str) -> Namespace:
        m = manifest(clone_k8s, build)
        db_user = urlsplit(m.env(f"{THREADGATE}-0")["THREADGATE_DATABASE_URL"]).username
        database = f"kubelet_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(stack.pg.url("postgres"), autocommit=True) as conn:
            # The manifests' database user (the test server trusts local connections).
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (db_user,))
            if not exists.fetchone():
                with contextlib.suppress(psycopg.errors.DuplicateObject):
                    conn.execute(f'CREATE ROLE "{db_user}" LOGIN')
            conn.execute(f'CREATE DATABASE "{database}" OWNER "{db_user}"')
        ns = Namespace(
            m,
            image,
            stack,
            database,
            model_url,
            tmp_path_factory.mktemp("kubelet"),
        )
        original = ns.pod

        def pod(ordinal: int) -> Pod:
            p = original(ordinal)
            pods.append(p)
            return p

        ns.pod = pod  # type: ignore[method-assign]
        made.append(ns)
        return ns

    try:
        yield make
    finally:
        for p in pods:
            if p.alive:
                await p.kill()


def token(env: dict[str, str]) -> str:
    """A key from the pod's THREADGATE_API_KEYS (auth is on in production mode)."""
    return env["THREADGATE_API_KEYS"].split(",")[0].partition(":")[2]


def long_reply(env: dict[str, str], n: int, ms: int) -> tuple[str, dict[str, Any] | None, str]:
    """(input, model_options, the full reply) of an `n`-chunk reply paced `ms` per chunk."""
    if env["THREADGATE_MODEL"] == "openai":
        return f"slow:{n}:{ms}", None, words(n)
    return "long", {"chunks": n, "delay_ms": ms}, mock_reply(n)


async def post(
    client: AsyncClient, thread: str, env: dict[str, str], n: int, ms: int
) -> tuple[str, str]:
    text, options, full = long_reply(env, n, ms)
    accepted = await client.post(thread, text, model_options=options)
    return accepted["run_id"], full


async def watch(urls: list[str], thread: str, tok: str, seen: asyncio.Event, at: int) -> Reply:
    """Attach (reconnecting to the next pod if one dies) until `done`; `seen` is set once a
    chunk with index >= `at` arrived."""
    reply = Reply()
    async with AsyncClient(urls, token=tok) as client:
        async for ev in client.events(thread, reconnects=30):
            reply.apply(ev)
            if ev.event == "chunk" and ev.data["index"] >= at:
                seen.set()
    return reply


# ---------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("build", OVERLAYS)
def test_rendered_pod_gets_no_service_link_settings(build: str, clone_k8s: Path) -> None:
    """The Service `threadgate` would inject THREADGATE_PORT=tcp://... into the app's settings
    namespace (a crash loop before the settings learned to ignore it): the pod turns links off."""
    m = manifest(clone_k8s, build)
    assert m.spec.get("enableServiceLinks") is False
    links = link_variables(m.objs)
    assert {"THREADGATE_PORT", "THREADGATE_SERVICE_HOST"} <= links
    env = m.env(f"{THREADGATE}-0")
    leaked = sorted(k for k in env if k in links and k.startswith("THREADGATE_"))
    assert not leaked, f"service-link variables in the app's settings: {leaked}"


@pytest.mark.parametrize("build", OVERLAYS)
async def test_pod_starts_probes_and_drains_as_declared(build: str, namespace: Any) -> None:
    ns: Namespace = namespace(build)
    m = ns.manifest
    pod = ns.pod(0)
    pod.start()
    links = link_variables(m.objs)
    assert not [k for k in m.env(pod.name) if k.startswith("THREADGATE_") and k in links]
    await pod.started()
    assert await pod.probe("livenessProbe")
    async with httpx.AsyncClient(timeout=5) as http:
        ready = (await http.get(pod.probe_url(m.container["readinessProbe"]))).json()
        assert ready["status"] == "ready" and all(ready["checks"].values()), ready
        # /metrics on the metrics port only, never on the API port the Service publishes.
        metrics_url = f"http://127.0.0.1:{pod.ports[m.ports['metrics']]}/metrics"
        assert "threadgate_queue_depth" in (await http.get(metrics_url)).text
        assert (await http.get(f"{pod.url}/metrics")).status_code == 404
    # It runs as the image's version: the package version of the tag (<version>-<build>),
    # plus, in a built image, the code's digest (<version>+<digest>; a checkout has none).
    # One record per executing process (THREADGATE_PROCESSES): the pod's name, then -1, ...
    started = [r for r in pod.records() if r.get("msg") == "pod started"]
    tag = image_tag(m.container["image"]).split("-")[0]
    assert {r["version"].split("+")[0] for r in started} == {tag}
    n = int(m.env(pod.name).get("THREADGATE_PROCESSES", "1"))
    assert sorted(r["executor"] for r in started) == sorted(
        [pod.name] + [f"{pod.name}-{k}" for k in range(1, n)]
    )

    # A deletion with a run in flight: the run finishes inside the grace period.
    async with AsyncClient([pod.url], token=token(pod.env)) as client:
        thread = unique("kubelet")
        run_id, full = await post(client, thread, pod.env, 40, 100)  # 4 s of reply
        await wait_run(client, thread, run_id, lambda r: r["status"] == "running")
        deletion = asyncio.create_task(pod.delete())
        code, took = await deletion
        assert code == 0, f"exit {code} after {took:.1f}s (grace {m.grace_s}s)\n{pod.tail()}"
        assert took < m.grace_s
        pod.start()  # the StatefulSet brings the name back
        await pod.started()
        run = await wait_run(client, thread, run_id)
        assert run["status"] == "success" and run["attempt"] == 1 and run["output"] == full


async def test_shutdown_after_the_drain_fits_the_margin(namespace: Any) -> None:
    """What the app does after a drain that timed out (cancel runs still going, close) must
    fit in grace - preStop - drain. The drain is shortened here, and only here: the margin is
    what comes after it, whatever its length. The run left behind recovers by name."""
    ns: Namespace = namespace("prod")
    m = ns.manifest
    env = m.env(f"{THREADGATE}-0")
    pre_stop = float(m.container["lifecycle"]["preStop"]["exec"]["command"][1])
    drain = float(env["THREADGATE_DRAIN_TIMEOUT_S"])
    margin = m.grace_s - pre_stop - drain
    pod = ns.pod(0)
    short_drain = 2.0
    pod.extra_env = {"THREADGATE_DRAIN_TIMEOUT_S": str(short_drain)}
    pod.start()
    await pod.started()
    async with AsyncClient([pod.url], token=token(pod.env)) as client:
        thread = unique("margin")
        run_id, full = await post(client, thread, pod.env, 100, 50)  # 5 s: outlives the drain
        # An SSE client attached across the shutdown: its connection is closed too.
        mid_reply = asyncio.Event()
        watcher = asyncio.create_task(watch([pod.url], thread, token(pod.env), mid_reply, 1))
        await asyncio.wait_for(mid_reply.wait(), 30)
        t0 = time.monotonic()
        pod.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        code, took = await pod.wait_exit(t0, short_drain + margin)
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await watcher
        after_drain = took - short_drain
        print(f"\nshutdown after the drain: {after_drain:.2f}s (margin {margin:.0f}s)")
        assert code == 0, f"exit {code}: {after_drain:.1f}s after the drain\n{pod.tail()}"
        assert after_drain <= margin
        pod.extra_env = {}
        pod.start()
        await pod.started()
        run = await wait_run(client, thread, run_id, timeout=60)
        # One hand-over, one more attempt: the reply's text alone (not `vary`) would not show
        # a third attempt, nor a mix.
        assert run["status"] == "success" and run["output"] == full
        assert [a["attempt"] for a in run["attempts"]] == [1, 2], run["attempts"]


async def test_three_ordinals_run_and_recover(namespace: Any) -> None:
    """threadgate-0..2 from the prod manifest: SIGKILL the one running a reply mid-way, start
    it again under its name, and the run finishes with the full reply."""
    ns: Namespace = namespace("prod")
    pods = [ns.pod(i) for i in range(3)]
    for pod in pods:
        pod.start()
    await asyncio.gather(*(pod.started() for pod in pods))
    env = pods[0].env
    async with AsyncClient([p.url for p in pods], token=token(env)) as client:
        thread = unique("ordinals")
        run_id, full = await post(client, thread, env, 60, 50)
        run = await wait_run(client, thread, run_id, lambda r: r["status"] == "running")
        # A pod of several processes runs them as POD_NAME, POD_NAME-1, ... (app/pod.py).
        (victim,) = [p for p in pods if pod_of(run["executor"]) == p.name]
        survivors = [p.url for p in pods if p is not victim]
        mid_reply = asyncio.Event()
        watcher = asyncio.create_task(watch(survivors, thread, token(env), mid_reply, 20))
        await asyncio.wait_for(mid_reply.wait(), 30)
        await victim.kill()
        victim.start()
        await victim.started()
        run = await wait_run(client, thread, run_id, timeout=60)
        assert run["status"] == "success" and run["output"] == full
        # One kill, one replay (the text alone would hide a third attempt, or a mix).
        assert [(a["attempt"], a["kind"]) for a in run["attempts"]] == [
            (1, "first"),
            (2, "replay"),
        ], run["attempts"]
        reply = await asyncio.wait_for(watcher, 60)
        assert reply.text == full and reply.status == "success"
        # The client saw attempt 1's chunks: a continued replay keeps them (no reset), one
        # that regenerates (prod's openai, without THREADGATE_OPENAI_CONTINUE) sends one reset.
        continued = bool(run["attempts"][1].get("resume_from"))
        assert (reply.resets, reply.duplicates) == (0 if continued else 1, 0), run["attempts"]
        assistant = [m for m in await client.messages(thread) if m["role"] == "assistant"]
        assert [m["content"] for m in assistant] == [full]


def pod_of(executor: str) -> str:
    """The pod whose process has this executor id: `threadgate-1-1` is threadgate-1's."""
    name, _, k = executor.rpartition("-")
    return name if k.isdigit() and name.count("-") >= 1 and name[-1:].isdigit() else executor
