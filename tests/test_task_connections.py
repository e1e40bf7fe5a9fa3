"""Celery tasks treat database connections as requests do (controlplane/celery.py): a healthy
connection lives on to the next task, an aged or broken one is closed first, and an eager task
(run inline by its caller) leaves the caller's connection alone."""

from __future__ import annotations

import time

import pytest
from django.db import connection

from controlplane.celery import _database_connections
from conversations.tasks import run_execute


@pytest.fixture
def task():
    return run_execute


@pytest.mark.django_db(transaction=True)
def test_a_task_keeps_a_healthy_connection_and_closes_an_aged_one(task):
    connection.ensure_connection()
    raw = connection.connection
    connection.close_at = time.monotonic() + 60  # as DATABASE_CONN_MAX_AGE=60 sets it
    _database_connections(sender=task)
    assert connection.connection is raw  # the next task reuses it: no new backend

    connection.close_at = time.monotonic() - 1  # older than CONN_MAX_AGE
    _database_connections(sender=task)
    assert connection.connection is None


@pytest.mark.django_db(transaction=True)
def test_a_broken_connection_is_closed_before_the_next_task(task):
    connection.ensure_connection()
    connection.close_at = time.monotonic() + 60
    connection.errors_occurred = True  # e.g. PostgreSQL restarted under it
    connection.connection.close()  # the socket is gone
    _database_connections(sender=task)
    assert connection.connection is None
    with connection.cursor() as cursor:  # and the next query opens a new one
        cursor.execute("SELECT 1")
        assert cursor.fetchone() == (1,)


@pytest.mark.django_db(transaction=True)
def test_an_eager_task_leaves_its_callers_connection_alone(task):
    connection.ensure_connection()
    raw = connection.connection
    connection.close_at = time.monotonic() - 1
    task.push_request(is_eager=True)
    try:
        _database_connections(sender=task)
    finally:
        task.pop_request()
    assert connection.connection is raw
