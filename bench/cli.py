"""`make bench` / `python -m bench`: start the stack, run the matrix, write the report.

    python -m bench                                 # c = 1, 50, 200 x delay = 0, 20 ms
    python -m bench -c 50 -d 20 --duration 30       # one cell
    python -m bench -c 50 -d 20 --profile 50:20     # and py-spy profiles of web and worker

Without `--database-url` / `--redis-url` (BENCH_DATABASE_URL / BENCH_REDIS_URL; else the
server of DATABASE_URL with the database `cp_bench`, and REDIS_URL), embedded PostgreSQL and
Redis are started as for `make run`, in the database `cp_bench`. The report goes to
`var/bench/<UTC timestamp>.json` and `.md`.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from bench import report, stack
from bench.runner import Config

DEFAULT_CONCURRENCY = [1, 50, 200]
DEFAULT_DELAYS_MS = [0.0, 20.0]


def _ints(text: str) -> list[int]:
    values = [int(x) for x in text.split(",") if x.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("give positive integers, e.g. 1,50,200")
    return values


def _floats(text: str) -> list[float]:
    values = [float(x) for x in text.split(",") if x.strip()]
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError("give non-negative numbers, e.g. 0,20")
    return values


def _cells(text: str) -> list[tuple[int, float]]:
    cells = []
    for part in text.split(","):
        c, _, d = part.partition(":")
        try:
            cells.append((int(c), float(d or 20)))
        except ValueError:
            raise argparse.ArgumentTypeError("give cells as C:DELAY, e.g. 50:20") from None
    return cells


def _database_url() -> str | None:
    """BENCH_DATABASE_URL as given; else DATABASE_URL's server, but the bench's own database
    (the bench must not fill the database you develop with)."""
    if os.environ.get("BENCH_DATABASE_URL"):
        return os.environ["BENCH_DATABASE_URL"]
    url = os.environ.get("DATABASE_URL")
    if not url:
        return None
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{stack.BENCH_DATABASE}"))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Simultaneous websocket chats against web + one worker + a fake LLM.",
    )
    p.add_argument(
        "-c",
        "--concurrency",
        type=_ints,
        default=DEFAULT_CONCURRENCY,
        help="simultaneous chats, comma-separated (default 1,50,200)",
    )
    p.add_argument(
        "-d",
        "--delays",
        type=_floats,
        default=DEFAULT_DELAYS_MS,
        help="the fake LLM's delay between tokens in ms, comma-separated (default 0,20)",
    )
    p.add_argument(
        "--ttft-ms",
        type=float,
        default=0.0,
        help="the fake LLM's own time to first token (default 0)",
    )
    p.add_argument("--warmup", type=float, default=3.0, help="seconds before measuring (3)")
    p.add_argument("--duration", type=float, default=15.0, help="measured seconds per cell (15)")
    p.add_argument(
        "--runs",
        type=int,
        default=None,
        help="end a cell's window early once this many runs completed in it",
    )
    p.add_argument(
        "--run-timeout",
        type=float,
        default=30.0,
        help="seconds after which a run counts as failed (30)",
    )
    p.add_argument("--turns", type=int, default=5, help="messages per thread (5)")
    p.add_argument("--no-floor", action="store_true", help="skip the fake-LLM-only cells")
    p.add_argument(
        "--worker-pool",
        default="prefork",
        choices=["prefork", "solo", "threads"],
        help="the Celery pool of the one worker process (prefork, as deployed)",
    )
    p.add_argument(
        "--worker-processes",
        type=int,
        default=1,
        help="the worker's pool processes (1: the issue's one-process figures; make run uses 2)",
    )
    p.add_argument(
        "--worker-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an environment variable for the worker only (repeatable), to try a setting",
    )
    p.add_argument(
        "--profile",
        type=_cells,
        default=None,
        metavar="C:DELAY,...",
        help="profile web and worker with py-spy during these stack cells",
    )
    p.add_argument(
        "--profile-wall",
        action="store_true",
        help="sample every busy thread (where processes wait), not only the GIL holder (CPU)",
    )
    p.add_argument(
        "--database-url",
        default=_database_url(),
        help="default: BENCH_DATABASE_URL, else DATABASE_URL's server with the database cp_bench, "
        "else an embedded server",
    )
    p.add_argument(
        "--redis-url", default=os.environ.get("BENCH_REDIS_URL") or os.environ.get("REDIS_URL")
    )
    p.add_argument("--out", type=Path, default=Path("var/bench"), help="report directory")
    return p  # fmt: skip


def config_from(args: argparse.Namespace, out: Path) -> Config:
    return Config(
        concurrency=args.concurrency,
        delays_ms=args.delays,
        warmup_s=args.warmup,
        duration_s=args.duration,
        runs=args.runs,
        run_timeout_s=args.run_timeout,
        turns=max(1, args.turns),
        ttft_ms=args.ttft_ms,
        floor=not args.no_floor,
        worker_pool=args.worker_pool,
        worker_processes=max(1, args.worker_processes),
        worker_env=dict(item.split("=", 1) for item in args.worker_env if "=" in item),
        profile=args.profile,
        profile_gil=not args.profile_wall,
        out=out,
    )


def run(config: Config, env: dict[str, str], *, migrate: bool = True) -> dict[str, Any]:
    """Start the stack on `env`'s servers, build the bench tenant, run every cell; the result."""
    import django
    from django.apps import apps

    from bench import procs, stack
    from bench.runner import Bench

    started = datetime.now(UTC)
    load_start = procs.load_average()
    with stack.running(
        env,
        logs=config.out / "logs",
        migrate=migrate,
        worker_pool=config.worker_pool,
        worker_processes=config.worker_processes,
        worker_env=config.worker_env,
        ttft_ms=config.ttft_ms,
    ) as running:
        if not apps.ready:  # the harness uses the stack's settings for its own setup
            os.environ.update(running.env)
            django.setup()
        from bench import world  # models: only once Django is set up

        the_world = world.build(
            chatters=max(config.concurrency), llm_base_url=f"{running.llm_url}/v1"
        )
        bench = Bench(config, running, the_world)
        try:
            print(f"bench: stack up (web {running.web_url}, fake LLM {running.llm_url})")
            bench.probe()
            print("\n".join(report.HEADER), flush=True)
            cells = bench.matrix()
        finally:
            bench.close()
            world.release()
    return {
        "started_at": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "config": config.as_dict(),
        "machine": {
            "cpus": os.cpu_count(),
            "load_start": load_start,
            "load_end": procs.load_average(),
            "python": sys.version.split()[0],
        },
        "cells": cells,
        "targets": report.check_targets(cells),
    }


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = args.out.resolve()
    config = config_from(args, out / stamp)
    with stack.services(
        stack.environ(), database_url=args.database_url, redis_url=args.redis_url
    ) as env:
        result = run(config, env)
    json_path, md_path = report.write(result, out, stamp)
    print()
    print(report.markdown(result))
    print(f"bench: wrote {json_path} and {md_path}")
    return 0
