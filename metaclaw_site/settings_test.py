"""Settings for the test suite: a real PostgreSQL and a real Redis on loopback.

Override ``DATABASE_URL`` / ``REDIS_URL`` to point elsewhere (e.g. one database per parallel
test run)."""

import os

os.environ.setdefault("METACLAW_TESTING", "1")
os.environ.setdefault("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/metaclaw")
os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/15")
os.environ.setdefault("METACLAW_CACHE_PREFIX", "metaclaw-test")

from .settings import *  # noqa: E402,F403

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
# Tasks run inline when a test commits (django_capture_on_commit_callbacks); the tests marked
# "worker" start a real Celery worker process against Redis instead.
CELERY_TASK_ALWAYS_EAGER = os.environ.get("CELERY_TASK_ALWAYS_EAGER", "1") == "1"
# base.outbound may reach loopback: the fake Slack, webhook and calendar servers are there (the
# guard's own tests turn this off).
METACLAW_ALLOW_PRIVATE_WEBHOOKS = True
EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}
