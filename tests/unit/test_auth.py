"""Bearer credentials: API keys (plain and sha256), JWT HS256, RS256 from a PEM or a JWKS file."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from threadgate.auth import ANONYMOUS, MAX_TOKEN_CHARS, Principal, authenticate, check_config
from threadgate.errors import ConfigError
from threadgate.settings import Settings, load_settings

pytestmark = pytest.mark.unit

SECRET = "an-hs256-secret-of-at-least-32-bytes!"
AUD, ISS = "threadgate", "https://issuer.example"


def settings(**kw: Any) -> Settings:
    return load_settings(auth="on", **kw)


def bearer(token: str) -> str:
    return f"Bearer {token}"


def claims(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"sub": "alice", "aud": AUD, "iss": ISS, "exp": int(time.time()) + 60}
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def hs256(**over: Any) -> str:
    return jwt.encode(claims(**over), SECRET, algorithm="HS256")


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def other_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def rs256(key: rsa.RSAPrivateKey, kid: str | None = None, **over: Any) -> str:
    headers = {"kid": kid} if kid else None
    return jwt.encode(claims(**over), key, algorithm="RS256", headers=headers)


def hmac_forgery(payload: dict[str, Any], secret: bytes) -> str:
    """A token PyJWT refuses to make: HS256 keyed with an RSA public key's PEM."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(payload).encode())
    sig = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


def jwks(path: Path, keys: dict[str, rsa.RSAPrivateKey]) -> Path:
    entries = []
    for kid, key in keys.items():
        jwk = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
        entries.append({**jwk, "kid": kid, "use": "sig", "alg": "RS256"})
    path.write_text(json.dumps({"keys": entries}))
    return path


# --- switching on and off ---------------------------------------------------------------


def test_auth_off_in_dev_by_default() -> None:
    s = load_settings()
    assert not s.auth_enabled
    assert authenticate(s, None, None) is ANONYMOUS
    assert authenticate(s, "Bearer garbage", None) is ANONYMOUS


def test_auth_on_in_production_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("THREADGATE_ENV", "production")
    monkeypatch.setenv("POD_NAME", "threadgate-0")
    with pytest.raises(ConfigError, match="no credential is configured"):
        load_settings()
    monkeypatch.setenv("THREADGATE_API_KEYS", "ops:k1")
    s = load_settings()
    assert s.auth_enabled
    assert authenticate(s, None, None) is None
    assert authenticate(s, bearer("k1"), None) == Principal("ops")
    assert not load_settings(auth="off").auth_enabled


def test_auth_on_requires_a_credential() -> None:
    with pytest.raises(ConfigError, match="THREADGATE_API_KEYS"):
        load_settings(auth="on")


# --- API keys ----------------------------------------------------------------------------


def test_api_keys_plain_and_sha256() -> None:
    digest = hashlib.sha256(b"bob-key").hexdigest()
    s = settings(api_keys=f"alice:alice-key,bob:sha256:{digest}")
    assert authenticate(s, bearer("alice-key"), None) == Principal("alice")
    assert authenticate(s, bearer("bob-key"), None) == Principal("bob")
    assert authenticate(s, bearer(digest), None) is None  # the digest is not the key
    assert authenticate(s, bearer("alice-key "), None) == Principal("alice")  # header whitespace
    assert authenticate(s, bearer("nope"), None) is None
    assert authenticate(s, "bearer alice-key", None) == Principal("alice")  # scheme: any case
    assert authenticate(s, "Basic alice-key", None) is None
    assert authenticate(s, "alice-key", None) is None
    assert authenticate(s, "Bearer", None) is None
    assert authenticate(s, "", None) is None
    assert authenticate(s, None, None) is None
    assert authenticate(s, bearer("x" * (MAX_TOKEN_CHARS + 1)), None) is None


def test_query_token_only_without_header() -> None:
    s = settings(api_keys="alice:alice-key,bob:bob-key")
    assert authenticate(s, None, "alice-key") == Principal("alice")
    # A header, even a bad one, wins over the query string.
    assert authenticate(s, bearer("bob-key"), "alice-key") == Principal("bob")
    assert authenticate(s, bearer("bad"), "alice-key") is None


def test_admin_principals() -> None:
    s = settings(api_keys="alice:a,root:r", admin_principals=" root , ops")
    assert authenticate(s, bearer("r"), None) == Principal("root", admin=True)
    assert authenticate(s, bearer("a"), None) == Principal("alice", admin=False)


def test_principal_access() -> None:
    alice, root = Principal("alice"), Principal("root", admin=True)
    assert alice.may_read("alice") and alice.may_write("alice")
    assert not alice.may_read("bob") and not alice.may_write("bob")
    assert not alice.may_read("")  # a thread created with auth off is nobody's
    assert root.may_read("bob") and not root.may_write("bob")
    assert ANONYMOUS.may_read("bob") and ANONYMOUS.may_write("bob")


