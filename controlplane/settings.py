"""Settings, all from the environment (see `.env.example` for every variable).

Two modes:

* **Embedded dev mode** (`CONTROLPLANE_EMBEDDED=1`, set by `controlplane.devstack` when it
  started an embedded PostgreSQL or Redis): a secret key is generated once under `./var/` and
  loopback hosts are allowed, so `make run` works with nothing configured.
* **Everything else** (production, compose, CI): `DJANGO_SECRET_KEY` is required and the app refuses
  to start without it; cookies are `Secure` unless `DJANGO_INSECURE_COOKIES=1` says otherwise.
"""

from __future__ import annotations

import secrets
from datetime import timedelta
from pathlib import Path

import environ
from csp.constants import NONCE
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()
if (BASE_DIR / ".env").is_file():
    environ.Env.read_env(BASE_DIR / ".env")

VAR_DIR = Path(env.str("CONTROLPLANE_VAR_DIR", default=str(BASE_DIR / "var")))
EMBEDDED = env.bool("CONTROLPLANE_EMBEDDED", default=False)
DEBUG = env.bool("DJANGO_DEBUG", default=False)


def _secret_key() -> str:
    key = env.str("DJANGO_SECRET_KEY", default="")
    if key:
        return key
    if not EMBEDDED:
        raise ImproperlyConfigured(
            "DJANGO_SECRET_KEY is not set. Set it in the environment or .env "
            "(generate one with: python -c 'import secrets; print(secrets.token_urlsafe(50))'). "
            "Only the embedded dev mode of `make run` generates one for you."
        )
    # Embedded dev mode: one key per ./var, kept so sessions survive a restart.
    path = VAR_DIR / "secret_key"
    if not path.exists():
        VAR_DIR.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(50))
        path.chmod(0o600)
    return path.read_text().strip()


SECRET_KEY = _secret_key()


def _encryption_keys() -> list[str]:
    keys = env.list("SECRETS_ENCRYPTION_KEYS", default=[])
    if keys or not EMBEDDED:
        return keys
    path = VAR_DIR / "secrets_key"  # embedded dev mode: generated once, kept with the data
    if not path.exists():
        from cryptography.fernet import Fernet

        VAR_DIR.mkdir(parents=True, exist_ok=True)
        path.write_text(Fernet.generate_key().decode())
        path.chmod(0o600)
    return [path.read_text().strip()]


# Fernet keys for tenant secrets at rest, newest first (see controlplane/crypto.py).
SECRETS_ENCRYPTION_KEYS = _encryption_keys()

ALLOWED_HOSTS = env.list(
    "DJANGO_ALLOWED_HOSTS",
    default=["localhost", "127.0.0.1", "[::1]"] if (EMBEDDED or DEBUG) else [],
)
CSRF_TRUSTED_ORIGINS = env.list("DJANGO_CSRF_TRUSTED_ORIGINS", default=[])

INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.postgres",
    "channels",
    "django_htmx",
    "template_partials",
    "django_celery_beat",
    "csp",
    "axes",
    "ninja",
    "controlplane",
    "tenants",
    "ai_agents",
    "conversations",
    "usage",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    "csp.middleware.CSPMiddleware",
    "axes.middleware.AxesMiddleware",
    "controlplane.middleware.DependencyUnavailableMiddleware",
]

ROOT_URLCONF = "controlplane.urls"
ASGI_APPLICATION = "controlplane.asgi.application"
WSGI_APPLICATION = "controlplane.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "csp.context_processors.nonce",
                "tenants.context_processors.navigation",
            ],
        },
    }
]

