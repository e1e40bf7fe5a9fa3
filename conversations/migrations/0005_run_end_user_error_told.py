from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("conversations", "0004_run_end_user_error"),
    ]

    operations = [
        # A default in the database too: a process still running the code before 0004 inserts
        # runs without the column.
        migrations.AlterField(
            model_name="run",
            name="end_user_error",
            field=models.TextField(blank=True, default="", db_default=""),
        ),
        # Runs stopped before 0004: what their chat was told, so that the history's "Stopped"
        # note never shows the reason, which can name the admin or the API key that stopped it.
        migrations.RunSQL(
            sql="""
                UPDATE conversations_run
                SET end_user_error = CASE
                    WHEN error LIKE 'Stopped by % from the run inspector.'
                        THEN 'Stopped by an administrator.'
                    ELSE 'Stopped.'
                END
                WHERE status = 'cancelled' AND end_user_error = '' AND error LIKE 'Stopped%'
            """,
            reverse_sql=migrations.RunSQL.noop,
        ),
    ]
