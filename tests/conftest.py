"""Test-suite setup: the service runs monkey-patched by gevent, so the tests do too."""

from gevent import monkey

monkey.patch_all()

import pathlib  # noqa: E402

import pytest  # noqa: E402

CAPTURES = pathlib.Path(__file__).parent / "captures"


@pytest.fixture
def captures_dir() -> pathlib.Path:
    return CAPTURES