# --- JWT HS256 ---------------------------------------------------------------------------


def hs_settings(**kw: Any) -> Settings:
    return settings(jwt_secret=SECRET, jwt_audience=AUD, jwt_issuer=ISS, **kw)


def test_hs256_valid() -> None:
    s = hs_settings(admin_principals="root")
    assert authenticate(s, bearer(hs256()), None) == Principal("alice")
    assert authenticate(s, bearer(hs256(sub="root")), None) == Principal("root", admin=True)
    assert authenticate(s, None, hs256()) == Principal("alice")


@pytest.mark.parametrize(
    "token",
    [
        pytest.param(lambda: hs256(exp=int(time.time()) - 120), id="expired"),
        pytest.param(lambda: hs256(exp=None), id="no-exp"),
        pytest.param(lambda: hs256(aud="someone-else"), id="wrong-aud"),
        pytest.param(lambda: hs256(aud=None), id="no-aud"),
        pytest.param(lambda: hs256(iss="https://evil.example"), id="wrong-iss"),
        pytest.param(lambda: hs256(iss=None), id="no-iss"),
        pytest.param(lambda: hs256(sub=None), id="no-sub"),
        pytest.param(lambda: hs256(sub=""), id="empty-sub"),
        pytest.param(lambda: hs256(nbf=int(time.time()) + 3600), id="not-yet-valid"),
        pytest.param(
            lambda: jwt.encode(claims(), "another-secret-that-is-also-32-bytes!!", "HS256"),
            id="bad-signature",
        ),
        pytest.param(lambda: hs256()[:-4] + "AAAA", id="tampered-signature"),
        pytest.param(
            lambda: jwt.encode(claims(), SECRET * 2, algorithm="HS512"), id="unconfigured-alg"
        ),
        pytest.param(lambda: jwt.encode(claims(), None, algorithm="none"), id="alg-none"),
        pytest.param(lambda: "a.b.c", id="garbage"),
    ],
)
def test_hs256_refused(token: Any) -> None:
    assert authenticate(hs_settings(), bearer(token()), None) is None


def test_leeway_accepts_slightly_expired() -> None:
    token = hs256(exp=int(time.time()) - 5)
    assert authenticate(hs_settings(jwt_leeway_s=30), bearer(token), None) == Principal("alice")
    assert authenticate(hs_settings(jwt_leeway_s=0), bearer(token), None) is None


def test_audience_and_issuer_optional() -> None:
    s = settings(jwt_secret=SECRET)
    assert authenticate(s, bearer(hs256(aud=None, iss=None)), None) == Principal("alice")
    # A token meant for an audience is refused by a pod that names none.
    assert authenticate(s, bearer(hs256(iss=None)), None) is None


def test_api_keys_and_jwt_together() -> None:
    s = hs_settings(api_keys="ops:ops-key")
    assert authenticate(s, bearer("ops-key"), None) == Principal("ops")
    assert authenticate(s, bearer(hs256()), None) == Principal("alice")


# --- JWT RS256 ---------------------------------------------------------------------------


def test_rs256_pem(tmp_path: Path, rsa_key: Any, other_rsa_key: Any) -> None:
    key_file = tmp_path / "pub.pem"
    key_file.write_bytes(pem(rsa_key))
    s = settings(jwt_public_key_file=str(key_file), jwt_audience=AUD, jwt_issuer=ISS)
    check_config(s)
    assert authenticate(s, bearer(rs256(rsa_key)), None) == Principal("alice")
    assert authenticate(s, bearer(rs256(other_rsa_key)), None) is None  # bad signature
    assert authenticate(s, bearer(rs256(rsa_key, exp=int(time.time()) - 120)), None) is None
    assert authenticate(s, bearer(rs256(rsa_key, aud="x")), None) is None
    assert authenticate(s, bearer(rs256(rsa_key, iss="x")), None) is None
    # Algorithm confusion: HS256 "signed" with the (public) PEM bytes as the HMAC secret.
    assert authenticate(s, bearer(hmac_forgery(claims(), pem(rsa_key))), None) is None
    assert authenticate(s, bearer(hs256()), None) is None  # HS256 not configured


