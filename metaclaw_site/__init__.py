"""The project package: settings, URL roots, the one NinjaAPI, ASGI and WSGI entry points, the
Celery app (task discovery, beat schedule), Django's admin for projects, and what spans apps
(``projects.project_create``, ``manage.py seed_demo`` and ``create_project``). The only package
that imports every app; no app imports it.
"""

from .celery import app as celery_app

__all__ = ["celery_app"]
