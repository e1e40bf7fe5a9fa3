"""The deployment artefacts: docker-compose.yml, Dockerfile, .env.example, production settings.

No database is needed: compose is validated offline by Debian's `docker-compose` (1.29), and the
settings are checked by running `manage.py` in a subprocess with a production environment.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cryptography.fernet import Fernet

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
ENV_EXAMPLE = ROOT / ".env.example"
SETTINGS = ROOT / "controlplane" / "settings.py"

APP_SERVICES = ("migrate", "web", "worker", "beat")
BACKING_SERVICES = ("postgres", "redis")
# Variables read outside settings.py that .env.example must document too.
EXTRA_VARIABLES = {"HOST", "PORT", "CONTROLPLANE_VAR_DIR"}

SECRET_NAME = re.compile(r"SECRET|PASSWORD|PASSWD|TOKEN|(^|_)KEY$")
# `NAME=value` or a commented-out `# NAME=value` (an optional setting shown with its default).
ENV_LINE = re.compile(r"^(#\s*)?([A-Z][A-Z0-9_]*)=(.*)$")
# env("NAME" ...), env.str("NAME" ...), env.bool(...), env.db(...), and plain os.environ reads.
SETTINGS_READS = (
    re.compile(r"""\benv(?:\.\w+)?\(\s*["']([A-Z][A-Z0-9_]*)["']"""),
    re.compile(r"""\bos\.(?:environ\.get\(|getenv\(|environ\[)\s*["']([A-Z][A-Z0-9_]*)["']"""),
)
# A compose reference that fails when the variable is unset or empty: ${NAME:?message}.
REQUIRED_REF = re.compile(r"^\$\{[A-Z][A-Z0-9_]*:\?[^}]*\}$")
URL_PASSWORD = re.compile(r"://[^/@\s:]*:([^@\s]*)@")


def _env_example_entries() -> list[tuple[str, str, bool]]:
    """(name, value, active) for every `NAME=` line of .env.example, commented out or not."""
    entries = []
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = ENV_LINE.match(line.strip())
        if match:
            entries.append((match.group(2), match.group(3), match.group(1) is None))
    return entries


def _compose_file() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _docker_compose() -> str:
    path = shutil.which("docker-compose")
    if path is None:
        pytest.fail(
            "`docker-compose` is not on PATH: install Debian's docker-compose package "
            "(`apt-get install docker-compose`, as CI does) to validate docker-compose.yml."
        )
    return path


def _dotenv(*, blank: str | None = None) -> str:
    """A .env made from .env.example with a dummy value in every required (blank) entry."""
    lines = []
    for name, value, active in _env_example_entries():
        if not active:
            continue
        if not value and name != blank:
            value = f"dummy{secrets.token_hex(8)}"
        lines.append(f"{name}={value}")
    return "\n".join(lines) + "\n"


def _run_compose(tmp_path: Path, dotenv: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run docker-compose on a copy of the compose file, so nothing is written into the repo."""
    compose = tmp_path / "docker-compose.yml"
    shutil.copyfile(COMPOSE, compose)
    (tmp_path / ".env").write_text(dotenv)
    # Compose interpolates from the shell before .env: keep the caller's values out of the test.
    referenced = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", COMPOSE.read_text()))
    env = {k: v for k, v in os.environ.items() if k not in referenced}
    command = [
        _docker_compose(),
        "-f",
        str(compose),
        "--project-directory",
        str(tmp_path),
    ]
    command += ["--env-file", str(tmp_path / ".env"), *args]
    return subprocess.run(
        command,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _manage(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _production_env(**overrides: str) -> dict[str, str]:
    """os.environ as a production host would have it: no dev mode, no debug, no secret key."""
    dev_switches = ("CONTROLPLANE_EMBEDDED", "DJANGO_DEBUG", "DJANGO_INSECURE_COOKIES")
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in (*dev_switches, "DJANGO_SECRET_KEY", "DJANGO_ALLOWED_HOSTS")
    }
    if (ROOT / ".env").is_file():
        # settings.py fills unset variables from a developer's .env; an empty value means the
        # same as unset to settings.py, and shadows the file.
        env.update(dict.fromkeys((*dev_switches, "DJANGO_SECRET_KEY"), ""))
    env["DJANGO_SETTINGS_MODULE"] = "controlplane.settings"
    env.update(overrides)
    return env


def test_compose_file_validates(tmp_path):
    result = _run_compose(tmp_path, _dotenv(), "config", "-q")

    assert result.returncode == 0, f"docker-compose config -q failed:\n{result.stderr}"


def test_compose_builds_database_and_redis_urls_from_env(tmp_path):
    dotenv = _dotenv()
    values = dict(line.split("=", 1) for line in dotenv.splitlines())

    result = _run_compose(tmp_path, dotenv, "config")

    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    for name in APP_SERVICES:
        environment = services[name]["environment"]
        assert f":{values['POSTGRES_PASSWORD']}@postgres:5432/" in environment["DATABASE_URL"]
        assert environment["REDIS_URL"].startswith(f"redis://:{values['REDIS_PASSWORD']}@redis:")


@pytest.mark.parametrize("variable", ["POSTGRES_PASSWORD", "REDIS_PASSWORD"])
def test_compose_refuses_to_run_without_a_password(tmp_path, variable):
    result = _run_compose(tmp_path, _dotenv(blank=variable), "config", "-q")

    assert result.returncode != 0
    assert variable in result.stderr


def test_compose_publishes_only_web_and_has_no_literal_secrets():
    services = _compose_file()["services"]

    assert set(services) >= {*APP_SERVICES, *BACKING_SERVICES}
    published = sorted(name for name, service in services.items() if service.get("ports"))
    assert published == ["web"], "only web may publish a port"
    for name in BACKING_SERVICES:
        assert "network_mode" not in services[name]
    for name in APP_SERVICES:
        env_file = services[name].get("env_file")
        assert ".env" in ([env_file] if isinstance(env_file, str) else env_file or []), name

    for name, service in services.items():
        environment = service.get("environment") or {}
        if isinstance(environment, list):
            environment = dict(item.split("=", 1) for item in environment)
        for key, value in environment.items():
            value = str(value)
            if SECRET_NAME.search(key):
                assert REQUIRED_REF.match(value), f"{name}.{key} must be ${{{key}:?...}}"
            for password in URL_PASSWORD.findall(value):
                assert REQUIRED_REF.match(password), f"{name}.{key} has a literal password"
    # No secret may fall back to a default value: ${POSTGRES_PASSWORD:-x} would be one.
    defaulted = re.findall(r"\$\{([A-Z][A-Z0-9_]*):?-", COMPOSE.read_text())
    assert not [name for name in defaulted if SECRET_NAME.search(name)]


def test_image_runs_as_non_root_and_carries_no_secret():
    dockerfile = DOCKERFILE.read_text()
    instructions = [line.strip() for line in dockerfile.replace("\\\n", " ").splitlines()]

    users = [line.split()[1] for line in instructions if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert not [
        line for line in instructions if line.startswith(("ENV", "ARG")) and "SECRET" in line
    ]
    assert "STATIC_MANIFEST=1" in dockerfile
    ignored = DOCKERIGNORE.read_text().split()
    assert ".env" in ignored and ".venv/" in ignored and "var/" in ignored


def test_env_example_lists_every_setting():
    source = SETTINGS.read_text()
    read = {name for pattern in SETTINGS_READS for name in pattern.findall(source)}
    entries = _env_example_entries()
    listed = [name for name, _, _ in entries]

    assert "DJANGO_SECRET_KEY" in read and "DATABASE_URL" in read  # the scan itself works
    assert sorted(read - set(listed)) == [], "settings.py reads these; list them in .env.example"
    assert sorted(EXTRA_VARIABLES - set(listed)) == []
    assert sorted({n for n in listed if listed.count(n) > 1}) == []
    secrets_with_values = [name for name, value, _ in entries if SECRET_NAME.search(name) and value]
    assert secrets_with_values == [], ".env.example must not carry secret values"


def test_env_example_comments_every_variable():
    lines = ENV_EXAMPLE.read_text().splitlines()

    uncommented = []
    for index, line in enumerate(lines):
        if ENV_LINE.match(line.strip()):
            previous = lines[index - 1].strip() if index else ""
            if not previous.startswith("#") or ENV_LINE.match(previous):
                uncommented.append(line)
    assert uncommented == []


def test_deploy_check_is_clean_in_production():
    env = _production_env(
        DJANGO_SECRET_KEY=secrets.token_urlsafe(50),
        DJANGO_ALLOWED_HOSTS="example.com",
        SECRETS_ENCRYPTION_KEYS=Fernet.generate_key().decode(),
    )

    result = _manage("check", "--deploy", "--fail-level", "WARNING", env=env)

    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"


def test_checks_fail_without_an_encryption_key_for_tenant_secrets():
    env = _production_env(DJANGO_SECRET_KEY=secrets.token_urlsafe(50), SECRETS_ENCRYPTION_KEYS="")

    result = _manage("check", env=env)

    assert result.returncode != 0
    assert "controlplane.E001" in result.stderr and "SECRETS_ENCRYPTION_KEYS" in result.stderr


def test_settings_refuse_to_load_without_a_secret_key():
    result = _manage("check", env=_production_env())

    assert result.returncode != 0
    assert "DJANGO_SECRET_KEY" in result.stderr


def test_settings_refuse_an_unknown_run_event_loop():
    result = _manage(
        "check", env=_production_env(DJANGO_SECRET_KEY="x" * 50, RUN_EVENT_LOOP="trio")
    )

    assert result.returncode != 0
    assert "RUN_EVENT_LOOP must be uvloop or asyncio, not 'trio'" in result.stderr


def test_image_sends_uncompressed_websocket_frames_by_default():
    instructions = DOCKERFILE.read_text().replace("\\\n", " ").splitlines()
    assert "ENV UVICORN_WS_PER_MESSAGE_DEFLATE=false" in [line.strip() for line in instructions]


@pytest.mark.parametrize(("given", "threshold"), [(None, "5"), ("0", "None"), ("3", "3")])
def test_statements_are_prepared_unless_turned_off(given, threshold):
    overrides = {"DJANGO_SECRET_KEY": "x" * 50}
    env = _production_env(**overrides)
    env.pop("DATABASE_PREPARE_THRESHOLD", None)
    if given is not None:
        env["DATABASE_PREPARE_THRESHOLD"] = given
    code = (
        "import django; django.setup(); from django.conf import settings; "
        "print(settings.DATABASES['default']['OPTIONS']['prepare_threshold'])"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [threshold]
