"""Errors of the catalog layer.

Each class is a distinct situation the filesystem maps to its own errno, and
each message says what the user can do about it. Messages never contain a
token or a password.
"""

from __future__ import annotations

from scicatfs.errors import ScicatfsError


class CatalogError(ScicatfsError):
    """Base class: something went wrong talking to SciCat.

    ``pid`` names the dataset concerned, or is None for catalog-wide failures
    (listing, login, an unreachable server).
    """

    def __init__(self, message: str, pid: str | None = None) -> None:
        super().__init__(message)
        self.pid = pid


class DatasetNotFound(CatalogError):
    """No dataset with this PID is visible (it does not exist, or is not public)."""


class DatasetForbidden(CatalogError):
    """The dataset exists but the credentials in use may not read it."""


class AuthenticationError(CatalogError):
    """Credentials are missing, unreadable, refused by the server, or expired."""


class CatalogUnavailable(CatalogError):
    """The server did not answer usefully, even after the bounded retries."""


class BadResponse(CatalogError):
    """The server answered with something that is not a usable SciCat response."""
