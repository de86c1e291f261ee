"""Run an ASGI app under a real uvicorn server in a background thread, on 127.0.0.1.

``serve_in_thread(app)`` is a context manager yielding the base URL
(``http://127.0.0.1:<free port>``). The socket is bound before the thread starts (no port race),
start-up is awaited for at most ``start_timeout`` seconds, and leaving the block asks uvicorn to
shut down gracefully (requests in flight finish, then the app's lifespan shutdown runs) and joins
the thread for at most ``stop_timeout`` seconds. Used by ``veridical bench serve`` and the tests.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class ServerThread:
    """A uvicorn server on its own thread and event loop."""

    def __init__(self, app: Any, log_level: str = "warning") -> None:
        import uvicorn

        # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY on accepted sockets only when the listening
        # socket says TCP; without it every response waits ~40 ms for a delayed ACK.
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(app, log_level=log_level, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="veridical-uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start within {timeout} s")
            time.sleep(0.01)

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()


@contextmanager
def serve_in_thread(app: Any, log_level: str = "warning", start_timeout: float = 30.0,
                    stop_timeout: float = 30.0) -> Iterator[str]:
    server = ServerThread(app, log_level)
    server.start(start_timeout)
    try:
        yield server.url
    finally:
        server.stop(stop_timeout)
