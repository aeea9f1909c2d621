"""Sockets of `visionops serve --workers N` (visionops.serve.supervisor)."""

from __future__ import annotations

import socket

import pytest

from visionops.serve.supervisor import Supervisor, reuse_port_socket, reuse_port_supported

pytestmark = pytest.mark.skipif(not reuse_port_supported(), reason="no SO_REUSEPORT here")


def test_workers_bind_one_port_each_with_its_own_socket() -> None:
    first = reuse_port_socket("127.0.0.1", 0)
    port = first.getsockname()[1]
    second = reuse_port_socket("127.0.0.1", port)  # a second worker on the same port
    try:
        assert second.getsockname()[1] == port and first.fileno() != second.fileno()
        assert second.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
    finally:
        first.close()
        second.close()


def test_a_port_held_by_another_server_is_refused_before_any_worker_starts() -> None:
    plain = socket.socket()
    plain.bind(("127.0.0.1", 0))
    plain.listen()
    port = plain.getsockname()[1]
    try:
        with pytest.raises(OSError):
            reuse_port_socket("127.0.0.1", port)
        supervisor = Supervisor("127.0.0.1", port, 2, {"app": "unused:app"})
        with pytest.raises(OSError):
            supervisor.run()
        assert supervisor._processes == []  # nothing was started
    finally:
        plain.close()


def test_workers_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Supervisor("127.0.0.1", 0, 0, {}).run()
