"""MetaClaw settings, read from the environment (12-factor).

Two deployment modes share this file:
- embedded (no DATABASE_URL / REDIS_URL): SQLite and a filesystem broker under ``var/``;
- production: ``DATABASE_URL`` (PostgreSQL) and ``REDIS_URL`` (broker, cache, counters).
"""

from __future__ import annotations

import os
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("METACLAW_VAR_DIR", BASE_DIR / "var"))


def env_bool(name: str, default: bool = False) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def env_list(name: str, default: str = "") -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


DEBUG = env_bool("DEBUG", False)
TESTING = env_bool("METACLAW_TESTING", False)

_INSECURE_KEY = "insecure-dev-key-do-not-use-in-production"
SECRET_KEY = os.environ.get("SECRET_KEY", "")
if not SECRET_KEY:
    if DEBUG or TESTING:
        SECRET_KEY = _INSECURE_KEY
    else:
        raise ImproperlyConfigured(
            "SECRET_KEY must be set when DEBUG is off. scripts/run.py generates one and keeps it "
            "in var/run.env, which manage.py reads: run it once, or set SECRET_KEY."
        )
elif SECRET_KEY == _INSECURE_KEY and not (DEBUG or TESTING):
    raise ImproperlyConfigured("The development SECRET_KEY is refused when DEBUG is off.")

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS")
# The address people reach the dashboard at; used in approval links sent to Slack and e-mail.
METACLAW_PUBLIC_URL = os.environ.get("METACLAW_PUBLIC_URL", "http://127.0.0.1:8000").rstrip("/")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "django_htmx",
    "template_partials",
    # Its templates and static files: /api/v1/docs serves Swagger UI from our own static files
    # (without it in INSTALLED_APPS, ninja's page loads them from a CDN, blank offline).
    "ninja",
    "base",
    "incidents",
    "skills",
    "training",
    "metaclaw_site.apps.ProjectPackageConfig",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "base.middleware.StaticFilesMiddleware",  # WhiteNoise, on the async path too
    "base.middleware.ApiBodyLimitMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    "base.middleware.CurrentProjectMiddleware",
    # Last: its process_exception turns a view's "database unreachable" into a 503.
    "base.middleware.DatabaseUnavailableMiddleware",
]

ROOT_URLCONF = "metaclaw_site.urls"
WSGI_APPLICATION = "metaclaw_site.wsgi.application"
ASGI_APPLICATION = "metaclaw_site.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            # {% partialdef %} everywhere without a {% load %} (Django 6 has it built in).
            "builtins": ["template_partials.templatetags.partials"],
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "base.context_processors.current_project",
            ],
        },
    },
]

DATABASE_URL = os.environ.get("DATABASE_URL", "")
if DATABASE_URL:
    # Health checks: a connection kept from an earlier request or task (or lent by the pool)
    # is checked before use, so a PostgreSQL restart costs no request a failure.
    DATABASES = {
        "default": dj_database_url.parse(DATABASE_URL, conn_max_age=60, conn_health_checks=True)
    }
    if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql" and env_bool(
        "METACLAW_DB_POOL", True
    ):
        # A connection pool per process (psycopg_pool), lent for a request or a task and back
        # at its end. Under ASGI each request runs its sync view in a thread of its own, and a
        # persistent connection per thread exhausted PostgreSQL's max_connections ("too many
        # clients"); a pool bounds a process's connections at max_size (a request over it
        # waits up to the timeout) and still spares each request a new connection. Pooling
        # requires CONN_MAX_AGE = 0. A pool opens on first use, so each forked process (Celery's
        # prefork children, gunicorn's preloaded workers) opens its own: nothing may query the
        # database in a parent before it forks.
        DATABASES["default"]["CONN_MAX_AGE"] = 0
        DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
            "min_size": env_int("METACLAW_DB_POOL_MIN_SIZE", 1),
            "max_size": env_int("METACLAW_DB_POOL_MAX_SIZE", 10),
            # Also how long a request waits when PostgreSQL is down before it answers 503 with
            # Retry-After (base.middleware.DatabaseUnavailableMiddleware): kept short.
            "timeout": float(os.environ.get("METACLAW_DB_POOL_TIMEOUT", "1")),
        }
    if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql" and env_bool(
        "METACLAW_PGBOUNCER", False
    ):
        # Behind PgBouncer in transaction mode a session lasts one transaction: no server-side
        # cursors (they outlive it) and no prepared statements (psycopg prepares a query it
        # sees five times, on a connection the next transaction may not get). docs/deploy.md.
        DATABASES["default"]["DISABLE_SERVER_SIDE_CURSORS"] = True
        DATABASES["default"].setdefault("OPTIONS", {})["prepare_threshold"] = None
