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
    # Every measured run's time to first token is split into its parts.
    parts = stack["first_token_ms"]
    assert set(parts) == {"web", "queued", "to_model", "to_llm", "from_llm", "to_client"}
    assert {part["n"] for part in parts.values()} == {stack["ttft_correlated"]}
    assert stack["cpu_ms_per_run"]["web"] > 0 and stack["cpu_ms_per_run"]["worker"] > 0
    assert stack["peak_rss_mb"]["web"] > 0 and stack["peak_rss_mb"]["worker"] > 0
    assert {t[0] for t in report.TARGETS} <= {row["target"] for row in result["targets"]}

    json_path, md_path = report.write(result, tmp_path, "smoke")
    assert json.loads(json_path.read_text())["cells"][1]["ok"] == stack["ok"]
    table = md_path.read_text()
    assert "| stack | 2 | 0 |" in table and "| floor | 2 | 0 |" in table
    assert "worker pool `prefork` with 2 processes" in table
    assert "Where the time to first token goes" in table


def test_the_parts_of_a_time_to_first_token_add_up_to_it():
    """Each run's parts, from the client's, the run's and the fake LLM's clocks, add up to what
    the client waited less the fake LLM's own time to first token; runs that failed or that the
    fake did not time are left out."""
    from bench.load import RunRecord
    from bench.runner import first_token_parts
    from bench.world import RunTimes

    sent = 1_000.0
    ok = RunRecord(0, "bench-a-0-1", started=5.0, sent_at=sent, ttft_s=0.050, ok=True, run_id="r1")
    failed = RunRecord(0, "bench-a-0-2", started=6.0, sent_at=sent, ttft_s=0.040, run_id="r2")
    untimed = RunRecord(0, "bench-a-0-3", 7.0, sent_at=sent, ttft_s=0.03, ok=True, run_id="r3")
    times = {
        # stored 2 ms after the send, claimed 10 ms later; the model call 4 ms after the claim,
        # its first token read 30 ms after the claim.
        rid: RunTimes(sent + 0.002, sent + 0.012, sent + 0.500, 4.0, 30.0)
        for rid in ("r1", "r2", "r3")
    }
    # The request reached the fake 3 ms after the model call; the fake took 5 ms to its token.
    timings = {"bench-a-0-1": [5.0, 400.0, sent + 0.019], "bench-a-0-2": [5.0, 400.0, sent]}

    parts = first_token_parts([ok, failed, untimed], times, timings)

    assert {name: len(values) for name, values in parts.items()} == dict.fromkeys(parts, 1)
    got = {name: round(values[0], 3) for name, values in parts.items()}
    assert got == {
        "web": 2.0, "queued": 10.0, "to_model": 4.0, "to_llm": 3.0, "from_llm": 18.0,
        "to_client": 8.0,
    }  # fmt: skip
    assert round(sum(got.values()), 3) == 50.0 - 5.0  # the client's TTFT less the fake's own


def test_percentiles_are_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert report.percentile(values, 50) == 50
    assert report.percentile(values, 99) == 99
    assert report.percentile([7.0], 99) == 7
    assert report.percentile([], 50) is None
