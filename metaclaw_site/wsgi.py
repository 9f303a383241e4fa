import gc
import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "metaclaw_site.settings")
application = get_wsgi_application()

# Import the URL configuration (and with it every app's API, views and their imports) now,
# at boot, rather than inside the first request each worker serves.
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
