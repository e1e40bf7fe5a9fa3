"""CSV export of usage records: one model call per row, streamed (a month can hold many rows).
A cost cell is empty when the model had no price; otherwise US dollars with 8 decimal places.
The id columns of a run, thread, agent, end user, key or user deleted since are empty (the
record, and the names it keeps, stay)."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

from django.http import StreamingHttpResponse

from tenants.models import Tenant
from usage import selectors


def _safe(value: Any) -> Any:
    # A cell that starts like a formula is text, not a formula, in a spreadsheet.
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return "" if value is None else value


class _Echo:
    def write(self, value: str) -> str:
        return value


CSV_COLUMNS = [
    ("time", "created_at"),
    ("source", "source"),
    ("agent_id", "agent_id"),
    ("agent", "agent_name"),
    ("agent_version", "version_number"),
    ("called_agent", "called_agent"),
    ("model", "model"),
    ("provider", "provider_name"),
    ("end_user_id", "end_user_id"),
    ("end_user", "end_user__display_name"),
    ("end_user_external_id", "end_user__external_id"),
    ("api_key", "api_key__prefix"),
    ("user", "user__email"),
    ("run_id", "run_id"),
    ("thread_id", "thread_id"),
    ("playground_run_id", "playground_run_id"),
    ("input_tokens", "input_tokens"),
    ("cached_input_tokens", "cached_input_tokens"),
    ("output_tokens", "output_tokens"),
    ("total_tokens", "total_tokens"),
    ("cost_usd", "cost"),  # last: written by `_cost`
]


COST_PLACES = Decimal("1e-8")  # what a record keeps: exact for a call of a fraction of a cent


def _cost(value: Decimal | None) -> str:
    # Plain digits with all 8 places on every row (0.00000000, 0.00000040, 12.50000000):
    # str() of a Decimal writes 0E-8 and 4.0E-7, which spreadsheets read as text or floats.
    return "" if value is None else f"{value.quantize(COST_PLACES):f}"


def rows(*, tenant: Tenant, period: selectors.Period) -> Iterator[str]:
    writer = csv.writer(_Echo())
    yield writer.writerow([name for name, _ in CSV_COLUMNS])
    rows = (
        selectors.records_in(tenant=tenant, period=period)
        .order_by("created_at", "id")
        .values_list(*[f for _, f in CSV_COLUMNS])
    )
    for row in rows.iterator(chunk_size=2000):
        *cells, cost = row
        yield writer.writerow([cells[0].isoformat(), *map(_safe, cells[1:]), _cost(cost)])


def csv_response(*, tenant: Tenant, period: selectors.Period) -> StreamingHttpResponse:
    response = StreamingHttpResponse(
        rows(tenant=tenant, period=period), content_type="text/csv; charset=utf-8"
    )
    name = f"usage-{tenant.slug}-{period.first}-{period.last}.csv"
    response["Content-Disposition"] = f'attachment; filename="{name}"'
    return response
