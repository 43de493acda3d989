"""Security: secrets stay secret, the cache and the mount stay private, host keys are
checked, and nothing a catalog record says reaches outside the dataset's folder.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from scicatfs.demo.fixtures import Catalog
from scicatfs.demo.server import CatalogServer
from tests.support.mounts import Mount, daemons_of, start_mount, wait_until
from tests.support.probes import bounded
from tests.support.records import dataset_record
from tests.support.requirements import needs_root, skip_or_fail
from tests.support.sshd import OpenSSHServer
from tests.support.syslog import SyslogSocket

THAUM = "20.500.12269/72fe3ff6-105b-4c7f-b9d0-073b67c90ec3"
FORBIDDEN = "20.500.12269/d3a4e5f6-0000-4000-8000-dea15ec2e701"  # only ridcully may read it
PASSWORD = "pw-Leak-7d1f0a9e-Octarine"
OTHER_USER = "scicatfs-test"
EIO_BOUND = 75.0


def _catalog_with_leak_user() -> Catalog:
    catalog = Catalog.load_default()
    catalog.add_user("leaktest", PASSWORD, ["uu", "faculty"], "leak@uu.am")
    return catalog


def _artefacts(mount: Mount) -> dict[str, bytes]:
    """Everything a mount exposes or leaves behind, by where it came from."""
    found = {"log": mount.log.read_bytes(), "cmdline": Path(f"/proc/{mount.process.pid}/cmdline").read_bytes()}
    for directory, subdirectories, files in os.walk(mount.path):
        for name in [*files, *subdirectories]:
            path = Path(directory) / name
            for attribute in os.listxattr(path):
                found[f"xattr {attribute} of {path}"] = os.getxattr(path, attribute)
        for name in files:
            path = Path(directory) / name
            if name.endswith(".json"):  # the generated files; data files hold no secrets by construction
                found[str(path)] = path.read_bytes()
    return found


def _cache_files(cache_dir: Path) -> dict[str, bytes]:
    return {str(path): path.read_bytes() for path in cache_dir.rglob("*") if path.is_file()}


def _assert_absent(secrets: list[bytes], artefacts: dict[str, bytes]) -> None:
    for where, content in artefacts.items():
        for secret in secrets:
            assert secret not in content, f"a secret leaked into {where}"


def _visit_error_paths(mount: Mount) -> None:
    """Make the mount log every kind of failure it has: those messages carry URLs and reasons."""
    for path in (mount.path / "no-such-dataset", mount.dataset(FORBIDDEN)):
        with pytest.raises(OSError):
            os.stat(path)
    mount.server.failure_rate = 1.0
    with pytest.raises(OSError):
        os.stat(mount.path / "20.500.12269" / "unseen-during-outage")
    mount.server.failure_rate = 0.0


class _TokenLedger:
    """Every token the catalog server issues (logins too) and every one it is shown."""

    def __init__(self, server: CatalogServer) -> None:
        self.issued: list[str] = []
        self.presented: set[str] = set()
        issue, user_for = server.issue_token, server.user_for

        def issue_token(username: str, lifetime: float | None = None) -> str:
            token = issue(username, lifetime)
            self.issued.append(token)
            return token

        def check(authorization: str | None):  # type: ignore[no-untyped-def]
            if authorization and authorization.startswith("Bearer "):
                self.presented.add(authorization[len("Bearer "):].strip())
            return user_for(authorization)

        server.issue_token = issue_token  # type: ignore[method-assign]
        server.user_for = check  # type: ignore[method-assign]

    def secrets(self) -> list[bytes]:
        """Each token, and its signature alone (a log that cut a token short would still leak that)."""
        return [part.encode() for token in self.issued for part in (token, token.rsplit(".", 1)[1])]


def _private_file(path: Path, text: str) -> Path:
    path.parent.mkdir(mode=0o700, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(text + "\n")
    return path


@pytest.mark.allow_log(
    r"WARNING scicatfs\.fs\.errors: lookup pid='20\.500\.12269/d3a4e5f6-0000-4000-8000-dea15ec2e701': .* exists but the credentials in use \((token file|\$SCICAT_TOKEN|systemd credential|login as 'leaktest')",
    r"WARNING scicatfs\.fs\.errors: lookup pid='20\.500\.12269/unseen-during-outage': SciCat at \S+ is unavailable: HTTP 503",
)
@pytest.mark.allow_log(
    r"WARNING scicatfs\.fs\.namespace: PID prefix '20\.500\.12269': no usable answer from the catalog", optional=True)
def test_no_secret_in_any_artefact(make_mount, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Tokens (from a file, $SCICAT_TOKEN, a systemd credential, a login) and the password: not in
    argv, debug logs, errors, records, xattrs or the cache (umask 000)."""
    catalog = _catalog_with_leak_user()
    server = CatalogServer(catalog, jwt_secret="leak-test").start()
    ledger = _TokenLedger(server)
    try:
        # Distinct lifetimes make distinct tokens although they are issued in the same second.
        file_token, env_token, credential_token = (server.issue_token("stibbons", 3600 + n) for n in range(3))
        token_file = _private_file(tmp_path / "token", file_token)
        credentials = tmp_path / "credentials"
        _private_file(credentials / "scicat-token", credential_token)
        debug = ["--log-level", "debug", "-o", "xattrs"]
        previous_umask = os.umask(0)
        try:
            mounts: list[Mount] = [
                make_mount(catalog, user=None, server=server, args=[*debug, "--token-file", str(token_file)]),
                make_mount(catalog, user=None, server=server, args=debug, env={"SCICAT_TOKEN": env_token}),
                make_mount(catalog, user=None, server=server, args=debug,
                           env={"CREDENTIALS_DIRECTORY": str(credentials)}),
                make_mount(catalog, user="leaktest", server=server, args=debug),
            ]
        finally:
            os.umask(previous_umask)
        for mount in mounts:
            assert (mount.dataset(THAUM) / "flux.dat").read_bytes() == catalog.content(THAUM, "flux.dat")
            _visit_error_paths(mount)
        login_tokens = ledger.issued[3:]
        assert login_tokens, "the password mount logged in, so the server issued it a token"
        assert {file_token, env_token, credential_token, *login_tokens} <= ledger.presented
        secrets = [*ledger.secrets(), PASSWORD.encode()]
        for mount in mounts:
            _assert_absent(secrets, _artefacts(mount))
        for mount in mounts:
            mount.unmount()
            _assert_absent(secrets, {"log": mount.log.read_bytes(), **_cache_files(mount.cache_dir)})
            assert "DEBUG" in mount.log_text()  # the debug log was really on

        # The cache stays private although the mount ran with umask 000.
        cache = mounts[-1].cache_dir
        assert stat.S_IMODE(cache.stat().st_mode) == 0o700
        for path in cache.rglob("*"):
            expected = 0o700 if path.is_dir() else 0o600
            assert stat.S_IMODE(path.stat().st_mode) == expected, path

        # A refused login names the user, never the password it tried.
        wrong = _private_file(tmp_path / "wrong-password", "wrong-" + PASSWORD)
        mountpoint = tmp_path / "refused"
        mountpoint.mkdir()
        result = subprocess.run(
            [sys.executable, "-m", "scicatfs", "mount", str(mountpoint), "--url", server.url, "--foreground",
             "--username", "leaktest", "--password-file", str(wrong), "--log-level", "debug",
             "--cache-dir", str(tmp_path / "refused-cache")],
            check=False, capture_output=True, timeout=60)
        assert result.returncode == 1 and b"leaktest" in result.stderr
        assert PASSWORD.encode() not in result.stderr + result.stdout
    finally:
        server.stop()