else:
    VAR_DIR.mkdir(parents=True, exist_ok=True)
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": VAR_DIR / "metaclaw.sqlite3",
            # WAL lets the web process read while the worker writes.
            "OPTIONS": {
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
                "transaction_mode": "IMMEDIATE",
                "timeout": 20,
            },
        }
    }
EMBEDDED = not DATABASE_URL
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = os.environ.get("REDIS_URL", "")
# REDIS_URL names one node of a Redis Cluster: the cache and the counters use a cluster-aware
# client (base.redis_cluster); Celery's broker must be elsewhere (CELERY_BROKER_URL).
REDIS_CLUSTER = bool(REDIS_URL) and env_bool("METACLAW_REDIS_CLUSTER", False)
if REDIS_URL:
    CACHES = {
        "default": {
            "BACKEND": "base.redis_cluster.RedisClusterCache"
            if REDIS_CLUSTER
            else "django.core.cache.backends.redis.RedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": os.environ.get("METACLAW_CACHE_PREFIX", "metaclaw"),
        }
    }
else:
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.filebased.FileBasedCache",
            "LOCATION": str(VAR_DIR / "cache"),
        }
    }

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]
# Django's password check with a lockout after repeated failures (base.auth; METACLAW below).
AUTHENTICATION_BACKENDS = ["base.auth.ThrottledModelBackend"]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "home"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = Path(os.environ.get("STATIC_ROOT", BASE_DIR / "staticfiles"))
# Serve straight from the finders when collectstatic has not run (embedded mode, tests).
WHITENOISE_USE_FINDERS = True
WHITENOISE_AUTOREFRESH = DEBUG

# Request bodies: the API's own limits (413) are enforced by ApiBodyLimitMiddleware; this is the
# hard ceiling Django applies to anything else.
DATA_UPLOAD_MAX_MEMORY_SIZE = 6 * 1024 * 1024
DATA_UPLOAD_MAX_NUMBER_FIELDS = 2000

SESSION_COOKIE_HTTPONLY = True
CSRF_COOKIE_HTTPONLY = False  # htmx reads the token from the page, not the cookie.
if not DEBUG and not TESTING:
    SESSION_COOKIE_SECURE = env_bool("SESSION_COOKIE_SECURE", True)
    CSRF_COOKIE_SECURE = env_bool("CSRF_COOKIE_SECURE", True)
    SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", False)
    SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 0)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", False)
    SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", False)
    SECURE_CONTENT_TYPE_NOSNIFF = True
    SECURE_REFERRER_POLICY = "same-origin"
    X_FRAME_OPTIONS = "DENY"
    if env_bool("BEHIND_TLS_PROXY", False):
        SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")

EMAIL_BACKEND = os.environ.get(
    "EMAIL_BACKEND",
    "django.core.mail.backends.console.EmailBackend"
    if EMBEDDED
    else "django.core.mail.backends.smtp.EmailBackend",
)
DEFAULT_FROM_EMAIL = os.environ.get("DEFAULT_FROM_EMAIL", "metaclaw@localhost")
# No host, no SMTP: with the SMTP backend and EMAIL_HOST unset nothing is e-mailed (and nothing
# is retried against a mail server that is not there); Slack and webhooks still go out.
EMAIL_HOST = os.environ.get("EMAIL_HOST", "")
EMAIL_PORT = env_int("EMAIL_PORT", 25)
EMAIL_HOST_USER = os.environ.get("EMAIL_HOST_USER", "")
EMAIL_HOST_PASSWORD = os.environ.get("EMAIL_HOST_PASSWORD", "")
EMAIL_USE_TLS = env_bool("EMAIL_USE_TLS", False)

