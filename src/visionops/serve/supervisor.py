"""The worker processes of ``visionops serve --workers N``, each on its own listening socket.

uvicorn's own supervisor binds one socket and lets every worker accept from it. A worker
whose event loop wakes first accepts every connection waiting in the queue, and a
prediction server's workers wake unevenly: the one whose prediction-log thread holds the
GIL at that moment comes late. Measured with 16 keep-alive clients against two workers,
uvicorn's supervisor split the connections 15/1, 13/3 and 12/4 in half of the runs, so
one worker did most of the work while the other idled. Here every worker binds the port
itself with ``SO_REUSEPORT`` (Linux ≥ 3.9, the BSDs): the kernel picks the socket of each
new connection by a hash of its addresses, independent of which process is awake.

:class:`Supervisor` starts the workers (``multiprocessing`` *spawn*: nothing of the
parent's state is inherited), restarts one that dies, and on SIGINT/SIGTERM sends each
worker SIGTERM (uvicorn's graceful shutdown: in-flight requests finish, the prediction
log is flushed) and waits for them, killing only what is still running after
``graceful_seconds`` more.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from typing import Any

log = logging.getLogger(__name__)

#: Listen backlog of each worker's socket (uvicorn's default).
BACKLOG = 2048
#: How often the supervisor checks for dead workers (seconds).
CHECK_SECONDS = 0.5


def reuse_port_supported() -> bool:
    """Whether this platform has ``SO_REUSEPORT`` (Linux, macOS, the BSDs)."""
    return hasattr(socket, "SO_REUSEPORT")


def reuse_port_socket(host: str, port: int, backlog: int = BACKLOG) -> socket.socket:
    """A listening TCP socket on ``host:port`` that other processes may bind as well.

    Raises OSError when the address is taken by a socket without ``SO_REUSEPORT``.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _worker(host: str, port: int, config_kwargs: dict[str, Any]) -> None:
    """One worker process: its own socket, one uvicorn server on it."""
    import uvicorn

    sock = reuse_port_socket(host, port)
    uvicorn.Server(uvicorn.Config(**config_kwargs)).run(sockets=[sock])


@dataclass
class Supervisor:
    """``workers`` uvicorn servers on ``host:port``, one process and socket each.

    ``config_kwargs`` are :class:`uvicorn.Config` arguments (the app as an import string,
    so each spawned worker builds its own). ``graceful_seconds``: how long to wait for
    the workers after SIGTERM before killing them.
    """

    host: str
    port: int
    workers: int
    config_kwargs: dict[str, Any]
    graceful_seconds: float = 40.0
    _processes: list[BaseProcess] = field(default_factory=list, init=False)
    _stop: threading.Event = field(default_factory=threading.Event, init=False)

    def run(self) -> None:
        """Serve until SIGINT or SIGTERM, then stop every worker gracefully."""
        if self.workers < 1:
            raise ValueError("workers must be at least 1")
        # Fail here, in the parent, when the port is taken by another server; port 0
        # becomes one free port that every worker then binds.
        probe = reuse_port_socket(self.host, self.port)
        self.port = int(probe.getsockname()[1])
        probe.close()
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            self._processes = [self._spawn() for _ in range(self.workers)]
            log.info("started %d workers on %s:%d", self.workers, self.host, self.port)
            while not self._stop.wait(CHECK_SECONDS):
                self._replace_dead()
        finally:
            self._shutdown()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        log.info("received %s: stopping %d workers", signal.Signals(signum).name, self.workers)
        self._stop.set()

    def _spawn(self) -> BaseProcess:
        ctx = multiprocessing.get_context("spawn")
        target: Callable[..., None] = _worker
        process = ctx.Process(
            target=target, args=(self.host, self.port, self.config_kwargs), daemon=False
        )
        process.start()
        return process

    def _replace_dead(self) -> None:
        for i, process in enumerate(self._processes):
            if process.is_alive() or self._stop.is_set():
                continue
            log.warning(
                "worker %s exited with code %s: starting another", process.pid, process.exitcode
            )
            self._processes[i] = self._spawn()

    def _shutdown(self) -> None:
        for process in self._processes:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)
        for process in self._processes:
            process.join(self.graceful_seconds)
            if process.is_alive():
                log.error(
                    "worker %s did not stop in %.0f s: killed", process.pid, self.graceful_seconds
                )
                process.kill()
                process.join()
