"""`make bench` keeps working: the harness starts a real stack (uvicorn web, one Celery worker,
the timed fake LLM) on the test database, runs one tiny cell of each kind and reports it.

Speed goals live in the benchmark itself; this only checks that runs complete correctly and
that the report has its shape.
"""

from __future__ import annotations

import json
import os
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import pytest
from django.db import connection

from bench import cli, report
from bench.runner import Config

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

BENCH_REDIS_DB = "15"  # the stack's own broker queue: another worker on db 0 must not take its runs


def _database_url() -> str:
    params = connection.settings_dict
    user = quote(params.get("USER") or "postgres")
    password = f":{quote(params['PASSWORD'])}" if params.get("PASSWORD") else ""
    host = params.get("HOST") or ""
    name = params["NAME"]
    if host.startswith("/"):  # the embedded server's unix socket
        return f"postgres://{user}{password}@/{name}?host={quote(host)}"
    return f"postgres://{user}{password}@{host or '127.0.0.1'}:{params.get('PORT') or 5432}/{name}"


def _own_db(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme in ("redis", "rediss"):
        return urlunsplit(parts._replace(path=f"/{BENCH_REDIS_DB}"))
    query = dict(parse_qsl(parts.query))
    query["virtual_host" if parts.scheme == "redis+socket" else "db"] = BENCH_REDIS_DB
    # Not urlunsplit: for a scheme it does not know (redis+socket) it drops the "//" of an
    # empty host, and kombu then takes the URL for an AMQP one.
    return f"{parts.scheme}://{parts.netloc}{parts.path}?{urlencode(query)}"


def test_bench_runs_a_tiny_cell_and_reports_it(settings, tmp_path):
    env = dict(os.environ)
    env["DATABASE_URL"] = _database_url()
    env["REDIS_URL"] = _own_db(settings.REDIS_URL)
    env["CELERY_BROKER_URL"] = _own_db(settings.CELERY_BROKER_URL)
    env["DJANGO_SECRET_KEY"] = settings.SECRET_KEY  # the sessions the harness makes must verify
    env["SECRETS_ENCRYPTION_KEYS"] = ",".join(settings.SECRETS_ENCRYPTION_KEYS)
    config = Config(
        concurrency=[2],
        delays_ms=[0],
        warmup_s=0.3,
        duration_s=15,
        runs=4,
        turns=2,
        worker_processes=2,  # as `make run` deploys it; the default is the one-process figures
        out=tmp_path,
    )

    result = cli.run(config, env, migrate=False)

    floor, stack = result["cells"]
    assert (floor["kind"], stack["kind"]) == ("floor", "stack")
    for cell in (floor, stack):
        assert cell["concurrency"] == 2 and cell["token_delay_ms"] == 0
        assert cell["failed"] == 0, cell["failures"]
        assert cell["ok"] >= 4 and cell["runs_per_s"] > 0
        # Every measured run was matched with the fake LLM's own timing of it.
        assert cell["ttft_correlated"] == cell["client_ttft_ms"]["n"] > 0
        assert cell["added_ttft_ms"]["p50"] is not None
    assert stack["cpu_ms_per_run"]["web"] > 0 and stack["cpu_ms_per_run"]["worker"] > 0
    assert stack["peak_rss_mb"]["web"] > 0 and stack["peak_rss_mb"]["worker"] > 0
    assert {t[0] for t in report.TARGETS} <= {row["target"] for row in result["targets"]}

    json_path, md_path = report.write(result, tmp_path, "smoke")
    assert json.loads(json_path.read_text())["cells"][1]["ok"] == stack["ok"]
    table = md_path.read_text()
    assert "| stack | 2 | 0 |" in table and "| floor | 2 | 0 |" in table
    assert "worker pool `prefork` with 2 processes" in table


def test_percentiles_are_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert report.percentile(values, 50) == 50
    assert report.percentile(values, 99) == 99
    assert report.percentile([7.0], 99) == 7
    assert report.percentile([], 50) is None
