"""Catalog fixtures: the packaged demo catalog and running SciCat-compatible servers.

`demo_catalog` is shared by the whole session, so tests must not mutate it;
a test that needs its own datasets builds `Catalog.load_default()` (or an empty
`Catalog`) and passes it to `make_catalog_server`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest

from scicatfs.demo.fixtures import Catalog
from scicatfs.demo.routes import nest_error
from scicatfs.demo.server import CatalogServer

__all__ = ["V3OnlyServer", "demo_catalog", "catalog_server", "make_catalog_server"]


class V3OnlyServer(CatalogServer):
    """An older backend: every /api/v4 route is unknown, answered the way Nest does.

    A fake for what the demo server cannot be configured into."""

    def dispatch(self, method: str, target: str, headers: dict[str, str], body: bytes) -> Any:
        path = urlsplit(target).path
        if path.lower().startswith("/api/v4/"):
            return nest_error(404, f"Cannot {method} {path}")
        return super().dispatch(method, target, headers, body)


@pytest.fixture(scope="session")
def demo_catalog() -> Catalog:
    """The packaged fixtures (read-only: shared by every test of the session)."""
    return Catalog.load_default()


@pytest.fixture
def make_catalog_server(demo_catalog: Catalog) -> Iterator[Callable[..., CatalogServer]]:
    """Factory `make_catalog_server(catalog=None, **kwargs) -> CatalogServer` (started).

    Every server it made is stopped after the test, whatever the outcome.
    """
    servers: list[CatalogServer] = []

    def make(catalog: Catalog | None = None, **kwargs: Any) -> CatalogServer:
        server = CatalogServer(catalog if catalog is not None else demo_catalog, **kwargs)
        servers.append(server)
        return server.start()

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def catalog_server(make_catalog_server: Callable[..., CatalogServer]) -> CatalogServer:
    """A running server with the default catalog, stopped after the test."""
    return make_catalog_server()