class _Syslog:
    """What processes send to syslog while it runs.

    Where the machine has no syslog (a container), a socket of ours is
    /dev/log, as journald's would be; where it has one, the journal is read.
    """

    def __init__(self) -> None:
        self._since = time.time()
        self._own = None if os.path.exists(DEV_LOG) else SyslogSocket(Path(DEV_LOG))

    def text(self, identifier: str) -> bytes:
        """The messages of programs that call themselves ``identifier``."""
        if self._own is None:
            result = subprocess.run(
                ["journalctl", "--no-pager", "-o", "cat", f"--identifier={identifier}", f"--since=@{self._since:.0f}"],
                check=True, capture_output=True, timeout=30)
            return result.stdout
        tag = re.compile(r"^<\d+>" + re.escape(identifier) + r"\[\d+\]: ")
        return "\n".join(tag.sub("", m) for m in self._own.messages() if tag.match(m)).encode()

    def close(self) -> None:
        if self._own is not None:
            self._own.close()


DEV_LOG = "/dev/log"


@pytest.fixture
def syslog() -> Iterator[_Syslog]:
    skip_or_fail(needs_root(f"to bind {DEV_LOG}"))
    listener = _Syslog()
    try:
        yield listener
    finally:
        listener.close()


def test_background_mode_logs_no_secret_to_syslog(
    syslog: _Syslog, demo_sftp_files: OpenSSHServer, mountpoint: Path, tmp_path: Path
) -> None:
    """A background mount logs to syslog once it detaches: no password or login token there either."""
    catalog = _catalog_with_leak_user()
    catalog.materialize(demo_sftp_files.root)
    with CatalogServer(catalog, jwt_secret="leak-test") as server:
        ledger = _TokenLedger(server)
        password = _private_file(tmp_path / "password", PASSWORD)
        command = [
            sys.executable, "-m", "scicatfs", "mount", str(mountpoint), "--url", server.url,
            "--username", "leaktest", "--password-file", str(password), "--log-level", "debug",
            "--sftp-host", demo_sftp_files.host, "--sftp-port", str(demo_sftp_files.port),
            "--sftp-user", demo_sftp_files.username, "--identity-file", str(demo_sftp_files.client_key),
            "--known-hosts", str(demo_sftp_files.known_hosts), "--cache-dir", str(tmp_path / "cache"),
        ]
        started = subprocess.run(command, check=False, capture_output=True, timeout=60)
        assert started.returncode == 0, started.stderr
        try:
            flux = mountpoint / THAUM / "flux.dat"
            assert flux.read_bytes() == catalog.content(THAUM, "flux.dat")
            for path in (mountpoint / "no-such-dataset", mountpoint / FORBIDDEN):
                with pytest.raises(OSError):
                    os.stat(path)
        finally:
            stopped = subprocess.run([sys.executable, "-m", "scicatfs", "unmount", str(mountpoint)],
                                     check=False, capture_output=True, timeout=60)
        assert stopped.returncode == 0, stopped.stderr
        assert wait_until(lambda: not daemons_of(mountpoint), 15)
        assert ledger.issued, "the mount logged in"
        logged = syslog.text("scicatfs")
        # What the daemon logged after it detached reached syslog: debug lines and the refused lookup.
        assert b"DEBUG" in logged and f"lookup pid='{FORBIDDEN}'".encode() in logged
        _assert_absent([*ledger.secrets(), PASSWORD.encode()],
                       {"syslog": logged, "stdout and stderr": started.stdout + started.stderr})


