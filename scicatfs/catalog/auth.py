"""Credentials for SciCat: where they come from, and how long they last.

Precedence (first that applies wins): a token file, ``SCICAT_TOKEN``, the
systemd credential ``$CREDENTIALS_DIRECTORY/scicat-token``, a username with a
password file (logged in via ``POST /api/v3/auth/login``), else anonymous.

SciCat does not answer an expired or bad token with 401: it silently treats
the caller as anonymous. So expiry is read from the JWT itself, a token-only
mount warns before it lapses and says clearly when it has, and a mount with
login credentials logs in again before the token expires.

Secrets live in :class:`Secret`, whose repr and str never show the value;
only the code that builds the ``Authorization`` header or the login body calls
:meth:`Secret.reveal`.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import os
import stat
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import NoReturn

import trio

from scicatfs.catalog.errors import AuthenticationError

log = logging.getLogger(__name__)

TOKEN_ENV = "SCICAT_TOKEN"
SYSTEMD_TOKEN_NAME = "scicat-token"

#: Warn (token only) or log in again (with credentials) this long before expiry.
EXPIRY_MARGIN = 300.0
#: After a failed re-login while the old token still works, wait this long before trying again.
RELOGIN_BACKOFF = 30.0


class Secret:
    """A string that does not show itself in repr, str, logs or tracebacks."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        raise TypeError("a Secret cannot be pickled")


@dataclass(frozen=True, slots=True)
class Credentials:
    """What the mount authenticates with; ``source`` says where it came from (for messages)."""

    token: Secret | None = None
    username: str | None = None
    password: Secret | None = None
    source: str = "anonymous"

    @property
    def can_login(self) -> bool:
        return self.username is not None and self.password is not None

    @property
    def anonymous(self) -> bool:
        return self.token is None and not self.can_login


