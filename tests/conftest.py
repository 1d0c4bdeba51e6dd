"""Test-suite setup: the service runs monkey-patched by gevent, so the tests do too."""

from gevent import monkey

monkey.patch_all()

import pathlib  # noqa: E402
from collections.abc import Iterator  # noqa: E402

import pytest  # noqa: E402

from tests.pg_server import PgServer  # noqa: E402

CAPTURES = pathlib.Path(__file__).parent / "captures"


@pytest.fixture
def captures_dir() -> pathlib.Path:
    return CAPTURES


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """One real PostgreSQL server for the session (tests/pg_server.py); fails (never skips)
    when the binaries are missing, saying how to install them."""
    try:
        server = PgServer()
        server.start()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    yield server
    server.close()


@pytest.fixture
def pg_url(pg_server: PgServer) -> str:
    """A fresh, empty database on the session's server, as an ``[outbox] database`` URL."""
    return pg_server.create_database()
