"""The database backend's health check (controlplane/postgres/base.py): a kept connection that
is idle and quiet is used without a round trip; one the server has ended is found unusable and
replaced before the next query. Workers keep connections (DATABASE_POOL=0, CONN_MAX_AGE), as
the wrapper of these tests does; pooled connections are checked by the pool."""

from __future__ import annotations

import copy
import time

import psycopg
import pytest
from django.db import connection, connections

from controlplane.postgres.base import DatabaseWrapper


def _last_query(pid: int) -> str:
    """What the backend `pid` last ran, as the server reports it."""
    with psycopg.connect(**connection.get_connection_params(), autocommit=True) as other:
        row = other.execute("SELECT query FROM pg_stat_activity WHERE pid = %s", [pid]).fetchone()
    assert row is not None
    return row[0]


@pytest.fixture
def kept():
    """A connection kept from unit to unit as a worker keeps it; its backend's pid."""
    settings_dict = copy.deepcopy(connection.settings_dict)
    settings_dict["OPTIONS"].pop("pool", None)
    settings_dict["CONN_MAX_AGE"] = 60
    wrapper = DatabaseWrapper(settings_dict)  # not registered: the test's own
    with wrapper.cursor() as cursor:
        cursor.execute("SELECT 42")
    yield wrapper
    wrapper.close()


def _new_unit(wrapper: DatabaseWrapper) -> None:
    """What happens to a kept connection when a unit of work starts and runs its first query."""
    wrapper.close_if_unusable_or_obsolete()
    wrapper.close_if_health_check_failed()


@pytest.mark.django_db(transaction=True)
def test_the_settings_select_this_backend():
    assert isinstance(connections["default"], DatabaseWrapper)


@pytest.mark.django_db(transaction=True)
def test_a_quiet_idle_connection_is_kept_without_asking_the_server(kept):
    raw = kept.connection
    pid = raw.info.backend_pid

    _new_unit(kept)

    assert kept.connection is raw
    assert kept.health_check_done
    assert _last_query(pid) == "SELECT 42"  # no SELECT 1 reached the server


@pytest.mark.django_db(transaction=True)
def test_a_connection_the_server_ended_is_replaced_before_the_next_query(kept):
    raw = kept.connection
    with psycopg.connect(**connection.get_connection_params(), autocommit=True) as other:
        other.execute("SELECT pg_terminate_backend(%s)", [raw.info.backend_pid])
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # the server's FATAL message is on its way
        time.sleep(0.01)
        _new_unit(kept)
        if kept.connection is None:
            break

    assert kept.connection is None  # closed, not handed to the next query
    with kept.cursor() as cursor:
        cursor.execute("SELECT 1")
        assert cursor.fetchone() == (1,)
    assert kept.connection is not raw


@pytest.mark.django_db(transaction=True)
def test_a_connection_inside_a_transaction_is_asked(kept):
    raw = kept.connection
    raw.execute("BEGIN")  # not idle: a quiet socket proves nothing
    try:
        assert kept.is_usable()
        assert _last_query(raw.info.backend_pid) == "SELECT 1"
    finally:
        raw.execute("ROLLBACK")


def _prepared_on_server(wrapper: DatabaseWrapper) -> list[str]:
    with wrapper.cursor() as cursor:
        cursor.execute("SELECT statement FROM pg_prepared_statements")
        return [row[0] for row in cursor.fetchall()]


def _run_often(wrapper: DatabaseWrapper, times: int) -> str:
    sql = "SELECT count(*) FROM conversations_run WHERE status = %s"
    with wrapper.cursor() as cursor:
        for _ in range(times):
            cursor.execute(sql, ["success"])
    return sql.replace("%s", "$1")


@pytest.mark.django_db(transaction=True)
def test_a_statement_a_connection_runs_often_is_prepared_on_the_server(kept):
    statement = _run_often(kept, 4)
    assert statement not in _prepared_on_server(kept)  # a few runs: parsed each time

    _run_often(kept, 2)

    assert statement in _prepared_on_server(kept)  # parsed once, planned once from now on


@pytest.mark.django_db(transaction=True)
def test_preparing_can_be_turned_off(kept):
    settings_dict = copy.deepcopy(kept.settings_dict)
    settings_dict["OPTIONS"]["prepare_threshold"] = None  # DATABASE_PREPARE_THRESHOLD=0
    wrapper = DatabaseWrapper(settings_dict)
    try:
        _run_often(wrapper, 20)
        assert _prepared_on_server(wrapper) == []
    finally:
        wrapper.close()


@pytest.mark.django_db(transaction=True)
def test_a_prepared_statement_survives_a_migration_that_adds_a_column(kept):
    with kept.cursor() as cursor:
        cursor.execute("CREATE TABLE prepared_probe (id integer PRIMARY KEY, name text)")
    try:
        sql = "SELECT id, name FROM prepared_probe WHERE id = %s"
        with kept.cursor() as cursor:
            for _ in range(6):
                cursor.execute(sql, [1])
        assert "SELECT id, name FROM prepared_probe WHERE id = $1" in _prepared_on_server(kept)
        with psycopg.connect(**connection.get_connection_params(), autocommit=True) as other:
            other.execute("ALTER TABLE prepared_probe ADD COLUMN note text")
            other.execute("INSERT INTO prepared_probe (id, name) VALUES (1, 'a')")

        with kept.cursor() as cursor:
            cursor.execute(sql, [1])
            assert cursor.fetchall() == [(1, "a")]
    finally:
        with kept.cursor() as cursor:
            cursor.execute("DROP TABLE prepared_probe")
