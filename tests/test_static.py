"""Static files from a checkout: served from the source folders as they are now."""

from __future__ import annotations

from django.contrib.staticfiles import finders
from django.test import Client


def test_a_static_file_edited_while_the_server_runs_is_served_whole(settings, tmp_path):
    settings.STATICFILES_DIRS = [tmp_path]
    finders.get_finder.cache_clear()
    try:
        script = tmp_path / "probe.js"
        script.write_text("var a = 1;\n")
        client = Client()  # one web process: its whitenoise starts once
        assert b"".join(client.get("/static/probe.js").streaming_content) == b"var a = 1;\n"
        script.write_text("var a = 1; // edited, and longer now\n")
        response = client.get("/static/probe.js")
        body = b"".join(response.streaming_content)
        assert body == b"var a = 1; // edited, and longer now\n"
        assert int(response["Content-Length"]) == len(body)
    finally:
        finders.get_finder.cache_clear()
