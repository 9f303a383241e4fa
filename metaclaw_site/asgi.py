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

# Loaded now rather than inside the first request each worker serves.
from metaclaw_site.boot import load_before_the_first_request  # noqa: E402

load_before_the_first_request()
