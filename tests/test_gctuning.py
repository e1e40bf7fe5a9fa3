"""The garbage collector's settings for long-lived processes (controlplane.gctuning)."""

from __future__ import annotations

import gc
import importlib

import pytest
from celery import signals

from controlplane import gctuning


@pytest.fixture
def collector():
    """Python's collector as it was, back after the test."""
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def test_objects_alive_at_start_up_are_left_alone_and_young_ones_collected_less_often(
    collector, settings
):
    settings.GC_GEN0_THRESHOLD = 12345
    gc.unfreeze()
    gctuning.tune()
    assert gc.get_threshold()[0] == 12345
    assert gc.get_freeze_count() > 10_000  # Django, the SDK, the project: never walked again
    # A cycle made afterwards is still found and freed.
    cycle: list[object] = []
    cycle.append(cycle)
    del cycle
    assert gc.collect() >= 1


def test_zero_keeps_pythons_threshold(collector, settings):
    settings.GC_GEN0_THRESHOLD = 0
    before = gc.get_threshold()
    gctuning.tune()
    assert gc.get_threshold() == before


def test_workers_their_pool_processes_and_the_web_process_tune_it(collector, settings):
    settings.GC_GEN0_THRESHOLD = 23456
    for signal in (signals.worker_ready, signals.worker_process_init):
        gc.unfreeze()
        gc.set_threshold(700, 10, 10)
        signal.send(sender=None)
        assert gc.get_threshold()[0] == 23456 and gc.get_freeze_count() > 0
    gc.unfreeze()
    gc.set_threshold(700, 10, 10)
    importlib.reload(importlib.import_module("controlplane.asgi"))
    assert gc.get_threshold()[0] == 23456 and gc.get_freeze_count() > 0
