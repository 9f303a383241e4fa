import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "metaclaw_site.settings")
application = get_wsgi_application()

# Loaded now rather than inside the first request each worker serves.
from metaclaw_site.boot import load_before_the_first_request  # noqa: E402

load_before_the_first_request()
