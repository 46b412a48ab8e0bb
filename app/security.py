"""API key format and hashing: random keys, only a SHA-256 digest and a short prefix kept at rest."""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path

KEY_PREFIX = "lgw-"
ADMIN_KEY_PREFIX = "lgw-admin-"
# The part of a key shown in listings: the scheme plus 8 random characters.
VISIBLE_CHARS = len(KEY_PREFIX) + 8


def generate_api_key() -> str:
    # 32 random bytes: keys are unguessable, so a fast hash is enough (no password stretching needed).
    return KEY_PREFIX + secrets.token_urlsafe(32)


def generate_admin_key() -> str:
    return ADMIN_KEY_PREFIX + secrets.token_urlsafe(32)


# What generate_api_key makes: the prefix and 43 URL-safe base64 characters. Checked before the key is
# hashed or looked up, so malformed tokens cost no cache entry and no database query.
_KEY_SHAPE = re.compile(r"lgw-[A-Za-z0-9_-]{43}")


def looks_like_api_key(token: str) -> bool:
    return _KEY_SHAPE.fullmatch(token) is not None


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def visible_prefix(key: str) -> str:
    return key[:VISIBLE_CHARS]


def keys_equal(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def write_secret_file(path: Path, secret: str) -> None:
    """Replaces path with secret, readable by the owner only (never world-readable, even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")


def read_secret_file(path: Path) -> str | None:
    return path.read_text().strip() if path.is_file() else None
