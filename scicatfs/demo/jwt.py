"""HS256 JSON Web Tokens with the stdlib, as the demo catalog server issues them.

scicat-backend-next signs its tokens with HS256 and a shared secret; the payload
is the user document plus `iat` and `exp` (no groups). Clients decode `exp`
without the secret, so the demo tokens must be real JWTs, not opaque strings.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

__all__ = ["encode", "decode"]

_HEADER = {"alg": "HS256", "typ": "JWT"}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sign(signing_input: str, secret: str) -> str:
    return _b64(hmac.new(secret.encode(), signing_input.encode("ascii"), hashlib.sha256).digest())


def encode(payload: dict[str, Any], secret: str) -> str:
    """A signed compact JWT for `payload`."""
    signing_input = ".".join(_b64(json.dumps(part, separators=(",", ":")).encode())
                             for part in (_HEADER, payload))
    return f"{signing_input}.{_sign(signing_input, secret)}"


def decode(token: str, secret: str, *, now: float) -> dict[str, Any] | None:
    """The payload of a valid, unexpired token, or None for anything else.

    None rather than an exception because the server treats every bad token
    the same way: the caller is anonymous.
    """
    parts = token.split(".")
    if len(parts) != 3:
        return None
    signing_input = f"{parts[0]}.{parts[1]}"
    if not hmac.compare_digest(_sign(signing_input, secret), parts[2]):
        return None
    try:
        header = json.loads(_unb64(parts[0]))
        payload = json.loads(_unb64(parts[1]))
    except ValueError:
        return None
    if not isinstance(header, dict) or header.get("alg") != "HS256" or not isinstance(payload, dict):
        return None
    exp = payload.get("exp")
    if not isinstance(exp, (int, float)) or exp <= now:
        return None
    return payload
