"""Errors from the layers below, turned into errno in exactly one place.

FUSE can only answer a request with a number, so every exception that reaches
a handler in :mod:`scicatfs.fs.operations` goes through :func:`to_errno`, and
:func:`fuse_errors` logs one line per user-visible failure naming the PID and
the path, because the errno alone ("Input/output error") tells the user
nothing about which dataset or which server is at fault.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import pyfuse3
from cachetools import TTLCache

from scicatfs.cache.errors import IntegrityError, report_integrity
from scicatfs.catalog.errors import AuthenticationError, DatasetForbidden, DatasetNotFound
from scicatfs.errors import ScicatfsError
from scicatfs.fs.noentry import NoEntry, WrongKind

__all__ = ["NoEntry", "WrongKind", "fuse_errors", "to_errno"]

log = logging.getLogger(__name__)

#: Failure lines logged in the last seconds, so that a repeated failure is logged once.
_recent: TTLCache[str, bool] = TTLCache(maxsize=1024, ttl=10.0)


def to_errno(error: BaseException) -> int:
    """The errno a reader sees for ``error``.

    Not found is ENOENT; forbidden (including credentials the catalog refused)
    is EACCES; everything that means "the data cannot be delivered right now or
    cannot be trusted" (catalog or file server down after retries, timeouts,
    checksum mismatches, a file the server does not have) is EIO, the answer
    programs already treat as a read failure rather than a missing file.
    """
    if isinstance(error, pyfuse3.FUSEError):
        return error.errno
    if isinstance(error, WrongKind):
        return error.code
    if isinstance(error, (NoEntry, DatasetNotFound)):
        return errno.ENOENT
    if isinstance(error, (DatasetForbidden, AuthenticationError)):
        return errno.EACCES
    return errno.EIO


def _describe(error: BaseException) -> str:
    """A one-line reason; lower layers already phrase their messages for users."""
    if isinstance(error, ScicatfsError):
        return str(error) or type(error).__name__
    return f"{type(error).__name__}: {error}"


@contextmanager
def fuse_errors(operation: str, pid: str | None, path: str | None) -> Iterator[None]:
    """Turn any exception raised inside into a ``FUSEError`` and log it once.

    ``FUSEError`` passes through silently (the handler chose that answer).
    Known layer errors log one warning; anything else is a bug and logs its
    traceback. Either way pyfuse3's main loop survives: an exception other
    than ``FUSEError`` escaping a handler would tear the whole mount down.
    """
    try:
        yield
    except pyfuse3.FUSEError:
        raise
    except NoEntry as error:
        raise pyfuse3.FUSEError(errno.ENOENT) from error
    except WrongKind as error:
        raise pyfuse3.FUSEError(error.code) from error
    except Exception as error:
        code = to_errno(error)
        where = " ".join(part for part in (pid and f"pid={pid!r}", path and f"path={path!r}") if part)
        if isinstance(error, IntegrityError):  # names pid, path, expected and actual itself
            report_integrity(error)
        elif isinstance(error, ScicatfsError):
            line = f"{operation} {where}: {_describe(error)} ({errno.errorcode[code]})"
            if line not in _recent:  # the kernel retries and reads ahead: one failure, one line
                _recent[line] = True
                log.warning("%s", line)
        else:
            log.exception("%s %s: unexpected error, answering %s", operation, where, errno.errorcode[code])
        raise pyfuse3.FUSEError(code) from error
