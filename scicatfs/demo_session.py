"""``scicatfs demo``: the whole system on one machine, with nothing to configure.

Starts the demo catalog server and the demo SFTP server (serving the fixture
files materialized into a temporary directory), logs in as the demo user,
mounts in the foreground, prints what to try, and on Ctrl-C or SIGTERM
unmounts, stops both servers and deletes everything it created (a mountpoint
that existed before is left in place, empty).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from scicatfs.config import MountOptions
from scicatfs.demo.fixtures import Catalog
from scicatfs.demo.server import CatalogServer
from scicatfs.demo.sftp_server import DemoSFTPServer
from scicatfs.mount import run

__all__ = ["run_demo"]

DEMO_USER = "stibbons"
THAUM_FLUX = "20.500.12269/72fe3ff6-105b-4c7f-b9d0-073b67c90ec3"


def run_demo(mountpoint: Path | None, log_level: str = "warning") -> int:
    """Run the demo until interrupted; returns the exit status."""
    catalog = Catalog.load_default()
    workdir = Path(tempfile.mkdtemp(prefix="scicatfs-demo-"))
    created: Path | None = None
    try:
        root = workdir / "sftp-root"
        root.mkdir()
        catalog.materialize(root)
        password_file = workdir / "password"
        password_file.touch(mode=0o600)
        password_file.write_text(catalog.users[DEMO_USER].password + "\n")
        if mountpoint is None:
            mountpoint = workdir / "mnt"
        if not mountpoint.exists():  # `scicatfs demo /tmp/scicat` on a fresh machine just works
            mountpoint.mkdir(parents=True)
            created = mountpoint
        with CatalogServer(catalog) as server, DemoSFTPServer(root) as sftp:
            options = MountOptions(
                url=server.url,
                mountpoint=mountpoint.absolute(),
                username=DEMO_USER,
                password_file=password_file,
                sftp_host=sftp.host,
                sftp_port=sftp.port,
                sftp_user=sftp.username,
                identity_file=sftp.client_key_path,
                known_hosts=sftp.known_hosts_path,
                cache_dir=workdir / "cache",
                foreground=True,
                log_level=log_level,
            )
            return run(options, ready=_instructions(options))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        if created is not None:
            with contextlib.suppress(OSError):
                created.rmdir()


def _instructions(options: MountOptions) -> Callable[[], None]:
    def show() -> None:
        mnt = options.mountpoint
        dataset = mnt / THAUM_FLUX
        print(
            f"""
scicatfs demo: a SciCat catalog is mounted at {mnt}
  catalog {options.url} (logged in as {DEMO_USER!r}), files over SFTP from {options.sftp_host}:{options.sftp_port}

Try, in another terminal:
  ls {mnt}
  ls -l {dataset}
  cat {dataset}/metadata.json
  cat {dataset}/flux.dat
  cat {dataset}/.scicat/files.json
  ls -l {mnt}/by-group/uu            datasets by owner group, as links into the PID tree

Press Ctrl-C to unmount and stop.""",
            flush=True,
        )

    return show
