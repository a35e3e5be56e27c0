"""A NATS that requires credentials (docs/security.md, "NATS"), as the manifests and compose
now run it: the pod logs in with THREADGATE_NATS_USER/PASSWORD and works; a client without
them can neither publish a stop on the control subject nor write into a reply's subject.
Over TLS too (THREADGATE_NATS_TLS_CA, a CA made here): pods stream and stop runs across pods;
a wrong password or a server certificate from another CA keeps a pod from starting, and its
log says why.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import nats
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from threadgate.client import AsyncClient
from threadgate.devstack import NatsServer, free_port
from threadgate.models.mock import mock_reply

from tests.conftest import Stack, unique
from tests.multipod.cluster import Attacher, Cluster, Pod, pod_env, unique_names, wait_run
from tests.multipod.conftest import logs_on_failure

pytestmark = pytest.mark.multipod

USER, PASSWORD = "threadgate", "nats-pw-Rt8sLq"


async def _quiet(exc: Exception) -> None:
    """nats-py's error callback (the refusal is raised by connect itself)."""


@pytest.fixture
def locked_nats(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "nats", args=["--user", USER, "--pass", PASSWORD])
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def test_a_pod_on_a_nats_that_requires_credentials(
    stack: Stack, locked_nats: NatsServer, tmp_path: Path
) -> None:
    stream, prefix = unique_names()
    env = pod_env(
        database_url=stack.new_database("natsauth"),
        nats_url=locked_nats.url,
        stream=stream,
        prefix=prefix,
        nats_user=USER,
        nats_password=PASSWORD,
    )
    pod = Pod("threadgate-0", free_port(), env, tmp_path / "pod.log")
    pod.spawn()
    try:
        await pod.wait_ready()
        async with AsyncClient(pod.url) as client:
            thread = unique()
            run = await client.post(thread, "hi", model_options={"chunks": 40, "delay_ms": 20})
            # Without credentials nobody reaches the subjects: no forged stop, no forged event.
            with pytest.raises(nats.errors.Error, match="Authorization Violation"):
                nc = await nats.connect(
                    locked_nats.url, allow_reconnect=False, connect_timeout=2, error_cb=_quiet
                )
                await nc.publish(
                    f"{prefix}.control",
                    json.dumps({"stop": run["run_id"], "reason": "cancelled"}).encode(),
                )
            reply = await client.reply(thread)
            assert reply.text == mock_reply(40) and reply.status == "success"
            assert (await wait_run(client, thread, run["run_id"]))["status"] == "success"
    finally:
        if pod.alive:
            await pod.kill()

    # The same pod without the password never becomes ready, and its log says why.
    bare = {k: v for k, v in env.items() if k != "THREADGATE_NATS_PASSWORD"}
    refused = Pod("threadgate-1", free_port(), bare, tmp_path / "refused.log")
    refused.spawn()
    try:
        async with asyncio.timeout(60):
            while "Authorization Violation" not in refused.log_text():
                assert refused.alive, refused.log_tail()
                await asyncio.sleep(0.1)  # paces reading the log
        async with httpx.AsyncClient() as http:
            with pytest.raises(httpx.TransportError):  # start-up never finished
                await http.get(f"{refused.url}/readyz")
    finally:
        await refused.kill()


# --- TLS as well: a CA of the test's own -----------------------------------------------------


@dataclass
class SecureNats:
    url: str  # tls://127.0.0.1:<port>
    ca: Path  # the CA that signed the server's certificate
    other_ca: Path  # a CA that did not


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return key, cert


