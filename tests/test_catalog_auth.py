"""Credential resolution and token lifetime, without a server."""

from __future__ import annotations

import base64
import json
import logging
import pickle

import pytest
import trio

from scicatfs.catalog.auth import Credentials, Secret, TokenKeeper, resolve_credentials, token_expiry
from scicatfs.catalog.errors import AuthenticationError, CatalogUnavailable


def jwt(exp: float | None) -> str:
    def part(data: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    claims = {"username": "user1"} if exp is None else {"username": "user1", "exp": exp}
    return f"{part({'alg': 'HS256'})}.{part(claims)}.signature"


def secret_file(tmp_path, name: str, text: str, mode: int = 0o600):
    path = tmp_path / name
    path.write_text(text + "\n")
    path.chmod(mode)
    return path


def test_precedence(tmp_path):
    token_file = secret_file(tmp_path, "token", "from-file")
    creds_dir = tmp_path / "creds"
    creds_dir.mkdir()
    secret_file(creds_dir, "scicat-token", "from-systemd")
    password = secret_file(tmp_path, "pw", "hunter2")
    env = {"SCICAT_TOKEN": "from-env", "CREDENTIALS_DIRECTORY": str(creds_dir)}

    chosen = resolve_credentials(token_file, "user1", password, env)
    assert chosen.token.reveal() == "from-file"
    chosen = resolve_credentials(None, "user1", password, env)
    assert chosen.token.reveal() == "from-env"
    del env["SCICAT_TOKEN"]
    chosen = resolve_credentials(None, "user1", password, env)
    assert chosen.token.reveal() == "from-systemd"
    chosen = resolve_credentials(None, "user1", password, {})
    assert (chosen.username, chosen.password.reveal(), chosen.token) == ("user1", "hunter2", None)
    assert chosen.can_login
    assert resolve_credentials(environ={}).anonymous


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_token_file_readable_by_others_is_refused(tmp_path, mode):
    path = secret_file(tmp_path, "token", "t", mode)
    with pytest.raises(AuthenticationError, match=f"chmod 600 {path}"):
        resolve_credentials(path, environ={})


def test_password_file_readable_by_others_is_refused(tmp_path):
    path = secret_file(tmp_path, "pw", "hunter2", 0o644)
    with pytest.raises(AuthenticationError, match="group or others"):
        resolve_credentials(username="user1", password_file=path, environ={})


def test_unusable_secret_files(tmp_path):
    with pytest.raises(AuthenticationError, match="cannot read token file"):
        resolve_credentials(tmp_path / "missing", environ={})
    with pytest.raises(AuthenticationError, match="is empty"):
        resolve_credentials(secret_file(tmp_path, "empty", "  "), environ={})
    with pytest.raises(AuthenticationError, match="both a username and a password file"):
        resolve_credentials(username="user1", environ={})


def test_secrets_never_show_themselves(tmp_path):
    creds = Credentials(token=Secret("tok-123"), username="u", password=Secret("pw-456"))
    for text in (repr(creds), str(creds), repr(creds.token), f"{creds.password}", str([creds])):
        assert "tok-123" not in text and "pw-456" not in text
    with pytest.raises(TypeError):
        pickle.dumps(creds.token)


def test_token_expiry_is_read_from_the_jwt():
    assert token_expiry(Secret(jwt(1234567890))) == 1234567890.0
    assert token_expiry(Secret(jwt(None))) is None
    assert token_expiry(Secret("opaque-legacy-token")) is None
    assert token_expiry(Secret("a.!!!.c")) is None


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.mark.allow_log(
    r"WARNING .*: the token from \$SCICAT_TOKEN expires at .* after that the mount sees only public data",
    r"ERROR .*: the token from \$SCICAT_TOKEN expired at .*treats this mount as anonymous",
)
def test_token_only_warns_then_goes_anonymous(caplog):
    clock = Clock(1000.0)

    async def no_login(username, password):
        raise AssertionError("a token-only mount never logs in")

    keeper = TokenKeeper(Credentials(token=Secret(jwt(1000 + 3600)), source="$SCICAT_TOKEN"), no_login, clock)

    async def run():
        with caplog.at_level(logging.INFO, logger="scicatfs.catalog.auth"):
            assert (await keeper.headers())["Authorization"].startswith("Bearer ")
            assert not caplog.records
            clock.now = 1000 + 3600 - 200
            await keeper.headers()
            await keeper.headers()
            assert len(caplog.records) == 1 and "expires at" in caplog.text
            clock.now = 1000 + 3601
            assert await keeper.headers() == {}
            assert await keeper.headers() == {}
        assert keeper.expired and keeper.anonymous
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1 and "treats this mount as anonymous" in errors[0].getMessage()

    trio.run(run)


def test_expired_token_is_refused_at_startup():
    keeper = TokenKeeper(Credentials(token=Secret(jwt(10)), source="token file t"), None, Clock(20.0))
    with pytest.raises(AuthenticationError, match="token file t expired at 1970-01-01 00:00:10 UTC"):
        keeper.check_startup()


def test_login_credentials_renew_before_expiry_once_for_concurrent_callers():
    clock = Clock(0.0)
    logins = []

    async def login(username, password):
        logins.append((username, password.reveal()))
        await trio.sleep(0.01)
        return Secret(jwt(clock.now + 3600))

    keeper = TokenKeeper(Credentials(username="u", password=Secret("p")), login, clock)

    async def run():
        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(keeper.headers)
        assert len(logins) == 1
        clock.now = 3600 - 400
        await keeper.headers()
        assert len(logins) == 1
        clock.now = 3600 - 299
        await keeper.headers()
        assert len(logins) == 2
        assert keeper.expiry == 3600 - 299 + 3600

    trio.run(run)


@pytest.mark.allow_log(r"WARNING .*: renewing the SciCat token failed \(down\); the current one is valid until")
def test_failed_renewal_keeps_the_valid_token_and_backs_off(caplog):
    clock = Clock(0.0)
    attempts = []

    async def login(username, password):
        attempts.append(clock.now)
        if len(attempts) > 1:
            raise CatalogUnavailable("down")
        return Secret(jwt(3600))

    keeper = TokenKeeper(Credentials(username="u", password=Secret("p")), login, clock)

    async def run():
        await keeper.headers()
        clock.now = 3400
        with caplog.at_level(logging.WARNING, logger="scicatfs.catalog.auth"):
            assert "Authorization" in await keeper.headers()
            assert "Authorization" in await keeper.headers()
        assert len(attempts) == 2
        assert "renewing the SciCat token failed" in caplog.text
        clock.now = 3601
        with pytest.raises(CatalogUnavailable):
            await keeper.headers()

    trio.run(run)


def test_short_lived_tokens_renew_at_half_life():
    clock = Clock(0.0)
    count = 0

    async def login(username, password):
        nonlocal count
        count += 1
        return Secret(jwt(clock.now + 10))

    keeper = TokenKeeper(Credentials(username="u", password=Secret("p")), login, clock)

    async def run():
        await keeper.headers()
        clock.now = 4
        await keeper.headers()
        assert count == 1
        clock.now = 6
        await keeper.headers()
        assert count == 2

    trio.run(run)