# --- Celery -------------------------------------------------------------------------------
# Two queues so a long training job never delays a skill proposal: "fast" for the fast loop and
# notifications, "slow" for the slow loop. Production runs a worker per queue.
if REDIS_URL:
    CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", REDIS_URL)
    if REDIS_CLUSTER and "CELERY_BROKER_URL" not in os.environ:
        # kombu's Redis transport keeps a queue's keys together, which a cluster cannot.
        raise ImproperlyConfigured(
            "METACLAW_REDIS_CLUSTER=1: a Redis Cluster cannot be Celery's broker. Set "
            "CELERY_BROKER_URL to a plain Redis (redis://...) or RabbitMQ (amqp://...)."
        )
    # A message a worker took and never acknowledged (the worker was SIGKILLed) goes back to
    # the queue after this long. It must outlast the longest countdown (600 s, a retry's
    # backoff), or a delayed task is delivered twice; a lost synthesis is rescued sooner by its
    # lease (METACLAW["SYNTHESIS_LEASE_SECONDS"]).
    CELERY_BROKER_TRANSPORT_OPTIONS: dict = {
        "visibility_timeout": env_int("CELERY_VISIBILITY_TIMEOUT", 900)
    }
    if CELERY_BROKER_URL.split("://", 1)[0] in ("redis", "rediss"):
        # kombu's own, except that a worker losing Redis mid-task reconnects instead of
        # exiting (metaclaw_site/redis_broker.py).
        CELERY_BROKER_TRANSPORT = "metaclaw_site.redis_broker:Transport"
else:
    _broker_dir = VAR_DIR / "broker"
    for _sub in ("queue", "processed", "control"):
        (_broker_dir / _sub).mkdir(parents=True, exist_ok=True)
    # A hostname, though the folders below are what count: without one kombu warns on every
    # connection that it assumed "localhost".
    CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", "filesystem://localhost//")
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_broker_dir / "queue"),
        "data_folder_out": str(_broker_dir / "queue"),
        "processed_folder": str(_broker_dir / "processed"),
        # Broadcast (worker control) messages; kombu would otherwise use ./control.
        "control_folder": str(_broker_dir / "control"),
        "store_processed": False,
    }
CELERY_TASK_IGNORE_RESULT = True
CELERY_RESULT_BACKEND = None
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_DEFAULT_QUEUE = "fast"
CELERY_TASK_ROUTES = {
    # The replay gate calls models for minutes: never in front of the fast loop.
    "skills.tasks.replay_gate_*": {"queue": "slow"},
    # The LLM judge of a proposed skill comes after the proposal: on the fast queue it sat in
    # front of other groups' syntheses (benchmarks/fast_loop.py), so it waits with the gate.
    "skills.tasks.judge_revision": {"queue": "slow"},
    "skills.*": {"queue": "fast"},
    "incidents.*": {"queue": "fast"},
    "metaclaw_site.*": {"queue": "fast"},
    "training.tasks.training_run_*": {"queue": "slow"},
    "training.*": {"queue": "fast"},
}
CELERY_TASK_SOFT_TIME_LIMIT = env_int("CELERY_TASK_SOFT_TIME_LIMIT", 120)
CELERY_TASK_TIME_LIMIT = env_int("CELERY_TASK_TIME_LIMIT", 180)
# Publishing must fail fast when the broker is down: ingestion answers anyway and the outbox
# sweep re-enqueues later.
CELERY_TASK_PUBLISH_RETRY = False
CELERY_BROKER_CONNECTION_TIMEOUT = 2
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TASK_ALWAYS_EAGER = env_bool("CELERY_TASK_ALWAYS_EAGER", False)
CELERY_TASK_EAGER_PROPAGATES = True
CELERY_BEAT_SCHEDULE_FILENAME = str(VAR_DIR / "celerybeat-schedule")

