"""Shared fixtures: tiny engines (cached per architecture) and small deterministic images."""

from __future__ import annotations

import contextlib
import functools
import os

import numpy as np
import pytest
import torch
from PIL import Image

# Without a GPU, Triton kernels run in its CPU interpreter; the flag must be set before any
# kernel is decorated, i.e. before any test module imports veridical.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import veridical  # noqa: E402

torch.set_num_threads(2)


@functools.cache
def tiny_engine(arch: str):
    return veridical.load(f"tiny-random:{arch}")


@pytest.fixture
def images() -> list[Image.Image]:
    """Four RGB images of different sizes and content."""
    rng = np.random.default_rng(0)
    return [
        Image.fromarray((rng.random((30 + 7 * i, 50 - 5 * i, 3)) * 255).astype("uint8"))
        for i in range(4)
    ]


@pytest.fixture
def prompts() -> list[str]:
    """Four prompts of different lengths (so the batch needs left padding)."""
    return [
        "what is in the image ?",
        "describe the image in detail please",
        "is there a dog",
        "how many cats are on the table in this picture",
    ]


@contextlib.contextmanager
def serve_subprocess(*flags: str):
    """``python -m veridical.server FLAGS --port P`` on a free loopback port, healthy; yields
    ``(process, url)`` and kills the process if the test left it running."""
    import socket
    import subprocess
    import sys
    import time

    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "veridical.server", *flags, "--port",
                             str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@contextlib.contextmanager
def gated_app_server(engine, settings):
    """``create_app(engine, settings)`` served on a thread; yields ``(url, app, engine,
    server)`` as a namespace, and at the end opens the engine's ``gate`` (a test wrapper's) so
    nothing waits on it, then stops the server."""
    from types import SimpleNamespace

    from veridical.server import create_app
    from veridical.server.background import ServerThread

    app = create_app(engine, settings)
    server = ServerThread(app)
    server.start()
    try:
        yield SimpleNamespace(url=server.url, app=app, engine=engine, server=server)
    finally:
        engine.gate.set()
        server.stop()
