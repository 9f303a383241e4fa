import gc
import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "metaclaw_site.settings")
django_application = get_asgi_application()

# The agent-facing hot paths (the proxy, the runtime API, ingestion) skip Django's middleware
# stack (see base.fast_lane); the composition root hands it the apps' routes.
from django.conf import settings  # noqa: E402

from base.fast_lane import fast_lane  # noqa: E402
from incidents.fast_lane import ROUTES as INGESTION_ROUTES  # noqa: E402
from skills.runtime.proxy import ROUTES as SKILLS_ROUTES  # noqa: E402

application = (
    fast_lane(django_application, {**SKILLS_ROUTES, **INGESTION_ROUTES})
    if settings.METACLAW_FAST_LANE
    else django_application
)

# Import the URL configuration now, at boot, rather than inside the first request.
from django.urls import get_resolver  # noqa: E402

get_resolver().url_patterns  # noqa: B018 - the access is the point: it imports them

# And the embedding model (skill retrieval, the runtime's hot path) at boot, not in a request.
from skills.library.embeddings import get_embedder  # noqa: E402

get_embedder()

# What boot loaded lives as long as the process: take it out of the collector's sight. A large
# batch request allocates enough to set off full collections, and each would otherwise walk
# these ~170k objects again (about 50 ms a time: over a third of the CPU of 500-item batches).
gc.collect()
gc.freeze()
