"""The runtime scope's admission: the key (cached, shared with ingestion), its scope and its rate
limit, counted in process (``base.counters.hit_local``, whose own thread flushes the counts to
Redis), so the event loop never waits on Redis."""

from __future__ import annotations

import logging

from base import counters
from base.auth import admit
from base.models import ApiKey
from base.services import api_key_authenticate, api_key_cache_clear

logger = logging.getLogger(__name__)

# --- API keys and request counting ----------------------------------------------------------

# API keys are cached once, in base.services (shared with ingestion).
runtime_key_cache_clear = api_key_cache_clear


def runtime_authenticate(secret: str) -> ApiKey | None:
    """Authenticate a runtime-scoped key (sync; cached), count the request and apply the rate
    limit. Raises ``ScopeDenied`` / ``RateLimited``; None for an unknown key."""
    secret = secret.strip()
    api_key = api_key_authenticate(secret)
    if api_key is None:
        return None
    runtime_admit(api_key)
    return api_key


def runtime_admit(api_key: ApiKey) -> None:
    """The runtime scope and the rate limit, counted in process (the event loop never waits
    on Redis). Raises ``ScopeDenied`` / ``RateLimited``."""
    admit(api_key, ("runtime",), count=counters.hit_local)