# --- Database: PostgreSQL only (pgvector and row locks are part of the design). -------------------
DATABASES = {
    "default": env.db("DATABASE_URL", default="postgres://postgres@127.0.0.1:5432/controlplane")
}
# ASGI: connections come from the pool, never kept per thread. Without the pool (Celery workers,
# DATABASE_POOL=0) a worker's threads may keep theirs: the run host checks them before each use.
DATABASES["default"]["CONN_MAX_AGE"] = env.int("DATABASE_CONN_MAX_AGE", default=0)
DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
# Django's backend, whose health check asks the server only when the connection is not idle and
# quiet (controlplane/postgres/base.py).
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    DATABASES["default"]["ENGINE"] = "controlplane.postgres"
DATABASES["default"].setdefault("OPTIONS", {})
# `postgres://user@/db?host=/socket/dir` spells a unix socket (the embedded server uses one).
if not DATABASES["default"].get("HOST") and "host" in DATABASES["default"]["OPTIONS"]:
    DATABASES["default"]["HOST"] = DATABASES["default"]["OPTIONS"].pop("host")
if env.bool("DATABASE_POOL", default=True):
    DATABASES["default"]["OPTIONS"]["pool"] = {
        "min_size": env.int("DATABASE_POOL_MIN_SIZE", default=1),
        "max_size": env.int("DATABASE_POOL_MAX_SIZE", default=10),
        "timeout": env.float("DATABASE_POOL_TIMEOUT", default=10.0),
    }
# With CONN_HEALTH_CHECKS Django hands the pool psycopg_pool's check_connection, so a pooled
# connection is checked before use and a PostgreSQL restart costs no request a 500.
# Parameters travel apart from the statement (psycopg's server-side binding): they are not quoted
# into its text in Python. 0 behind PgBouncer in transaction mode without its
# `max_prepared_statements`.
DATABASES["default"]["OPTIONS"]["server_side_binding"] = env.bool(
    "DATABASE_SERVER_SIDE_BINDING", default=True
)
# A statement a connection has run this many times is prepared: PostgreSQL parses it once and,
# after five more runs, keeps one plan for it instead of planning every execution (most of a run's
# statements cost more to plan than to run; docs/benchmark.md). Django turns psycopg's preparing
# off unless asked. Needs server-side binding; 0 = never, as behind PgBouncer in transaction mode
# without its `max_prepared_statements`.
DATABASES["default"]["OPTIONS"]["prepare_threshold"] = (
    env.int("DATABASE_PREPARE_THRESHOLD", default=5) or None
)
DATABASES["default"]["TEST"] = {"NAME": env.str("DATABASE_TEST_NAME", default="test_controlplane")}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Redis: cache, channel layer, broker (ephemeral state only). ---------------------------------
REDIS_URL = env.str("REDIS_URL", default="redis://127.0.0.1:6379/0")
CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": env.str("CACHE_KEY_PREFIX", default="cp"),
        "OPTIONS": {"socket_connect_timeout": 2, "socket_timeout": 5},
    }
}
CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {
            # redis-py 8 times out socket reads after 5 s by default, exactly channels-redis's
            # 5 s blocking receive: the race kills idle websockets. Reads may block longer.
            # redis-py's default pool cap (100 connections) answered HTTP 500 to websocket
            # handshakes when 200 chats connected at once (their group_adds exhausted it;
            # docs/benchmark.md): a reconnect storm after a web restart looks the same.
            "hosts": [
                {
                    "address": REDIS_URL,
                    "socket_timeout": 30,
                    "max_connections": env.int("CHANNEL_LAYER_MAX_CONNECTIONS", default=2000),
                }
            ],
            "prefix": env.str("CHANNEL_LAYER_PREFIX", default="cp:asgi"),
        },
    }
}

# --- Celery. -----------------------------------------------------------------------------------
CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default=REDIS_URL)
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": env.int("CELERY_VISIBILITY_TIMEOUT", 7200)}
CELERY_TASK_ALWAYS_EAGER = env.bool("CELERY_TASK_ALWAYS_EAGER", default=False)
# Celery closes a task's database connections after every task unless this is set high; tasks
# close broken and aged connections themselves, as requests do (controlplane/celery.py).
CELERY_DB_REUSE_MAX = env.int("CELERY_DB_REUSE_MAX", default=1000)
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
CELERY_TIMEZONE = "UTC"

