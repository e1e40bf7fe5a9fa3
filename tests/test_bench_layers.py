"""`python -m bench.layers` keeps working: each layer streams replies from the fake LLM in a
process of its own and reports its CPU per reply. Speed goals live in the benchmark itself."""

from __future__ import annotations

import pytest

from bench import layers

pytestmark = [pytest.mark.slow]


def test_every_layer_streams_replies_and_reports_its_cpu_per_reply():
    rows = layers.measure(
        list(layers.LAYERS), concurrency=2, duration=0.3, tokens=3, delay_ms=1, warmup=0.1
    )
    assert [row["layer"] for row in rows] == list(layers.LAYERS)
    for row in rows:
        assert row["replies"] > 0, row
        assert row["cpu_ms_per_reply"] > 0, row


def test_an_unknown_layer_is_named_in_the_error(capsys):
    with pytest.raises(SystemExit):
        layers.main(["--layers", "http,carrier-pigeon"])
    assert "unknown layer(s) carrier-pigeon" in capsys.readouterr().err
