"""Model instances to and from plain SQL that touches several tables in one statement (e.g. an
`UPDATE … FROM … RETURNING` that changes one row and returns it with the rows it refers to, or
an insert composed with other writes in CTEs).

The ORM cannot express such a statement, and on a hot path compiling its equivalent costs more
than PostgreSQL spends executing it. `Columns` names a model's concrete columns under a table
alias, in the order `Model.from_db` expects, and turns its slice of a row back into an instance,
converted exactly as the ORM converts values it reads (e.g. JSON, encrypted fields). `Insert`
names the columns an insert of new instances writes, and prepares an instance's values as the
ORM's save does (defaults, `auto_now`, JSON, encrypted fields).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

from django.db import connections
from django.db.models import Model
from django.db.models.fields import AutoFieldMixin

M = TypeVar("M", bound=Model)


class Columns(Generic[M]):
    def __init__(self, model: type[M], alias: str) -> None:
        self.model, self.alias = model, alias
        self.fields = list(model._meta.concrete_fields)
        quote = connections["default"].ops.quote_name
        self.sql = ", ".join(f"{alias}.{quote(str(f.column))}" for f in self.fields)
        self.names = [f.attname for f in self.fields]
        self._converters: dict[str, list[tuple[int, list[Callable[..., Any]], Any]]] = {}

    def __len__(self) -> int:
        return len(self.fields)

    def _for(self, db: str) -> list[tuple[int, list[Callable[..., Any]], Any]]:
        found = self._converters.get(db)
        if found is None:
            connection = connections[db]
            found = []
            for index, field in enumerate(self.fields):
                column = field.get_col(self.alias)
                converters = [
                    *connection.ops.get_db_converters(column),
                    *column.get_db_converters(connection),
                ]
                if converters:
                    found.append((index, converters, column))
            self._converters[db] = found
        return found

    def build(self, values: Sequence[Any], db: str = "default") -> M:
        """The instance whose columns are `values` (this model's slice of the row)."""
        row = list(values)
        connection = connections[db]
        for index, converters, column in self._for(db):
            for convert in converters:
                row[index] = convert(row[index], column, connection)
        return self.model.from_db(db, self.names, row)


def split(row: Sequence[Any], *parts: Columns[Any], db: str = "default") -> list[Any]:
    """`row` cut into one instance per part, in order."""
    out, start = [], 0
    for part in parts:
        out.append(part.build(row[start : start + len(part)], db))
        start += len(part)
    if start != len(row):
        raise ValueError(f"the row has {len(row)} columns; the parts name {start}")
    return out


class Insert(Generic[M]):
    """The columns an INSERT of new `model` instances writes: every concrete column but a key
    the database assigns (an auto field, left to its sequence)."""

    def __init__(self, model: type[M]) -> None:
        self.table = model._meta.db_table
        self.fields = [f for f in model._meta.concrete_fields if not isinstance(f, AutoFieldMixin)]
        quote = connections["default"].ops.quote_name
        self.columns = ", ".join(quote(str(f.column)) for f in self.fields)

    def placeholders(self, *, cast: bool = False, db: str = "default") -> str:
        """`%s` for each column, in parentheses for a VALUES list; with `cast`, each typed as
        its column (an `INSERT … SELECT` has no target types to infer them from)."""
        if not cast:
            return "(" + ", ".join(["%s"] * len(self.fields)) + ")"
        connection = connections[db]
        return ", ".join(f"%s::{f.cast_db_type(connection)}" for f in self.fields)

    def values(self, obj: M, db: str = "default") -> list[Any]:
        """`obj`'s values for the columns, prepared as the ORM's save prepares them."""
        connection = connections[db]
        return [f.get_db_prep_save(f.pre_save(obj, add=True), connection) for f in self.fields]