# --- Auth. --------------------------------------------------------------------------------------
AUTH_USER_MODEL = "tenants.User"
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
PASSWORD_HASHERS = [
    "django.contrib.auth.hashers.Argon2PasswordHasher",
    "django.contrib.auth.hashers.PBKDF2PasswordHasher",
    "django.contrib.auth.hashers.ScryptPasswordHasher",
]
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "home"
LOGOUT_REDIRECT_URL = "login"
SIGNUP_ENABLED = env.bool("SIGNUP_ENABLED", default=True)
INVITATION_MAX_AGE = timedelta(days=env.int("INVITATION_MAX_AGE_DAYS", default=7))
PASSWORD_RESET_TIMEOUT = 60 * 60 * 3

# Login throttling (django-axes), counted in the cache so no table grows with every failed attempt.
AXES_HANDLER = "axes.handlers.cache.AxesCacheHandler"
AXES_FAILURE_LIMIT = env.int("LOGIN_FAILURE_LIMIT", default=5)
AXES_COOLOFF_TIME = timedelta(minutes=env.int("LOGIN_COOLOFF_MINUTES", default=15))
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_USERNAME_FORM_FIELD = "username"
AXES_LOCKOUT_TEMPLATE = "registration/locked_out.html"
AXES_RESET_ON_SUCCESS = True
AXES_VERBOSE = False
AXES_IPWARE_PROXY_COUNT = env.int("PROXY_COUNT", default=0)

# --- Security. ----------------------------------------------------------------------------------
SECURE_COOKIES = not (EMBEDDED or DEBUG or env.bool("DJANGO_INSECURE_COOKIES", default=False))
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Lax"
SESSION_COOKIE_SECURE = SECURE_COOKIES
SESSION_COOKIE_AGE = 60 * 60 * 24 * 14
SESSION_ENGINE = "django.contrib.sessions.backends.db"
CSRF_COOKIE_HTTPONLY = False  # htmx reads the token from the page, not the cookie
CSRF_COOKIE_SAMESITE = "Lax"
CSRF_COOKIE_SECURE = SECURE_COOKIES
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
SECURE_CROSS_ORIGIN_OPENER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"
SECURE_SSL_REDIRECT = env.bool("DJANGO_SECURE_SSL_REDIRECT", default=SECURE_COOKIES)
SECURE_REDIRECT_EXEMPT = [r"^healthz$"]
SECURE_HSTS_SECONDS = env.int("DJANGO_HSTS_SECONDS", default=31536000 if SECURE_COOKIES else 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = SECURE_HSTS_SECONDS > 0
SECURE_HSTS_PRELOAD = SECURE_HSTS_SECONDS > 0
if env.bool("DJANGO_BEHIND_TLS_PROXY", default=False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
DATA_UPLOAD_MAX_MEMORY_SIZE = env.int("MAX_REQUEST_BODY_BYTES", default=1024 * 1024)

CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": ["'self'"],
        "script-src": ["'self'", NONCE],  # the sentinel: a real nonce when a page uses one
        "style-src": ["'self'"],
        "img-src": ["'self'", "data:"],
        "connect-src": ["'self'"],
        "font-src": ["'self'"],
        "object-src": ["'none'"],
        "base-uri": ["'none'"],
        "frame-ancestors": ["'none'"],
        "form-action": ["'self'"],
    }
}

# --- E-mail: console in dev, SMTP (or anything django-environ's EMAIL_URL knows) in production. --
_email = env.email_url("EMAIL_URL", default="consolemail://")
vars().update(_email)
DEFAULT_FROM_EMAIL = env.str("DEFAULT_FROM_EMAIL", default="Control Plane <noreply@localhost>")
SERVER_EMAIL = DEFAULT_FROM_EMAIL
# The absolute base of links in e-mails (invitations, password resets) when no request is at hand.
SITE_URL = env.str("SITE_URL", default="http://127.0.0.1:8000")

