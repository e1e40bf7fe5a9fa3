from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("conversations", "0005_run_end_user_error_told"),
    ]

    operations = [
        # A default in the database too: a process still running the code before this one
        # inserts runs without the column.
        migrations.AddField(
            model_name="run",
            name="withdrawn",
            field=models.BooleanField(default=False, db_default=False),
        ),
    ]
