"""The instance's secret and what is derived from it: each chat's token for the model gateway and its
password for the egress proxy. Pure, but for reading and making the secret file.

A token is an HMAC of the chat id under the instance's secret (32 random bytes in `<data_dir>/secret`, root's,
0600, made at the first start): the gateway and the proxy check it without a table, it is the same after a
restart, and it is worthless outside this instance (the real upstream has never heard of it). A chat's token
sits in its container's environment on purpose: all it can do is spend that chat's budget, through the
gateway, which the chat can do anyway.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

SECRET_BYTES = 32
MODEL_TOKEN_PREFIX = "orch-"  # so an operator who finds one in a log knows it is not an Anthropic key


def load_or_make_secret(path: Path) -> bytes:
    """The instance's secret, made (0600, root's) when the file does not exist yet; never replaced."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        return read_secret(path)
    with os.fdopen(fd, "wb") as file:
        file.write(secrets.token_bytes(SECRET_BYTES))
    return read_secret(path)


def read_secret(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as file:
        secret = file.read(SECRET_BYTES + 1)
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"{path} does not hold a secret of {SECRET_BYTES} bytes; remove it to make a new one")
    return secret


def _derive(secret: bytes, purpose: str, subject: str) -> str:
    return hmac.new(secret, f"{purpose}\0{subject}".encode(), hashlib.sha256).hexdigest()


def model_token(secret: bytes, chat_id: str) -> str:
    """The chat's key for the model gateway (its ANTHROPIC_API_KEY)."""
    return MODEL_TOKEN_PREFIX + _derive(secret, "model", chat_id)


def proxy_password(secret: bytes, username: str) -> str:
    """The password of a proxy user name (which names the chat and its egress policy)."""
    return _derive(secret, "egress", username)


def matches(expected: str, given: str) -> bool:
    """A constant-time comparison (a token is checked on every request)."""
    return hmac.compare_digest(expected.encode(), given.encode())