# --- Static files: served by the app itself (whitenoise), so `make run` needs no web server. ----
# The image runs collectstatic and sets STATIC_MANIFEST=1 (hashed, compressed, cached forever);
# from a checkout whitenoise serves the source folders directly.
STATIC_MANIFEST = env.bool("STATIC_MANIFEST", default=False)
STATIC_URL = "/static/"
STATIC_ROOT = BASE_DIR / "staticfiles" if STATIC_MANIFEST else None
STATICFILES_DIRS = [BASE_DIR / "static"]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"
        if STATIC_MANIFEST
        else "django.contrib.staticfiles.storage.StaticFilesStorage"
    },
}
WHITENOISE_USE_FINDERS = not STATIC_MANIFEST
# From a checkout the files are the source, which may change while the server runs: read each
# one when it is asked for. Without this, whitenoise keeps the size it saw at start-up, and an
# edited file goes out cut or padded to that length (the browser refuses it).
WHITENOISE_AUTOREFRESH = not STATIC_MANIFEST

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

# --- Logging: one line per record on stderr; secrets are never passed to a logger. -------------
LOG_LEVEL = env.str("LOG_LEVEL", default="INFO")
QUIET_TASKS = ["conversations.run_execute"]
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(levelname)s %(name)s: %(message)s"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["stderr"], "level": LOG_LEVEL},
    # A worker logs no "received" and "succeeded" lines for the run kick: it hands the run over
    # and returns at once (controlplane/logfilters.py); other tasks keep theirs.
    "filters": {
        "quiet_tasks": {"()": "controlplane.logfilters.QuietTasks", "names": QUIET_TASKS},
    },
    "loggers": {
        # httpx logs full URLs at INFO, query-string tokens included.
        **{n: {"level": "WARNING"} for n in ("axes", "httpx", "httpx2", "httpcore")},
        **{n: {"filters": ["quiet_tasks"]} for n in ("celery.app.trace", "celery.worker.strategy")},
    },
}

# --- Outbound requests to URLs a tenant, user or model chose (controlplane/egress.py). ------------
# Only public addresses, unless a network is allowed here (e.g. an internal model gateway).
# The embedded dev mode allows loopback, so a local model server or MCP server can be tried.
EGRESS_ALLOWED_NETWORKS = env.list(
    "EGRESS_ALLOWED_NETWORKS", default=["127.0.0.0/8", "::1/128"] if EMBEDDED else []
)
EGRESS_ALLOWED_PORTS = env.list("EGRESS_ALLOWED_PORTS", cast=int, default=[])

# --- Agents. ------------------------------------------------------------------------------------
# Seconds between tokens of the built-in offline model, so streaming is visible in the UI.
OFFLINE_MODEL_WORD_DELAY = env.float("OFFLINE_MODEL_WORD_DELAY", default=0.02)

# --- Runs (conversations/executor.py). -----------------------------------------------------------
RUN_LEASE_SECONDS = env.float("RUN_LEASE_SECONDS", default=30.0)
RUN_MAX_ATTEMPTS = env.int("RUN_MAX_ATTEMPTS", default=3)
RUN_TIMEOUT_SECONDS = env.float("RUN_TIMEOUT_SECONDS", default=600.0)
# A worker shutting down (Celery's warm shutdown) lets its runs finish for this long, then hands
# the others to other workers at once (conversations/worker.py). Keep it below the deployment's
# stop timeout (docker-compose.yml: stop_grace_period).
RUN_SHUTDOWN_GRACE_SECONDS = env.float("RUN_SHUTDOWN_GRACE_SECONDS", default=30.0)
# The event loop a worker's runs share (conversations/worker.py): uvloop (the default; about a
# tenth less worker CPU per streamed run, docs/benchmark.md) or asyncio's own.
RUN_EVENT_LOOP = env.str("RUN_EVENT_LOOP", default="uvloop")
if RUN_EVENT_LOOP not in ("uvloop", "asyncio"):
    raise ImproperlyConfigured(f"RUN_EVENT_LOOP must be uvloop or asyncio, not {RUN_EVENT_LOOP!r}.")
