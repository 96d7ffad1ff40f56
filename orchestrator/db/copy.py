"""`bes-orchestrator db copy`: move a job history from one database to another, typically an
existing SQLite file to a new PostgreSQL database when one daemon is no longer enough.

Copied: jobs, their events and the queue table, with their ids, so `jobs show <id>` and queue
ids stay valid. Not copied: workers and leases (they belong to processes of the old database;
an active job arrives unleased and the next daemon claims it at the step it had reached).

The source is read in one transaction (one consistent snapshot) and the target written in one
transaction: a failed copy leaves the target empty. Stop the daemons on the source first, or
jobs they move on after the snapshot are not in the copy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy import pool
from sqlalchemy.ext import asyncio as sa_asyncio

from orchestrator import errors
from orchestrator.db import engine as db_engine
from orchestrator.db import migrate, tables

#: Rows per INSERT batch: bounded memory whatever the history's size.
BATCH_ROWS = 1_000
#: Copied in this order (foreign keys: events and queue rows point at jobs).
COPIED_TABLES: tuple[sa.Table, ...] = (tables.jobs, tables.job_events, tables.queue)
#: Tables whose integer ids come from a sequence on PostgreSQL: moved past the copied ids.
_SERIAL_TABLES: tuple[sa.Table, ...] = (tables.job_events, tables.queue)


class SourceMissing(errors.OrchestratorError):
    """The source SQLite file does not exist (opening it would create an empty one)."""


class TargetNotEmpty(errors.OrchestratorError):
    """The target already holds jobs, events or queue rows: copying would mix two histories."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class CopyCounts:
    jobs: int
    events: int
    queue: int


def _clear_lease(row: Mapping[str, Any]) -> dict[str, Any]:
    return {**row, "lease_owner": None, "lease_expires_at": None}


async def copy_history(
    source_url: str,
    target_url: str,
    *,
    source_password: str | None = None,
    target_password: str | None = None,
) -> CopyCounts:
    """Copy jobs, events and queue rows from `source_url` into `target_url`.

    The source must be at this program's schema head (run `migrate` on it first). The target is
    migrated to head if needed and must then hold no jobs, events or queue rows."""
    path = db_engine.sqlite_path(db_engine.parse_url(source_url))
    if path is not None and not path.exists():
        raise SourceMissing(f"the source database {path} does not exist")
    source = db_engine.create_engine(source_url, password=source_password,
                                     poolclass=pool.NullPool)
    target: sa_asyncio.AsyncEngine | None = None
    try:
        await migrate.check(source)
        await migrate.upgrade(target_url, target_password)
        target = db_engine.create_engine(target_url, password=target_password,
                                         poolclass=pool.NullPool)
        await migrate.check(target)
        read_only = source.execution_options(**{db_engine.READ_ONLY: True})
        async with read_only.connect() as src, target.begin() as dst:
            await _refuse_non_empty(dst, target_url)
            counts: dict[str, int] = {}
            for table in COPIED_TABLES:
                counts[table.name] = await _copy_table(src, dst, table)
            if not db_engine.is_sqlite(target):
                await _advance_sequences(dst)
    finally:
        await source.dispose()
        if target is not None:
            await target.dispose()
    return CopyCounts(jobs=counts["jobs"], events=counts["job_events"], queue=counts["queue"])


async def _refuse_non_empty(conn: sa_asyncio.AsyncConnection, url: str) -> None:
    for table in COPIED_TABLES:
        n = (await conn.execute(sa.select(sa.func.count()).select_from(table))).scalar_one()
        if n:
            raise TargetNotEmpty(
                f"the target database {db_engine.safe_url(url)} already has {n} rows in "
                f"{table.name}: copy into a new, empty database"
            )


async def _copy_table(
    src: sa_asyncio.AsyncConnection, dst: sa_asyncio.AsyncConnection, table: sa.Table
) -> int:
    primary = list(table.primary_key.columns)
    result = await src.stream(sa.select(table).order_by(*primary))
    copied = 0
    async for part in result.mappings().partitions(BATCH_ROWS):
        rows = [dict(r) for r in part]
        if table is tables.jobs:
            rows = [_clear_lease(r) for r in rows]
        await dst.execute(sa.insert(table), rows)
        copied += len(rows)
    return copied


async def _advance_sequences(conn: sa_asyncio.AsyncConnection) -> None:
    """Explicit ids do not move a PostgreSQL sequence: set each one past the largest copied id,
    or the next event or queue row would collide with a copied one."""
    for table in _SERIAL_TABLES:
        await conn.execute(
            sa.text(
                f"SELECT setval(pg_get_serial_sequence('{table.name}', 'id'), "
                f"COALESCE((SELECT max(id) FROM {table.name}), 0) + 1, false)"
            )
        )
