# syntax=docker/dockerfile:1
# One image for every process of the control plane. The default command is the web process;
# docker-compose.yml runs the same image as migrate, worker and beat with other commands.
# All configuration comes from the environment at run time: nothing secret is baked in.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DJANGO_SETTINGS_MODULE=controlplane.settings \
    STATIC_MANIFEST=1

WORKDIR /app

# A fixed numeric id, so orchestrators that insist on runAsNonRoot can verify it.
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin app

# Dependencies first: this layer is rebuilt only when requirements.txt changes.
COPY requirements.txt ./
RUN pip install --no-cache-dir -r requirements.txt

# The code stays owned by root: the app user can read it but not change it.
COPY . .

# collectstatic imports the settings, which refuse to load without a secret key. The key below is
# a throwaway that exists on this RUN line only (never ENV), so the image carries no key.
RUN DJANGO_SECRET_KEY=build-only-collectstatic-not-a-secret \
    python manage.py collectstatic --no-input

USER 10001:10001
EXPOSE 8000

# /healthz answers 503 when PostgreSQL, Redis or the broker is unreachable, and urlopen raises
# on it. The Host header is the first allowed host, so ALLOWED_HOSTS does not reject the probe.
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os,urllib.request as u;h=os.environ.get('DJANGO_ALLOWED_HOSTS','').split(',')[0].strip().lstrip('.');u.urlopen(u.Request('http://127.0.0.1:8000/healthz',headers={'Host':h if h not in ('','*') else 'localhost'}),timeout=8)"]

# Websocket frames uncompressed (small JSON events; see .env.example). uvicorn reads it.
ENV UVICORN_WS_PER_MESSAGE_DEFLATE=false

# Proxy headers (client address, scheme) are trusted only from FORWARDED_ALLOW_IPS (uvicorn reads
# it from the environment; default 127.0.0.1). Set it to the reverse proxy's address in .env.
CMD ["python", "-m", "uvicorn", "controlplane.asgi:application", "--host", "0.0.0.0", \
     "--port", "8000", "--no-access-log", "--proxy-headers"]
