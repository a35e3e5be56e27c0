from __future__ import annotations

import hashlib

import pytest
from threadgate.errors import ConfigError
from threadgate.settings import Settings, default_dev_pod_name, load_settings

pytestmark = pytest.mark.unit


def test_production_requires_pod_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("POD_NAME", raising=False)
    monkeypatch.setenv("THREADGATE_ENV", "production")
    with pytest.raises(ConfigError, match="downward API"):
        load_settings()


def test_pod_name_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("THREADGATE_ENV", "production")
    monkeypatch.setenv("POD_NAME", "threadgate-2")
    monkeypatch.setenv("THREADGATE_API_KEYS", "ops:k")
    s = load_settings()
    assert s.pod_name == "threadgate-2"
    assert s.json_logs


def test_dev_pod_name_is_stable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("POD_NAME", raising=False)
    assert load_settings().pod_name == load_settings().pod_name == default_dev_pod_name()


def test_app_version_defaults_to_package_version() -> None:
    from threadgate import __version__

    assert Settings().app_version == __version__


def test_more_than_one_worker_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("THREADGATE_WORKERS", "2")
    with pytest.raises(ConfigError, match="exactly one worker"):
        load_settings()


def test_api_keys_plain_and_hashed() -> None:
    digest = hashlib.sha256(b"s3cret").hexdigest()
    s = load_settings(api_keys=f"alice:plain-key, bob:sha256:{digest}")
    assert s.api_key_digests == {
        hashlib.sha256(b"plain-key").hexdigest(): "alice",
        digest: "bob",
    }


def test_secrets_do_not_print() -> None:
    s = load_settings(database_url="postgresql://u:hunter2@db/x", openai_api_key="sk-xyz")
    assert "hunter2" not in repr(s) and "sk-xyz" not in repr(s)


def test_subjects() -> None:
    s = load_settings(subject_prefix="tg")
    assert s.thread_subject("abc") == "tg.thread.abc"
    assert s.stream_subjects == "tg.thread.*"


@pytest.mark.parametrize("name", ["THREADGATE_PORT", "THREADGATE_METRICS_PORT"])
def test_kubernetes_service_links_do_not_shadow_ports(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """The Service `threadgate` gives every pod THREADGATE_PORT=tcp://10.96.0.12:80."""
    monkeypatch.setenv(name, "tcp://10.96.0.12:80")
    s = load_settings()
    assert (s.port, s.metrics_port) == (8000, 0)
    monkeypatch.setenv(name, "8100")
    assert 8100 in (load_settings().port, load_settings().metrics_port)


@pytest.mark.parametrize(
    "keys",
    [
        "alice:k1,bob:k1",  # one key, two principals: it would log in as the last one
        f"alice:k1,bob:sha256:{hashlib.sha256(b'k1').hexdigest()}",  # the same key, hashed
        f"alice:sha256:{'ab' * 32},bob:sha256:{'AB' * 32}",  # hex is case-insensitive
    ],
)
def test_one_key_for_two_principals_is_refused(keys: str) -> None:
    with pytest.raises(ConfigError, match="more than one principal") as caught:
        _ = load_settings(api_keys=keys).api_key_digests
    assert "k1" not in caught.value.message  # the message names principals, never keys
    # ...and the pod refuses to start with it (auth on).
    with pytest.raises(ConfigError, match="more than one principal"):
        load_settings(auth="on", api_keys=keys)


def test_the_same_key_twice_for_one_principal_is_fine() -> None:
    s = load_settings(api_keys=f"alice:k1,alice:sha256:{hashlib.sha256(b'k1').hexdigest()}")
    assert s.api_key_digests == {hashlib.sha256(b"k1").hexdigest(): "alice"}


@pytest.mark.parametrize(
    "digest", ["NOTHEX", "", "ab" * 31, "ab" * 33, "g" * 64, " " + "ab" * 32, "ab" * 31 + "a\u0663"]
)
def test_a_sha256_key_must_be_64_hex_digits(digest: str) -> None:
    """`sha256:NOTHEX` used to be accepted and never matched: a key that silently works for
    nobody."""
    with pytest.raises(ConfigError, match="64 hex digits"):
        load_settings(auth="on", api_keys=f"ops:sha256:{digest}")


def test_quotas_are_on_in_production_and_off_in_dev() -> None:
    dev = load_settings(env="dev")
    assert [dev.quota(q) for q in ("runs_per_day", "threads", "stored_bytes")] == [0, 0, 0]
    prod = load_settings(env="production", pod_name="p-0", api_keys="a:k")
    assert prod.quota("runs_per_day") == 10_000 and prod.quota("threads") == 10_000
    assert prod.quota("stored_bytes") == 1024**3
    # Each is settable, and 0 turns it off, in either environment.
    assert (
        load_settings(env="production", pod_name="p-0", api_keys="a:k", quota_threads=0).quota(
            "threads"
        )
        == 0
    )
    assert load_settings(quota_runs_per_day=5).quota("runs_per_day") == 5


def test_page_limits_must_agree() -> None:
    with pytest.raises(ConfigError):
        load_settings(page_limit_default=300, page_limit_max=200)
