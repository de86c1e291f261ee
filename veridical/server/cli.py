"""``veridical serve``: load a model and serve it over the OpenAI chat API.

``add_subcommands(subparsers)`` registers ``serve`` with one flag per ``ServerSettings`` field
(see ``settings``). Without the ``server`` extra installed, ``serve`` still exists and says what to
install. The server binds 127.0.0.1 unless ``--host`` says otherwise; binding another address
without an API key logs a warning. SIGINT/SIGTERM shut down gracefully: request bodies still
being received are answered 503 at once (``app.begin_shutdown``: a stalled upload cannot hold up
the exit), uvicorn stops accepting connections, the requests in flight finish, then the batcher
drains and stops (uvicorn then re-raises the signal, so the exit status is the signal's).
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from veridical.errors import VeridicalError

logger = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1")
INSTALL_HINT = "install the server extra: pip install 'veridical[server]'"


def add_subcommands(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "serve", help="OpenAI-compatible chat server with a mitigation per request",
        description="Serve a model over POST /v1/chat/completions (OpenAI's API). Requests may "
                    "name a mitigation in the extra body field `mitigation`.")
    try:
        from .settings import add_settings_args
    except ImportError as exc:  # pydantic missing: keep the command, explain on use
        message = f"veridical serve needs {exc.name or 'pydantic'}; {INSTALL_HINT}"
        parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        parser.set_defaults(func=lambda args: _missing(message))
        return
    add_settings_args(parser)
    parser.set_defaults(func=cmd_serve)


def _missing(message: str) -> int:
    raise VeridicalError(message)


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from .app import begin_shutdown, create_app
    except ImportError as exc:
        raise VeridicalError(f"veridical serve needs {exc.name}; {INSTALL_HINT}") from None
    import veridical

    from .settings import settings_from_args

    settings = settings_from_args(args)
    logging.getLogger("veridical").setLevel(settings.log_level.upper())
    if settings.host not in LOOPBACK and not settings.api_key:
        logger.warning("binding %s without an API key: anyone who reaches it can use the model",
                       settings.host)
    if settings.torch_threads is not None:
        import torch

        torch.set_num_threads(settings.torch_threads)
    engine = veridical.load(settings.model, **settings.engine_args())
    if settings.profile_heads and engine.head_profile is None:
        from veridical.heads import ensure_profile
        from veridical.world import resolve_data

        logger.info("profiling %s's heads on %s (once; cached for later starts)",
                    settings.model, settings.profile_heads)
        ensure_profile(engine, resolve_data(settings.profile_heads))
    app = create_app(engine, settings)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            begin_shutdown(app)  # before uvicorn waits for the requests in flight
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=settings.host, port=settings.port,
                            log_level=settings.log_level)
    Server(config).run()
    return 0