# --- MetaClaw -----------------------------------------------------------------------------
METACLAW = {
    # Ingestion limits (a Langfuse-like envelope).
    "INGEST_MAX_BODY_BYTES": env_int("METACLAW_INGEST_MAX_BODY_BYTES", 1024 * 1024),
    "BATCH_MAX_BODY_BYTES": env_int("METACLAW_BATCH_MAX_BODY_BYTES", 5 * 1024 * 1024),
    "BATCH_MAX_ITEMS": env_int("METACLAW_BATCH_MAX_ITEMS", 1000),
    # Single incidents of one key that arrive while another is being stored share the next
    # transaction on the ASGI fast lane, at most this many (base.coalescing; 1: each alone).
    "INGEST_GROUP_COMMIT_MAX_ITEMS": env_int("METACLAW_INGEST_GROUP_COMMIT_MAX_ITEMS", 100),
    # SKILL.md imports: the request body (a whole repository's zip), which also bounds what an
    # archive may unpack to (twice this), and each file kept with a skill (binary files too).
    "SKILL_IMPORT_MAX_BYTES": env_int("METACLAW_SKILL_IMPORT_MAX_BYTES", 50 * 1024 * 1024),
    "SKILL_FILE_MAX_BYTES": env_int("METACLAW_SKILL_FILE_MAX_BYTES", 10 * 1024 * 1024),
    # Requests per minute per API key (counted in Redis; the project may set its own).
    "RATE_LIMIT_PER_MINUTE": env_int("METACLAW_RATE_LIMIT_PER_MINUTE", 60_000),
    # Guessing (base.auth): this many wrong API keys from one client address in a window block
    # it (429 with Retry-After) for a window; this many wrong passwords for one username from
    # one address lock the pair out for LOGIN_LOCKOUT_SECONDS. Behind a reverse proxy, name the
    # header it sets to the client's address (e.g. X-Forwarded-For: its last entry counts).
    "API_KEY_FAILURES_LIMIT": env_int("METACLAW_API_KEY_FAILURES_LIMIT", 50),
    "API_KEY_FAILURES_WINDOW_SECONDS": env_int("METACLAW_API_KEY_FAILURES_WINDOW_SECONDS", 60),
    "LOGIN_FAILURES_LIMIT": env_int("METACLAW_LOGIN_FAILURES_LIMIT", 5),
    "LOGIN_LOCKOUT_SECONDS": env_int("METACLAW_LOGIN_LOCKOUT_SECONDS", 900),
    "CLIENT_IP_HEADER": os.environ.get("METACLAW_CLIENT_IP_HEADER", ""),
    # How long a web process trusts an API key it has checked (revocations elsewhere wait this).
    "API_KEY_CACHE_SECONDS": float(os.environ.get("METACLAW_API_KEY_CACHE_SECONDS", "5")),
    # A group waiting this long without being picked up is re-enqueued by the sweep.
    "OUTBOX_SWEEP_AFTER_SECONDS": env_int("METACLAW_OUTBOX_SWEEP_AFTER_SECONDS", 30),
    # Replay gate (skills.gate): recorded failing conversations replayed per gate (the caps on
    # calls and tokens are per project), and the model asked for when an incident names none.
    "REPLAY_GATE_SAMPLE_SIZE": env_int("METACLAW_REPLAY_GATE_SAMPLE_SIZE", 20),
    "REPLAY_GATE_MODEL": os.environ.get("METACLAW_REPLAY_GATE_MODEL", "gpt-4o-mini"),
    # Effectiveness on live traffic (skills.effectiveness): the days compared on each side of
    # a skill's activation, and the least traffic (turns on each side, incidents in all) below
    # which the verdict is "too thin".
    "EFFECTIVENESS_WINDOW_DAYS": env_int("METACLAW_EFFECTIVENESS_WINDOW_DAYS", 7),
    "EFFECTIVENESS_MIN_TURNS": env_int("METACLAW_EFFECTIVENESS_MIN_TURNS", 1000),
    "EFFECTIVENESS_MIN_INCIDENTS": env_int("METACLAW_EFFECTIVENESS_MIN_INCIDENTS", 10),
    # A synthesising worker renews its claim every quarter of this; a group whose claim was not
    # renewed for this long lost its worker, and the sweep puts it back in the queue.
    "SYNTHESIS_LEASE_SECONDS": env_int("METACLAW_SYNTHESIS_LEASE_SECONDS", 45),
    # Transient errors (LLM rate limits, 5xx, timeouts) are retried with backoff for this long
    # before a group is marked failed with the reason.
    "SYNTHESIS_GIVE_UP_SECONDS": env_int("METACLAW_SYNTHESIS_GIVE_UP_SECONDS", 900),
    # The least relevance (cosine) a skill needs to be injected by the proxy or returned by
    # retrieval. Set from benchmarks/retrieval.py: at 0.12 every skill of its labelled set
    # reaches >= 0.9 of its request family (0.14 is the edge of 0.8; 0.2 left one at 0.5).
    "RETRIEVAL_MIN_SCORE": float(os.environ.get("METACLAW_RETRIEVAL_MIN_SCORE", "0.12")),
    # The proxy also leaves out a skill scoring more than this below the best one: the same
    # recall, twice the precision on that set (benchmarks/retrieval.py prints both).
    "RETRIEVAL_MARGIN": float(os.environ.get("METACLAW_RETRIEVAL_MARGIN", "0.1")),
    # The slow loop's datasets (training.datasets): beyond DATASET_SOURCE_FLOOR samples, no one
    # source (an end user, else a session) gives more than this share of a dataset's samples.
    "DATASET_MAX_SOURCE_SHARE": float(os.environ.get("METACLAW_DATASET_MAX_SOURCE_SHARE", "0.05")),
    "DATASET_SOURCE_FLOOR": env_int("METACLAW_DATASET_SOURCE_FLOOR", 20),
}

