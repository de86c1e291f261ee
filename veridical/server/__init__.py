"""``veridical serve``: an OpenAI-compatible chat server with a hallucination mitigation per request.

Layout (after vLLM's ``entrypoints/openai`` and llama-cpp-python's ``server``):
``settings`` (the start-up options, which also generate the CLI flags), ``protocol`` (request and
response models), ``serving`` (chat request -> engine job -> response), ``batcher`` (batching
onto the engine's worker thread; requests join running batches), ``media`` (image URLs within
limits), ``guard`` (API key and body size), ``app`` (``create_app`` and the routes), ``cli``
(``veridical serve``), ``bench`` (``veridical bench serve``), ``background`` (a server in a
thread, for the bench and tests). Needs the ``server`` extra: ``pip install 'veridical[server]'``.
"""

from .settings import ServerSettings


def create_app(engine, settings: ServerSettings):
    """See ``veridical.server.app.create_app`` (imported lazily: FastAPI is an optional extra)."""
    from .app import create_app as _create_app

    return _create_app(engine, settings)


__all__ = ["ServerSettings", "create_app"]
