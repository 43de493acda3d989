"""The options of ``scicatfs mount`` as keyword arguments (fsspec, Scitacean), for the test servers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from scicatfs.demo.fixtures import Catalog
from scicatfs.demo.server import CatalogServer
from tests.support.sshd import OpenSSHServer

__all__ = ["scicat_options"]


def scicat_options(
    catalog: Catalog, server: CatalogServer, sshd: OpenSSHServer, work: Path, *, user: str = "stibbons"
) -> dict[str, Any]:
    """What ``start_mount`` passes on the command line, as ``fsspec.filesystem("scicat", **...)`` takes it.

    Only strings and numbers, so that the options pickle to other processes.
    """
    password = work / f"{user}.password"
    password.touch(mode=0o600)
    password.write_text(catalog.users[user].password + "\n")
    return {
        "url": server.url,
        "username": user,
        "password_file": str(password),
        "sftp_host": sshd.host,
        "sftp_port": sshd.port,
        "sftp_user": sshd.username,
        "identity_file": str(sshd.client_key),
        "known_hosts": str(sshd.known_hosts),
        "cache_dir": str(work / "cache"),
    }