LLM = {
    "BASE_URL": os.environ.get("OPENAI_BASE_URL", ""),
    "API_KEY": os.environ.get("OPENAI_API_KEY", ""),
    "MODEL": os.environ.get("METACLAW_LLM_MODEL", ""),
    "TIMEOUT_SECONDS": float(os.environ.get("METACLAW_LLM_TIMEOUT", "30")),
    # One LLM call, the SDK's retries included, ends within this (0: 1.5 timeouts).
    "DEADLINE_SECONDS": float(os.environ.get("METACLAW_LLM_DEADLINE", "0")),
}

UPSTREAM = {
    "BASE_URL": os.environ.get("UPSTREAM_BASE_URL", os.environ.get("OPENAI_BASE_URL", "")),
    "API_KEY": os.environ.get("UPSTREAM_API_KEY", os.environ.get("OPENAI_API_KEY", "")),
}

TINKER_API_KEY = os.environ.get("TINKER_API_KEY", "")
TINKER_BASE_URL = os.environ.get("TINKER_BASE_URL", "")
SLACK_WEBHOOK_URL = os.environ.get("SLACK_WEBHOOK_URL", "")
SLACK_SIGNING_SECRET = os.environ.get("SLACK_SIGNING_SECRET", "")
# Outbound requests to addresses people set (Slack, webhooks, calendar feeds: base.outbound) go
# only to public addresses (a project admin must not be able to make the worker call internal
# services). Turn on for receivers on a private network.
METACLAW_ALLOW_PRIVATE_WEBHOOKS = env_bool("METACLAW_ALLOW_PRIVATE_WEBHOOKS", False)
# The ASGI fast lane (base.fast_lane) serves the agents' hot routes without Django's middleware
# stack; off, Django serves them too (benchmarks/ingest.py and runtime.py --door both compare).
METACLAW_FAST_LANE = env_bool("METACLAW_FAST_LANE", True)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO")},
    "loggers": {"django.db.backends": {"level": "WARNING"}},
}