# -- who may read the mount ------------------------------------------------------------


@pytest.fixture(scope="module")
def other_user() -> str:
    """A system account that is not root (created once if missing)."""
    if subprocess.run(["id", "-u", OTHER_USER], check=False, capture_output=True).returncode != 0:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", OTHER_USER],
                       check=True, timeout=30)
    return OTHER_USER


@pytest.fixture
def public_work() -> Iterator[Path]:
    """A work directory that every user can traverse (pytest's own tmp dirs are 0700)."""
    work = Path(tempfile.mkdtemp(prefix="scicatfs-shared-"))
    work.chmod(0o755)
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _as(user: str, *command: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["runuser", "-u", user, "--", *command], check=False, capture_output=True, timeout=30)


def _super_options(mountpoint: Path) -> list[str]:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split(" ")
        if fields[4] == str(mountpoint):
            return fields[-1].split(",")
    raise AssertionError(f"{mountpoint} is not mounted")


@pytest.mark.parametrize("allow_other", [False, True], ids=["private", "allow_other"])
def test_who_may_read_the_mount(allow_other: bool, other_user: str, public_work: Path,
                                demo_sftp_files: OpenSSHServer, demo_catalog: Catalog,
                                catalog_server: CatalogServer) -> None:
    args = ["--allow-other"] if allow_other else []
    mount = start_mount(demo_catalog, catalog_server, demo_sftp_files, public_work, args=args)
    try:
        flux = mount.dataset(THAUM) / "flux.dat"
        assert flux.read_bytes() == demo_catalog.content(THAUM, "flux.dat")
        options = _super_options(mount.path)
        listing, reading = _as(other_user, "ls", str(mount.path)), _as(other_user, "cat", str(flux))
        if allow_other:
            assert "allow_other" in options and "default_permissions" in options
            assert listing.returncode == 0 and b"20.500.12269" in listing.stdout
            assert reading.returncode == 0 and reading.stdout == demo_catalog.content(THAUM, "flux.dat")
        else:
            assert "allow_other" not in options
            assert listing.returncode != 0 and b"Permission denied" in listing.stderr
            assert reading.returncode != 0 and b"Permission denied" in reading.stderr
    finally:
        mount.unmount()


# -- SSH host keys ------------------------------------------------------------------------


def _known_hosts(tmp_path: Path, sshd: OpenSSHServer, *, changed: bool) -> Path:
    path = tmp_path / ("changed_known_hosts" if changed else "empty_known_hosts")
    if changed:
        key = tmp_path / "impostor"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True, timeout=30)
        key_type, key_text = key.with_suffix(".pub").read_text().split()[:2]
        path.write_text(f"[{sshd.host}]:{sshd.port} {key_type} {key_text}\n")
    else:
        path.write_text("")
    return path


