"""What a web process loads at boot, before its first request, for both entry points (ASGI and
WSGI)."""

from __future__ import annotations

import gc


def load_before_the_first_request() -> None:
    # The URL configuration, and with it every app's API, views and their imports.
    from django.urls import get_resolver

    get_resolver().url_patterns  # noqa: B018 - the access is the point: it imports them

    # The apps' Celery tasks: services enqueue them by name (base.queue), and a worker-less
    # process has not discovered them otherwise.
    from metaclaw_site.celery import app

    app.loader.import_default_modules()

    # The embedding model (skill retrieval, the runtime's hot path).
    from skills.library.embeddings import get_embedder

    get_embedder()

    # What boot loaded lives as long as the process: take it out of the collector's sight. A
    # large batch request allocates enough to set off full collections, and each would
    # otherwise walk these ~170k objects again (about 50 ms a time: over a third of the CPU of
    # 500-item batches).
    gc.collect()
    gc.freeze()
