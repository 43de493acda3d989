"""A Scitacean file transfer that reads through scicatfs: ``client.download_files`` from the cache.

Scripts built on Scitacean's ``Client.download_files`` keep working and get
scicatfs's reads: lazy, verified against the catalog's checksums, and served
from the cache when another read (a mount, a notebook, a previous run) already
fetched the bytes. Two ways::

    ScicatfsFileTransfer(mountpoint="/mnt/scicat")            # a running mount
    ScicatfsFileTransfer(url=..., token_file=..., sftp_host=...)  # its own layers (scicatfs.fsspec)

Scitacean chooses the local paths: its ``Client.download_files`` puts every
file directly into the target (its documented rule), while a connection used
on its own writes wherever it is told, directories included. With a mount,
``link=True`` makes each "download" a symlink into the mount instead of a
copy: the caller gets paths, and bytes move only when something reads them.
A copy is written beside its target and renamed into place when complete, so
a failed download leaves no partial file. Uploads are refused: the catalog is
read-only through scicatfs.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, NoReturn

from scitacean import Dataset, FileNotAccessibleError, RemotePath

from scicatfs.fsspec import ScicatFileSystem

__all__ = ["ScicatfsDownloadConnection", "ScicatfsFileTransfer"]

#: Bytes copied per read (the fetcher reads ahead on its own).
COPY_BUFFER = 4 * 1024 * 1024


class ScicatfsDownloadConnection:
    """Downloads of one dataset's files: each remote path is looked up in the dataset's tree."""

    def __init__(self, dataset: Dataset, opener: Callable[[str], IO[bytes]], link_to: Path | None) -> None:
        self._folder = dataset.source_folder.posix.rstrip("/")
        self._pid = str(dataset.pid)
        self._open = opener
        self._link_to = link_to

    def download_files(self, *, remote: list[RemotePath], local: list[Path]) -> None:
        """Copy (or link) each ``remote`` file, a full path on the file server, to ``local``."""
        for remote_path, local_path in zip(remote, local, strict=True):
            self.download_file(remote=remote_path, local=local_path)

    def download_file(self, *, remote: RemotePath, local: Path) -> None:
        path = f"{self._pid}/{self._relative(remote)}"
        local.parent.mkdir(parents=True, exist_ok=True)
        if self._link_to is not None:
            target = self._link_to / path
            if not target.is_file():
                raise FileNotAccessibleError(f"{target} is not a file of the mount", remote_path=remote)
            local.unlink(missing_ok=True)
            local.symlink_to(target)
            return
        partial = local.with_name(f".{local.name}.scicatfs-partial")
        try:
            with self._open(path) as source, open(partial, "wb") as sink:
                shutil.copyfileobj(source, sink, COPY_BUFFER)
            os.replace(partial, local)
        except FileNotFoundError as error:
            partial.unlink(missing_ok=True)
            raise FileNotAccessibleError(f"{remote} is not in dataset {self._pid}: {error}", remote_path=remote) from None
        except BaseException:
            partial.unlink(missing_ok=True)
            raise

    def _relative(self, remote: RemotePath) -> str:
        """The file's path inside the dataset (as scicatfs shows it) for its full remote path."""
        full = remote.posix
        if not full.startswith(f"{self._folder}/"):
            raise FileNotAccessibleError(
                f"{full} is outside the dataset's source folder {self._folder or '/'}", remote_path=remote
            )
        return full[len(self._folder) + 1 :]


class ScicatfsFileTransfer:
    """Scitacean's FileTransfer for downloads through scicatfs (a mount, or its own layers).

    ``mountpoint``: read from that running mount (``link=True``: symlinks into
    it, no copies). Otherwise the keyword arguments are the options of
    ``scicatfs mount`` (as for ``fsspec.filesystem("scicat", ...)``), and the
    transfer builds its own layers on first use.
    """

    def __init__(self, *, mountpoint: str | os.PathLike[str] | None = None, link: bool = False, **options: Any) -> None:
        if mountpoint is not None and options:
            raise TypeError(f"give a mountpoint or the catalog's options, not both: {', '.join(sorted(options))}")
        if mountpoint is None and link:
            raise TypeError("link=True needs a mountpoint to link into")
        if mountpoint is None and not options:
            raise TypeError("give a mountpoint or the catalog's options (url=..., ...)")
        self.mountpoint = None if mountpoint is None else Path(mountpoint)
        self.link = link
        self._options = options
        self._fs: ScicatFileSystem | None = None

    @property
    def filesystem(self) -> ScicatFileSystem:
        """The ``scicat://`` filesystem serving downloads when there is no mountpoint."""
        if self._fs is None:
            self._fs = ScicatFileSystem(**self._options)
        return self._fs

    @contextmanager
    def connect_for_download(
        self, dataset: Dataset, representative_file_path: RemotePath
    ) -> Iterator[ScicatfsDownloadConnection]:
        """A connection for ``dataset``'s files; FileNotAccessibleError if scicatfs cannot see it."""
        pid = str(dataset.pid)
        if self.mountpoint is not None:
            root = self.mountpoint
            if not (root / pid).is_dir():
                raise FileNotAccessibleError(f"dataset {pid} is not in the mount at {root}",
                                             remote_path=representative_file_path)  # fmt: skip
            yield ScicatfsDownloadConnection(dataset, lambda path: open(root / path, "rb"),
                                             root if self.link else None)  # fmt: skip
            return
        fs = self.filesystem
        if not fs.isdir(pid):
            raise FileNotAccessibleError(f"dataset {pid} is not in the catalog at {fs.mount_options.url}",
                                         remote_path=representative_file_path)  # fmt: skip
        yield ScicatfsDownloadConnection(dataset, lambda path: fs.open(path, "rb"), None)

    @contextmanager
    def connect_for_upload(self, dataset: Dataset, representative_file_path: RemotePath) -> Iterator[NoReturn]:
        """Refused: scicatfs reads datasets, it never writes them."""
        raise NotImplementedError("scicatfs is read-only: upload with another file transfer (e.g. SFTPFileTransfer)")
        yield  # type: ignore[unreachable]
