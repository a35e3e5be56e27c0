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