def resolve_credentials(
    token_file: str | os.PathLike[str] | None = None,
    username: str | None = None,
    password_file: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Credentials:
    """Pick credentials in the documented order of precedence.

    Raises :class:`AuthenticationError` with a message naming the file and the
    fix when a secret file is missing, empty, or readable by group or others.
    """
    env = os.environ if environ is None else environ
    if token_file is not None:
        token = read_secret_file(token_file, "token file")
        return Credentials(token=token, source=f"token file {os.fspath(token_file)}")
    if env.get(TOKEN_ENV, "").strip():
        return Credentials(token=Secret(env[TOKEN_ENV].strip()), source=f"${TOKEN_ENV}")
    systemd_dir = env.get("CREDENTIALS_DIRECTORY")
    if systemd_dir and (Path(systemd_dir) / SYSTEMD_TOKEN_NAME).is_file():
        path = Path(systemd_dir) / SYSTEMD_TOKEN_NAME
        # systemd makes credential files private to the unit; no mode check needed or possible.
        token = read_secret_file(path, "systemd credential", check_mode=False)
        return Credentials(token=token, source=f"systemd credential {path}")
    if username is not None or password_file is not None:
        if username is None or password_file is None:
            raise AuthenticationError("logging in needs both a username and a password file")
        return Credentials(
            username=username,
            password=read_secret_file(password_file, "password file"),
            source=f"login as {username!r}",
        )
    return Credentials()


def read_secret_file(path: str | os.PathLike[str], what: str, check_mode: bool = True) -> Secret:
    """Read a one-line secret, refusing files that others could read too."""
    try:
        with open(path, "rb") as file:
            mode = os.fstat(file.fileno()).st_mode
            if check_mode and mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise AuthenticationError(
                    f"{what} {os.fspath(path)} is accessible by group or others "
                    f"(mode {stat.S_IMODE(mode):04o}); refusing to use it. Run: chmod 600 {os.fspath(path)}"
                )
            data = file.read(1 << 16)
    except OSError as error:
        raise AuthenticationError(f"cannot read {what} {os.fspath(path)}: {error.strerror}") from None
    try:
        value = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise AuthenticationError(f"{what} {os.fspath(path)} is not UTF-8 text") from None
    if not value:
        raise AuthenticationError(f"{what} {os.fspath(path)} is empty")
    return Secret(value)


def token_expiry(token: Secret) -> float | None:
    """The ``exp`` claim of a JWT in POSIX seconds, decoded locally (no signature check).

    None for tokens that are not JWTs or carry no ``exp`` (legacy opaque
    tokens, or tokens minted with "never" expiry): nothing to watch then.
    """
    parts = token.reveal().split(".")
    if len(parts) != 3:
        return None
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (binascii.Error, ValueError):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    if isinstance(exp, bool) or not isinstance(exp, (int, float)) or not math.isfinite(exp):
        return None
    return float(exp)


LoginFunction = Callable[[str, Secret], Awaitable[Secret]]


class TokenKeeper:
    """Holds the current token, watches its expiry and renews it when it can.

    ``login(username, password)`` is supplied by the client (which owns the
    HTTP connection) and returns a fresh token. Only one login runs at a time;
    concurrent callers wait for it.
    """

    def __init__(
        self, credentials: Credentials, login: LoginFunction, clock: Callable[[], float] = time.time
    ) -> None:
        self._credentials = credentials
        self._login = login
        self._clock = clock
        self._lock = trio.Lock()
        self._token: Secret | None = None
        self._expiry: float | None = None
        self._margin = EXPIRY_MARGIN
        self._next_login = 0.0
        self._warned = False
        self._expired = False
        if credentials.token is not None:
            self._set(credentials.token)

    @property
    def expiry(self) -> float | None:
        """POSIX time the current token expires, None if unknown or anonymous."""
        return self._expiry

    @property
    def expired(self) -> bool:
        """True once a token-only mount's token has lapsed (the server now sees us as anonymous)."""
        return self._expired

    @property
    def anonymous(self) -> bool:
        """True when requests go out without a token (by choice or after expiry)."""
        return self._credentials.anonymous or self._expired

    def expired_message(self) -> str:
        return (
            f"the token from {self._credentials.source} expired at {_when(self._expiry)}; "
            "the catalog now treats this mount as anonymous (public data only). "
            "Provide a fresh token and remount."
        )

    def check_startup(self) -> None:
        """Refuse a token that has already expired: mounting would only show confusing 403s."""
        if self._credentials.token is not None and self._expiry is not None and self._expiry <= self._clock():
            raise AuthenticationError(
                f"the token from {self._credentials.source} expired at {_when(self._expiry)}; "
                "get a fresh token"
            )

    async def headers(self) -> dict[str, str]:
        """The ``Authorization`` header for the next request (empty when anonymous)."""
        if self._credentials.can_login and self._needs_login():
            await self._renew()
        self._watch_expiry()
        if self._token is None or self._expired:
            return {}
        return {"Authorization": f"Bearer {self._token.reveal()}"}

    def _set(self, token: Secret) -> None:
        now = self._clock()
        self._token = token
        self._expiry = token_expiry(token)
        lifetime = None if self._expiry is None else self._expiry - now
        # Short-lived tokens (tests, strict sites) renew at half-life instead of looping on every request.
        self._margin = EXPIRY_MARGIN if lifetime is None else min(EXPIRY_MARGIN, max(lifetime, 0.0) / 2)
        self._warned = False
        self._expired = False

    def _needs_login(self) -> bool:
        if self._token is None:
            return True
        return self._expiry is not None and self._expiry - self._clock() <= self._margin

    async def _renew(self) -> None:
        async with self._lock:
            if not self._needs_login():
                return  # another task renewed while we waited
            usable = self._token is not None and (self._expiry is None or self._expiry > self._clock())
            if usable and self._clock() < self._next_login:
                return
            assert self._credentials.username is not None and self._credentials.password is not None
            try:
                token = await self._login(self._credentials.username, self._credentials.password)
            except Exception as error:
                if not usable:
                    raise
                self._next_login = self._clock() + RELOGIN_BACKOFF
                log.warning(
                    "renewing the SciCat token failed (%s); the current one is valid until %s",
                    error,
                    _when(self._expiry),
                )
                return
            self._set(token)
            log.info(
                "logged in to SciCat as %r; token valid until %s",
                self._credentials.username,
                _when(self._expiry),
            )

    def _watch_expiry(self) -> None:
        if self._credentials.can_login or self._expiry is None or self._expired:
            return
        remaining = self._expiry - self._clock()
        if remaining <= 0:
            self._expired = True
            log.error("%s", self.expired_message())
        elif remaining <= EXPIRY_MARGIN and not self._warned:
            self._warned = True
            log.warning(
                "the token from %s expires at %s (in %d s); after that the mount sees only public data",
                self._credentials.source,
                _when(self._expiry),
                remaining,
            )


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "an unknown time"
    return datetime.fromtimestamp(timestamp, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