def make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("nats.test"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def write_pem(path: Path, obj: x509.Certificate | ec.EllipticCurvePrivateKey) -> Path:
    if isinstance(obj, x509.Certificate):
        path.write_bytes(obj.public_bytes(serialization.Encoding.PEM))
    else:
        path.write_bytes(
            obj.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return path


@pytest.fixture(scope="module")
def secure_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureNats]:
    """nats-server with JetStream that takes only TLS connections with our user/password."""
    d = tmp_path_factory.mktemp("secure-nats")
    ca_key, ca = make_ca("threadgate test CA")
    key, cert = make_server_cert(ca_key, ca)
    _, other = make_ca("someone else's CA")
    server = NatsServer(
        d / "js",
        free_port(),
        args=[
            *("--user", USER, "--pass", PASSWORD),
            "--tls",
            *("--tlscert", str(write_pem(d / "server.pem", cert))),
            *("--tlskey", str(write_pem(d / "server.key", key))),
        ],
    )
    server.start()
    try:
        yield SecureNats(
            f"tls://127.0.0.1:{server.port}",
            write_pem(d / "ca.pem", ca),
            write_pem(d / "other-ca.pem", other),
        )
    finally:
        server.stop()


def secure_env(stack: Stack, nats: SecureNats, **knobs: str) -> dict[str, str]:
    stream, prefix = unique_names()
    settings: dict[str, str] = {
        "nats_user": USER,
        "nats_password": PASSWORD,
        "nats_tls_ca": str(nats.ca),
        **knobs,
    }
    return pod_env(
        database_url=stack.new_database("mp"),
        nats_url=nats.url,
        stream=stream,
        prefix=prefix,
        **settings,
    )


@pytest.fixture
async def secure_cluster(
    stack: Stack,
    secure_nats: SecureNats,
    tmp_path_factory: pytest.TempPathFactory,
    request: pytest.FixtureRequest,
) -> AsyncIterator[Cluster]:
    cluster = Cluster(secure_env(stack, secure_nats), tmp_path_factory.mktemp("pods"), 2)
    logs_on_failure(request, cluster)
    try:
        await cluster.start()
        yield cluster
    finally:
        await cluster.stop()


async def test_pods_stream_through_a_nats_that_requires_credentials_and_tls(
    secure_cluster: Cluster,
) -> None:
    """A reply executed on one pod streams to a client on the other (both over TLS with the
    user's credentials), and a cancel sent to the other pod reaches it on the control
    subject."""
    thread = unique()
    first, second = secure_cluster.pods
    async with secure_cluster.client([first]) as on_first:
        run = await on_first.post(thread, "hi", model_options={"chunks": 20, "vary": True})
        reply = await Attacher([second.url], thread).start().result(30)
        final = await wait_run(on_first, thread, run["run_id"])
    assert final["status"] == reply.status == "success"
    assert final["output"] == reply.text == mock_reply(20, {0: 1})

    thread = unique()
    async with secure_cluster.client([first]) as on_first:
        options = {"chunks": 200, "delay_ms": 50}
        run = await on_first.post(thread, "long", model_options=options)
        watcher = Attacher([second.url], thread).start()
        await watcher.wait_chunk(2)
    async with secure_cluster.client([second]) as on_second:
        await on_second.cancel(thread, run["run_id"], wait=True)
    assert (await watcher.result(30)).status == "cancelled"


@pytest.mark.parametrize(
    ("knobs", "says"),
    [
        ({"nats_password": "not-it"}, "Authorization Violation"),
        ({"nats_tls_ca": "other"}, "CERTIFICATE_VERIFY_FAILED"),
    ],
    ids=["wrong-password", "unknown-ca"],
)
async def test_a_pod_with_wrong_nats_settings_never_becomes_ready_and_says_why(
    stack: Stack, secure_nats: SecureNats, tmp_path: Path, knobs: dict[str, str], says: str
) -> None:
    if knobs.get("nats_tls_ca") == "other":
        knobs = {"nats_tls_ca": str(secure_nats.other_ca)}
    pod = Pod(
        "threadgate-0", free_port(), secure_env(stack, secure_nats, **knobs), tmp_path / "p.log"
    )
    pod.spawn()
    try:
        async with asyncio.timeout(60):
            while says not in pod.log_text():
                assert pod.alive, pod.log_tail()
                await asyncio.sleep(0.1)  # paces reading the log
        async with httpx.AsyncClient() as http:
            with pytest.raises(httpx.TransportError):  # start-up never finished
                await http.get(f"{pod.url}/readyz")
        assert "pod started" not in pod.log_text()
    finally:
        await pod.kill()
