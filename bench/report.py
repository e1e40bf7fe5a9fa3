"""Figures of a cell, the targets they are held to, the JSON file and the markdown table."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

# Issue 4, "Figures the benchmark must reach" (on a 2-core machine).
TARGETS = [
    ("c=50, 20 ms: runs/s", 50, 20.0, "runs_per_s", ">=", 100.0),
    ("c=50, 20 ms: failed runs", 50, 20.0, "failed", "<=", 0),
    ("c=50, 20 ms: added TTFT p50 (ms)", 50, 20.0, "added_ttft_p50_ms", "<=", 15.0),
    ("c=50, 20 ms: added TTFT p99 (ms)", 50, 20.0, "added_ttft_p99_ms", "<=", 50.0),
    ("c=200, 20 ms: failed runs", 200, 20.0, "failed", "<=", 0),
    ("server CPU per run, web+worker+PG (ms), every cell", None, None, "server_cpu_ms", "<=", 8.0),
]


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (no interpolation: p99 of 100 values is the 99th)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def _r(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def latency(values_ms: list[float]) -> dict[str, float | None]:
    return {
        "p50": _r(percentile(values_ms, 50)),
        "p95": _r(percentile(values_ms, 95)),
        "p99": _r(percentile(values_ms, 99)),
        "max": _r(max(values_ms) if values_ms else None),
        "n": len(values_ms),
    }


def failures(reasons: list[str]) -> list[dict[str, Any]]:
    return [{"reason": r, "count": n} for r, n in Counter(reasons).most_common(10)]


def check_targets(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for label, c, delay, key, op, bound in TARGETS:
        if c is None:
            chosen = [x for x in cells if x["kind"] == "stack" and x["cpu_ms_per_run"]["server"]]
            values = [x["cpu_ms_per_run"]["server"] for x in chosen]
            value = max(values) if values else None
        else:
            match = [
                x
                for x in cells
                if x["kind"] == "stack" and x["concurrency"] == c and x["token_delay_ms"] == delay
            ]
            if not match:
                value = None
            else:
                cell = match[0]
                value = {
                    "runs_per_s": cell["runs_per_s"],
                    "failed": cell["failed"],
                    "added_ttft_p50_ms": cell["added_ttft_ms"]["p50"],
                    "added_ttft_p99_ms": cell["added_ttft_ms"]["p99"],
                }[key]
        met = None
        if value is not None:
            met = value >= bound if op == ">=" else value <= bound
        rows.append({"target": label, "bound": f"{op} {bound:g}", "value": value, "met": met})
    floor = [
        x
        for x in cells
        if x["kind"] == "floor" and x["concurrency"] == 50 and x["token_delay_ms"] == 20.0
    ]
    rows.append(
        {
            "target": "c=50, 20 ms: the floor's runs/s (issue 4 measured about 113)",
            "bound": "reference",
            "value": floor[0]["runs_per_s"] if floor else None,
            "met": None,
        }
    )
    return rows


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


HEADER = [
    "| cell | c | delay ms | ok | failed | runs/s | added TTFT p50 / p95 / p99 ms "
    "| client TTFT p50 / p99 ms | CPU ms/run web / worker / PG = server | redis | client "
    "| peak RSS MB web / worker / PG | load |",
    "|---|--:|--:|--:|--:|--:|--|--|--|--:|--:|--|--|",
]


def markdown_row(cell: dict[str, Any]) -> str:
    cpu, rss = cell["cpu_ms_per_run"], cell["peak_rss_mb"]
    added, client = cell["added_ttft_ms"], cell["client_ttft_ms"]
    stack = cell["kind"] == "stack"
    server = (
        f"{_fmt(cpu.get('web'), 2)} / {_fmt(cpu.get('worker'), 2)} / "
        f"{_fmt(cpu.get('postgres'), 2)} = **{_fmt(cpu.get('server'), 2)}**"
        if stack
        else f"fake LLM {_fmt(cpu.get('llm'), 2)}"
    )
    memory = (
        f"{_fmt(rss.get('web'), 0)} / {_fmt(rss.get('worker'), 0)} / {_fmt(rss.get('postgres'), 0)}"
        if stack
        else f"fake LLM {_fmt(rss.get('llm'), 0)}"
    )
    return (
        f"| {cell['kind']}{' (profiled)' if cell.get('profiled') else ''} "
        f"| {cell['concurrency']} | {cell['token_delay_ms']:g} | {cell['ok']} "
        f"| {cell['failed']} | {_fmt(cell['runs_per_s'])} "
        f"| {_fmt(added['p50'])} / {_fmt(added['p95'])} / {_fmt(added['p99'])} "
        f"| {_fmt(client['p50'])} / {_fmt(client['p99'])} | {server} "
        f"| {_fmt(cpu.get('redis'), 2) if stack else '–'} | {_fmt(cpu.get('client'), 2)} "
        f"| {memory} "
        f"| {' '.join(str(x) for x in cell['load_average'])} |"
    )


def markdown(result: dict[str, Any]) -> str:
    cfg, machine = result["config"], result["machine"]
    lines = [
        f"# Benchmark {result['started_at']}",
        "",
        f"{machine['cpus']} CPUs, load average at start {machine['load_start']},"
        f" at end {machine['load_end']}. {TOKENS_NOTE}",
        f"Cells: warm-up {cfg['warmup_s']:g} s, measured {cfg['duration_s']:g} s"
        + (f" or {cfg['runs']} runs" if cfg.get("runs") else "")
        + f", run timeout {cfg['run_timeout_s']:g} s, {cfg['turns']} messages per thread;"
        f" worker pool `{cfg['worker_pool']}` with {_processes(cfg)}.",
        "",
        *HEADER,
    ]
    lines += [markdown_row(cell) for cell in result["cells"]]
    phased = [c for c in result["cells"] if c.get("phases_ms")]
    if phased:
        lines += [
            "",
            "Where a stack run's time goes, from the run's own timestamps (ms): queued = created "
            "→ claimed by the worker; running = claimed → finished.",
            "",
            "| c | delay ms | queued p50 / p95 / p99 | running p50 / p95 / p99 |",
            "|--:|--:|--|--|",
        ]
        for cell in phased:
            q, r = cell["phases_ms"]["queued"], cell["phases_ms"]["running"]
            lines.append(
                f"| {cell['concurrency']} | {cell['token_delay_ms']:g} "
                f"| {_fmt(q['p50'])} / {_fmt(q['p95'])} / {_fmt(q['p99'])} "
                f"| {_fmt(r['p50'])} / {_fmt(r['p95'])} / {_fmt(r['p99'])} |"
            )
    parted = [c for c in result["cells"] if (c.get("first_token_ms") or {}).get("web", {}).get("n")]
    if parted:
        lines += [
            "",
            "Where the time to first token goes (p50 / p99 ms, each part's own percentiles, so "
            "they need not add up): web = message sent → run stored; queued = stored → claimed; "
            "to model = claimed → model call sent; to LLM = model call sent → request at the "
            "fake LLM; from LLM = the fake LLM's first token written → read by the run; to "
            "client = first token read by the run → at the client.",
            "",
            "| c | delay ms | client TTFT | web | queued | to model | to LLM | from LLM "
            "| to client |",
            "|--:|--:|--|--|--|--|--|--|--|",
        ]
        for cell in parted:
            ft = cell["first_token_ms"]
            cols = [cell["client_ttft_ms"]] + [
                ft[k] for k in ("web", "queued", "to_model", "to_llm", "from_llm", "to_client")
            ]
            lines.append(
                f"| {cell['concurrency']} | {cell['token_delay_ms']:g} | "
                + " | ".join(f"{_fmt(x['p50'])} / {_fmt(x['p99'])}" for x in cols)
                + " |"
            )
    lines += [
        "",
        "Targets (issue 4):",
        "",
        "| target | bound | measured | met |",
        "|---|---|--:|---|",
    ]
    for row in result["targets"]:
        met = {True: "yes", False: "**no**", None: "not measured"}[row["met"]]
        if row["bound"] == "reference":
            met = "–"
        lines.append(f"| {row['target']} | {row['bound']} | {_fmt(row['value'])} | {met} |")
    failed = [c for c in result["cells"] if c["failures"]]
    if failed:
        lines += ["", "Failures:", ""]
        for cell in failed:
            for f in cell["failures"]:
                lines.append(
                    f"- {cell['kind']} c={cell['concurrency']} {cell['token_delay_ms']:g} ms: "
                    f"{f['count']} × {f['reason']}"
                )
    profiles = [
        (f"{name}, {cell['kind']} c={cell['concurrency']} {cell['token_delay_ms']:g} ms", prof)
        for cell in result["cells"]
        for name, prof in cell.get("profiles", {}).items()
    ]
    for name, prof in profiles:
        lines += [
            "",
            f"Profile `{name}` ({prof['samples']} busy samples; self time, then inclusive):",
            "",
            "| self % | function | | incl. % | function |",
            "|--:|---|---|--:|---|",
        ]
        for a, b in zip(prof["self"][:15], prof["inclusive"][:15], strict=False):
            lines.append(
                f"| {a['percent']} | `{a['function']}` | | {b['percent']} | `{b['function']}` |"
            )
        busiest = ", ".join(f"{t['function']} {t['percent']}%" for t in prof.get("threads", [])[:6])
        lines += ["", f"Busiest threads (share of the window each was sampled busy): {busiest}."]
        by_package = ", ".join(
            f"{p['function']} {p['percent']}%" for p in prof.get("packages", [])[:12]
        )
        lines += ["", f"Self time by package: {by_package}."]
    return "\n".join(lines) + "\n"


TOKENS_NOTE = (
    "Every run streams 20 tokens. Added TTFT = the client's time to first token minus the fake "
    "LLM's own, run by run. CPU per run = CPU of the cell's measured window / runs completed in it."
)


def write(result: dict[str, Any], directory: Path, stem: str) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    json_path = directory / f"{stem}.json"
    md_path = directory / f"{stem}.md"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    md_path.write_text(markdown(result))
    return json_path, md_path


def _processes(cfg: dict[str, Any]) -> str:
    count = int(cfg.get("worker_processes") or 1)
    return "one process" if count == 1 else f"{count} processes"
