"""Who is calling: bearer API keys and JWTs (HS256, or RS256 from a PEM or a local JWKS file).

`authenticate` answers a Principal or None and never says why a credential failed: callers
turn None into one 401 whatever the cause (expired, bad signature, unknown key).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from .errors import ConfigError
from .settings import Settings

logger = logging.getLogger(__name__)

MAX_TOKEN_CHARS = 8192  # longer is no credential of ours: refuse before hashing or decoding
MIN_HS256_SECRET_BYTES = 32  # RFC 7518 §3.2: a key at least as long as the hash
MIN_RSA_BITS = 2048


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller. The empty name is the anonymous caller of a pod with auth off."""

    name: str
    admin: bool = False

    @property
    def anonymous(self) -> bool:
        return not self.name

    def may_read(self, owner: str) -> bool:
        """Admins (and everyone when auth is off) read every thread; others their own."""
        return self.admin or self.anonymous or self.name == owner

    def may_write(self, owner: str) -> bool:
        """Posting and cancelling are the owner's alone (everyone's when auth is off): being an
        admin widens reading only."""
        return self.anonymous or self.name == owner


ANONYMOUS = Principal("", admin=True)


def authenticate(
    settings: Settings, header: str | None, query_token: str | None
) -> Principal | None:
    """The caller of a request, or None when auth is on and no valid credential came.

    `header` is the Authorization header; `query_token` is `?access_token=` (only the attach
    route passes it: browsers' EventSource cannot set headers). The header wins when present.
    """
    if not settings.auth_enabled:
        return ANONYMOUS
    token = bearer_token(header) if header is not None else query_token
    if not token or len(token) > MAX_TOKEN_CHARS:
        return None
    name = _api_key_principal(settings, token)
    if name is None and _looks_like_jwt(token):
        name = _jwt_principal(settings, token)
    if not name:
        return None
    return Principal(name, admin=name in settings.admins)


def bearer_token(header: str) -> str | None:
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def _api_key_principal(settings: Settings, token: str) -> str | None:
    digests = settings.api_key_digests
    if not digests:
        return None
    presented = hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()
    found: str | None = None
    # Compare against every key, in constant time each: no early exit to time.
    for digest, principal in digests.items():
        if hmac.compare_digest(presented, digest):
            found = principal
    return found


def _looks_like_jwt(token: str) -> bool:
    return token.count(".") == 2


def _jwt_principal(settings: Settings, token: str) -> str | None:
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        return None
    alg = header.get("alg")
    key: Any
    if alg == "HS256" and settings.jwt_secret.get_secret_value():
        key = settings.jwt_secret.get_secret_value()
    elif alg == "RS256" and (settings.jwt_public_key_file or settings.jwt_jwks_file):
        try:
            key = _rsa_key(settings, header.get("kid"))
        except (OSError, ConfigError) as exc:
            logger.warning("JWT key unavailable: %s", exc)
            return None
        if key is None:
            return None
    else:
        return None  # `none`, an algorithm we were not configured for, or an HS/RS confusion
    try:
        claims = jwt.decode(
            token,
            key,
            algorithms=[alg],
            audience=settings.jwt_audience or None,
            issuer=settings.jwt_issuer or None,
            leeway=settings.jwt_leeway_s,
            options={"require": ["exp", "sub"]},
        )
    except jwt.PyJWTError:
        return None
    sub = claims.get("sub")
    return sub if isinstance(sub, str) and is_principal_name(sub) else None


def is_principal_name(name: str) -> bool:
    """A principal's name is stored (a thread's owner) and logged: no control characters
    (NUL above all: PostgreSQL's text cannot hold it) and no lone surrogates (not UTF-8)."""
    if not name or any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        return False
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _rsa_key(settings: Settings, kid: object) -> RSAPublicKey | None:
    """The key a token names by `kid` in the JWKS file, else the PEM key, else the only JWKS key."""
    jwks: dict[str | None, RSAPublicKey] = {}
    if settings.jwt_jwks_file:
        jwks = _jwks(settings.jwt_jwks_file, _mtime(settings.jwt_jwks_file))
        if isinstance(kid, str) and kid in jwks:
            return jwks[kid]
    if settings.jwt_public_key_file:
        return _pem(settings.jwt_public_key_file, _mtime(settings.jwt_public_key_file))
    if kid is None and len(jwks) == 1:
        return next(iter(jwks.values()))
    return None


def _mtime(path: str) -> int:
    # Keys are re-read when their file changes: a rotated Secret needs no restart.
    return os.stat(path).st_mtime_ns


@functools.lru_cache(maxsize=8)
def _pem(path: str, mtime_ns: int) -> RSAPublicKey:
    with open(path, "rb") as f:
        data = f.read()
    try:
        key = load_pem_public_key(data)
    except ValueError as exc:
        raise ConfigError(f"{path} is not a PEM public key") from exc
    return _checked_rsa(key, path)


@functools.lru_cache(maxsize=8)
def _jwks(path: str, mtime_ns: int) -> dict[str | None, RSAPublicKey]:
    with open(path, "rb") as f:
        text = f.read()
    try:
        data = json.loads(text)
        keys = data["keys"] if isinstance(data, dict) else None
        if not isinstance(keys, list):
            raise ValueError("no `keys` list")
        out: dict[str | None, RSAPublicKey] = {}
        for raw in keys:
            if not isinstance(raw, dict) or raw.get("kty") != "RSA":
                continue
            if raw.get("use", "sig") != "sig" or raw.get("alg", "RS256") != "RS256":
                continue
            jwk = jwt.PyJWK(raw, algorithm="RS256")
            out[jwk.key_id] = _checked_rsa(jwk.key, path)
    except (ValueError, KeyError, jwt.PyJWTError) as exc:
        raise ConfigError(f"{path} is not a JWKS file with RS256 keys: {exc}") from exc
    if not out:
        raise ConfigError(f"{path} holds no RS256 signing key")
    return out


def _checked_rsa(key: object, path: str) -> RSAPublicKey:
    if not isinstance(key, RSAPublicKey):
        raise ConfigError(f"{path}: RS256 needs an RSA public key")
    if key.key_size < MIN_RSA_BITS:
        raise ConfigError(f"{path}: RSA keys shorter than {MIN_RSA_BITS} bits are refused")
    return key


def check_config(settings: Settings) -> None:
    """Fail at start-up, not at the first request: keys must load and secrets be long enough."""
    if not settings.auth_enabled:
        return
    _ = settings.api_key_digests  # raises ConfigError on malformed THREADGATE_API_KEYS
    secret = settings.jwt_secret.get_secret_value()
    if secret and len(secret.encode()) < MIN_HS256_SECRET_BYTES:
        raise ConfigError(
            f"THREADGATE_JWT_SECRET must be at least {MIN_HS256_SECRET_BYTES} bytes for HS256"
        )
    try:
        if settings.jwt_public_key_file:
            _pem(settings.jwt_public_key_file, _mtime(settings.jwt_public_key_file))
        if settings.jwt_jwks_file:
            _jwks(settings.jwt_jwks_file, _mtime(settings.jwt_jwks_file))
    except OSError as exc:
        raise ConfigError(f"cannot read a JWT key file: {exc}") from exc
