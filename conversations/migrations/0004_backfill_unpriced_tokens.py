"""Runs that finished before `Run.unpriced_tokens` existed: their model calls without a price,
from their usage records.

Outside a transaction and in batches: one UPDATE of every run would hold its row locks (and
block the runs of every live conversation) for as long as the whole backfill takes.
"""

from django.db import migrations

BATCH = 1000


def backfill(apps, schema_editor):
    after = "00000000-0000-0000-0000-000000000000"
    with schema_editor.connection.cursor() as cursor:
        while True:
            # tenant-scope: a migration backfills every tenant's runs from their own records
            cursor.execute(
                """
                SELECT run_id, tenant_id, SUM(total_tokens)
                FROM usage_usagerecord
                WHERE cost IS NULL AND run_id IS NOT NULL AND run_id > %s
                GROUP BY run_id, tenant_id
                ORDER BY run_id
                LIMIT %s
                """,
                [after, BATCH],
            )
            rows = cursor.fetchall()
            if not rows:
                return
            # tenant-scope: each run is matched on its own tenant
            cursor.execute(
                """
                UPDATE conversations_run AS run SET unpriced_tokens = batch.tokens
                FROM unnest(%s::uuid[], %s::uuid[], %s::bigint[]) AS batch(run_id, tenant_id, tokens)
                WHERE run.id = batch.run_id AND run.tenant_id = batch.tenant_id
                """,
                [[r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]],
            )
            after = str(rows[-1][0])


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("conversations", "0003_run_unpriced_tokens"),
        ("usage", "0001_usage_prices_records_budget"),
    ]

    operations = [migrations.RunPython(backfill, migrations.RunPython.noop, elidable=True)]
