"""Errors raised for bad user input: they name the file, record and field."""

from __future__ import annotations


class InputError(ValueError):
    """Bad user input (data, config, checkpoint). The message names file, record and field."""

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        record: int | str | None = None,
        field: str | None = None,
    ):
        where = []
        if path is not None:
            where.append(f"file {path}")
        if record is not None:
            where.append(f"record {record}")
        if field is not None:
            where.append(f"field {field!r}")
        prefix = ", ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)
        self.path, self.record, self.field = path, record, field