@pytest.mark.parametrize("changed", [False, True], ids=["unknown key", "changed key"])
@pytest.mark.allow_log(r"WARNING scicatfs\.fs\.errors: read pid='20\.500\.12269/72fe3ff6-105b-4c7f-b9d0-073b67c90ec3' path='flux\.dat': 127\.0\.0\.1:\d+: host key not verified against ")
def test_unverified_host_key_is_refused(changed: bool, make_mount, demo_sftp_files: OpenSSHServer,  # type: ignore[no-untyped-def]
                                        tmp_path: Path) -> None:
    known_hosts = _known_hosts(tmp_path, demo_sftp_files, changed=changed)
    mount: Mount = make_mount(args=["--known-hosts", str(known_hosts)])
    flux = mount.dataset(THAUM) / "flux.dat"
    with pytest.raises(OSError) as raised:
        bounded(EIO_BOUND, flux.read_bytes)
    assert raised.value.errno == errno.EIO
    log = mount.log_text()
    assert "host key not verified" in log and str(known_hosts) in log


# -- nothing outside the dataset's folder ------------------------------------------------------

SECRET = b"TOP-SECRET beside the source folder\n"
ESCAPES = ["../secret.txt", "/h5sec/secret.txt", "a/../../secret.txt", "./../secret.txt", "..//secret.txt",
           "/h5sec/data/../secret.txt", "/h5sec/data/./../secret.txt", "sub/../../secret.txt", "..",
           "/h5sec", "/h5sec/data", "/", "/etc/passwd", "../data/../secret.txt", "%2e%2e/secret.txt"]


@pytest.mark.allow_log(r"WARNING scicatfs\.catalog\.models: dataset 'h5sec/(data|slash)': (dropped file |14 problems with file entries in total)")
def test_records_cannot_reach_outside_the_source_folder(make_mount, make_sshd) -> None:  # type: ignore[no-untyped-def]
    sshd: OpenSSHServer = make_sshd()
    sshd.put("/h5sec/secret.txt", SECRET)
    catalog = Catalog.load_default()
    files = [{"path": "ok.txt", "size": 12}, *({"path": path, "size": len(SECRET)} for path in ESCAPES)]
    catalog.add_dataset(dataset_record("h5sec/data", "/h5sec/data"), files)
    catalog.add_dataset(dataset_record("h5sec/slash", "/h5sec/data/"), files)
    mount: Mount = make_mount(catalog, sftp=sshd)

    # Only the entries that stay inside the folder are shown: "%2e%2e" is a literal name there.
    allowed = {"ok.txt", "%2e%2e/secret.txt"}
    generated = {"metadata.json", ".scicat/metadata.json", ".scicat/files.json"}
    for pid in ("h5sec/data", "h5sec/slash"):
        dataset = mount.dataset(pid)
        shown = {(Path(d) / n).relative_to(dataset).as_posix() for d, _, names in os.walk(dataset) for n in names}
        assert shown == allowed | generated, pid
        for name in sorted(shown):
            content = bounded(EIO_BOUND, (dataset / name).read_bytes)  # a failure to read is a failure
            assert SECRET not in content, name
            if name in allowed:  # both datasets show the one file on the server
                assert content == sshd.local_path(f"/h5sec/data/{name}").read_bytes(), name
        remote = re.findall(rb'"remote_path": "([^"]*)"', (dataset / ".scicat" / "files.json").read_bytes())
        assert sorted(remote) == [b"/h5sec/data/%2e%2e/secret.txt", b"/h5sec/data/ok.txt"]
    # The server's own log of opens: the allowed files, and never the secret.
    opened = set(sshd.sftp_opens())
    assert {"/h5sec/data/ok.txt", "/h5sec/data/%2e%2e/secret.txt"} <= opened
    assert all(path.startswith("/h5sec/data/") for path in opened), opened
    for blob in _cache_files(mount.cache_dir).values():
        assert SECRET not in blob
    # The cache holds only its index and hash-named blobs: no name from the catalog reaches the disk.
    for path in mount.cache_dir.rglob("*"):
        relative = path.relative_to(mount.cache_dir).as_posix()
        assert re.fullmatch(r"index\.sqlite3(-wal|-shm)?|blobs(/[0-9a-f]{2}(/[0-9a-f]{64})?)?", relative), relative
    assert sorted(os.listdir(mount.cache_dir.parent)) == ["cache", "mnt", "password", "scicatfs.log"]