def test_rs256_jwks_by_kid(tmp_path: Path, rsa_key: Any, other_rsa_key: Any) -> None:
    path = jwks(tmp_path / "jwks.json", {"k1": rsa_key, "k2": other_rsa_key})
    s = settings(jwt_jwks_file=str(path), jwt_audience=AUD, jwt_issuer=ISS)
    check_config(s)
    assert authenticate(s, bearer(rs256(rsa_key, "k1")), None) == Principal("alice")
    assert authenticate(s, bearer(rs256(other_rsa_key, "k2", sub="bob")), None) == Principal("bob")
    assert authenticate(s, bearer(rs256(rsa_key, "k2")), None) is None  # wrong key for kid
    assert authenticate(s, bearer(rs256(rsa_key, "k9")), None) is None  # unknown kid
    assert authenticate(s, bearer(rs256(rsa_key)), None) is None  # no kid, two keys


def test_rs256_jwks_rotation_without_restart(
    tmp_path: Path, rsa_key: Any, other_rsa_key: Any
) -> None:
    path = jwks(tmp_path / "jwks.json", {"old": rsa_key})
    s = settings(jwt_jwks_file=str(path), jwt_audience=AUD, jwt_issuer=ISS)
    assert authenticate(s, bearer(rs256(rsa_key)), None) == Principal("alice")  # the only key
    assert authenticate(s, bearer(rs256(other_rsa_key, "new")), None) is None
    jwks(path, {"new": other_rsa_key})
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert authenticate(s, bearer(rs256(other_rsa_key, "new")), None) == Principal("alice")
    assert authenticate(s, bearer(rs256(rsa_key, "old")), None) is None


def test_missing_key_file_at_request_time_is_401_not_500(tmp_path: Path, rsa_key: Any) -> None:
    path = jwks(tmp_path / "jwks.json", {"k1": rsa_key})
    s = settings(jwt_jwks_file=str(path), jwt_audience=AUD, jwt_issuer=ISS)
    path.unlink()
    assert authenticate(s, bearer(rs256(rsa_key, "k1")), None) is None


# --- start-up checks ---------------------------------------------------------------------


def test_check_config_refuses_bad_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="at least 32 bytes"):
        check_config(settings(jwt_secret="short"))
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key")
    with pytest.raises(ConfigError, match="PEM"):
        check_config(settings(jwt_public_key_file=str(bad)))
    with pytest.raises(ConfigError, match="cannot read"):
        check_config(settings(jwt_public_key_file=str(tmp_path / "missing.pem")))
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    weak = tmp_path / "weak.pem"
    weak.write_bytes(pem(small))
    with pytest.raises(ConfigError, match="2048"):
        check_config(settings(jwt_public_key_file=str(weak)))
    empty = tmp_path / "empty.json"
    empty.write_text('{"keys": []}')
    with pytest.raises(ConfigError, match="no RS256"):
        check_config(settings(jwt_jwks_file=str(empty)))
    with pytest.raises(ConfigError, match="principal:key"):
        check_config(settings(api_keys="no-colon"))
    check_config(load_settings(auth="off", jwt_secret="short"))  # off: nothing is checked


def test_a_token_over_8_kib_is_refused_even_when_it_is_a_configured_key() -> None:
    """The bound holds before any lookup: a key of 8 KiB works, one character more never does
    (an otherwise valid credential, so only the bound can refuse it)."""
    longest, too_long = "k" * MAX_TOKEN_CHARS, "k" * (MAX_TOKEN_CHARS + 1)
    s = settings(api_keys=f"alice:{longest},bob:{too_long}")
    assert authenticate(s, bearer(longest), None) == Principal("alice")
    assert authenticate(s, bearer(too_long), None) is None
    assert authenticate(s, None, too_long) is None  # ?access_token= too


def test_a_kid_in_the_jwks_wins_else_the_pem(
    tmp_path: Path, rsa_key: Any, other_rsa_key: Any
) -> None:
    """Both a PEM key and a JWKS file: a token whose `kid` the JWKS has is checked with that
    key; any other token (no kid, or a kid the JWKS lacks) with the PEM key."""
    key_file = tmp_path / "key.pem"
    key_file.write_bytes(pem(rsa_key))
    path = jwks(tmp_path / "jwks.json", {"rotated": other_rsa_key})
    s = settings(
        jwt_public_key_file=str(key_file),
        jwt_jwks_file=str(path),
        jwt_audience=AUD,
        jwt_issuer=ISS,
    )
    alice = Principal("alice")
    assert authenticate(s, bearer(rs256(other_rsa_key, "rotated")), None) == alice  # JWKS wins
    assert authenticate(s, bearer(rs256(rsa_key, "rotated")), None) is None  # not the PEM's
    assert authenticate(s, bearer(rs256(rsa_key)), None) == alice  # no kid: the PEM
    assert authenticate(s, bearer(rs256(rsa_key, "elsewhere")), None) == alice  # unknown kid
    assert authenticate(s, bearer(rs256(other_rsa_key)), None) is None  # no kid, not the PEM's
