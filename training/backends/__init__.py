"""Training backends behind one interface (``base.TrainingBackend``), chosen per project by name.

``get_backend("local", cache_dir=...)`` or ``get_backend("tinker", base_url=..., api_key=...,
timeout=..., tokenizer=...)``. Backends are built inside the worker process that uses them
(never at import time), so SDK clients are created after Celery forks.

Backends take plain data in and give plain data back: they import no app (an import-linter
contract), only Django's settings for the defaults of ``get_backend``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from training.backends.base import BackendError, TrainingBackend


def _local(**config: Any) -> TrainingBackend:
    from training.backends.local import LocalBackend

    allowed = {"cache_dir", "device", "num_threads"}
    return LocalBackend(**{k: v for k, v in config.items() if k in allowed})


def _tinker(**config: Any) -> TrainingBackend:
    from django.conf import settings

    from training.backends.tinker import TinkerBackend

    allowed = {"base_url", "api_key", "timeout", "tokenizer"}
    options = {k: v for k, v in config.items() if k in allowed}
    options.setdefault("base_url", getattr(settings, "TINKER_BASE_URL", "") or None)
    options.setdefault("api_key", getattr(settings, "TINKER_API_KEY", "") or None)
    return TinkerBackend(**options)


BACKENDS: dict[str, Callable[..., TrainingBackend]] = {"local": _local, "tinker": _tinker}


def get_backend(name: str, **config: Any) -> TrainingBackend:
    """A new backend instance by name; unknown options for that backend are ignored."""
    try:
        factory = BACKENDS[name]
    except KeyError:
        raise BackendError(f"unknown training backend {name!r}") from None
    return factory(**config)


__all__ = ["BACKENDS", "BackendError", "TrainingBackend", "get_backend"]
