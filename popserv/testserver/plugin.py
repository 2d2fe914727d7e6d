"""
The pytest plugin (entry point C{pytest11}): a real popserv for the tests
of POP3 clients.

  - C{pop3_server}: function scope; a warm server made as new for each test
    (no users, no mail, no faults);
  - C{pop3_server_session}: one server for the whole session, its state
    kept from test to test.

Both are L{POP3TestServer}s. C{@pytest.mark.pop3_server(tls=True)} turns
TLS on for a test. Importing this module loads no Twisted: the server runs
in a subprocess.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from popserv.testserver.client import POP3TestServer, TestServerError

__all__ = ["pop3_server", "pop3_server_session"]


def pytest_configure(config: Any) -> None:
    config.addinivalue_line(
        "markers",
        "pop3_server(tls=False): how the pop3_server fixture is set up for this test",
    )


def _started(factory: Any, name: str) -> POP3TestServer:
    return POP3TestServer(factory.mktemp(name)).start()


@pytest.fixture(scope="session")
def pop3_server_session(tmp_path_factory: Any) -> Iterator[POP3TestServer]:
    """A popserv for the whole session: what one test leaves, the next one finds."""
    server = _started(tmp_path_factory, "pop3_server_session")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def _pop3_server_warm(tmp_path_factory: Any) -> Iterator[list[POP3TestServer]]:
    """The process behind C{pop3_server}, started once and reset for each test."""
    holder = [_started(tmp_path_factory, "pop3_server")]
    yield holder
    holder[0].stop()


@pytest.fixture
def pop3_server(
    _pop3_server_warm: list[POP3TestServer], request: Any, tmp_path_factory: Any
) -> POP3TestServer:
    """A popserv made as new for this test: no users, no mail, no faults, TLS off."""
    server = _pop3_server_warm[0]
    try:
        server.reset()
    except TestServerError:
        # A test killed it or it hung (the error is in its log): the next one gets a new one.
        server.stop()
        server = _pop3_server_warm[0] = _started(tmp_path_factory, "pop3_server")
    marker = request.node.get_closest_marker("pop3_server")
    if marker is not None and marker.kwargs.get("tls"):
        server.enable_tls()
    return server