# Threads of a worker process's run host for its runs' database work, side by side; each keeps a
# connection (conversations/worker.py).
RUN_DB_THREADS = env.int("RUN_DB_THREADS", default=4)
if RUN_DB_THREADS < 1:
    raise ImproperlyConfigured(f"RUN_DB_THREADS must be at least 1, not {RUN_DB_THREADS}.")
# Failed model calls (and malformed tool arguments) a run retries (ai_agents/runtime/retry.py).
RUN_MODEL_RETRIES = env.int("RUN_MODEL_RETRIES", default=3)
RUN_MODEL_RETRY_BACKOFF_SECONDS = env.float("RUN_MODEL_RETRY_BACKOFF_SECONDS", default=1.0)
RUN_MODEL_RETRY_MAX_WAIT_SECONDS = env.float("RUN_MODEL_RETRY_MAX_WAIT_SECONDS", default=30.0)
RUN_STREAM_TTL_SECONDS = env.int("RUN_STREAM_TTL_SECONDS", default=3600)
# A web process reads every stream it follows with one XREAD at a time, at most one per this many
# ms under load, so that each carries many events (conversations/streams.py, `_Multiplexer`).
RUN_STREAM_BATCH_MS = env.float("RUN_STREAM_BATCH_MS", default=4.0)
# The worker's stream writer sends at most once per this many ms under load (conversations
# .streams._Writer): each send then carries the events of many runs. 0: one send per event.
RUN_STREAM_WRITE_BATCH_MS = env.float("RUN_STREAM_WRITE_BATCH_MS", default=4.0)
# Text deltas of a reply that come less than this many ms after the last one sent are merged into
# one event (conversations.streams.Coalescer): fewer stream entries, frames and redraws; the
# first token goes at once. 0: one event per delta from the model.
RUN_STREAM_DELTA_MS = env.float("RUN_STREAM_DELTA_MS", default=50.0)
THREAD_HISTORY_WINDOW = env.int("THREAD_HISTORY_WINDOW", default=100)
# Net allocations between two collections of the youngest objects (controlplane.gctuning); 0
# keeps Python's default (700).
GC_GEN0_THRESHOLD = env.int("GC_GEN0_THRESHOLD", default=20000)
CELERY_BEAT_SCHEDULE = {
    "runs-sweep": {"task": "conversations.runs_sweep", "schedule": RUN_LEASE_SECONDS},
}

# --- Rate limits (tenants/limits.py, docs/rate-limits.md). ----------------------------------------
# Defaults for tenants that did not set their own; 0 turns a limit off.
RATE_LIMIT_END_USER_RUNS_PER_MINUTE = env.int("RATE_LIMIT_END_USER_RUNS_PER_MINUTE", default=20)
RATE_LIMIT_END_USER_RUNS_PER_HOUR = env.int("RATE_LIMIT_END_USER_RUNS_PER_HOUR", default=300)
RATE_LIMIT_API_KEY_REQUESTS_PER_MINUTE = env.int(
    "RATE_LIMIT_API_KEY_REQUESTS_PER_MINUTE", default=600
)
RATE_LIMIT_API_KEY_RUNS_PER_MINUTE = env.int("RATE_LIMIT_API_KEY_RUNS_PER_MINUTE", default=60)

# --- The API. -----------------------------------------------------------------------------------
NINJA_PAGINATION_PER_PAGE = 50
API_KEY_LAST_USED_RESOLUTION = timedelta(seconds=60)
