"""Alembic environment (async). Three ways in:

- `orchestrator.db.migrate.upgrade()` (what `bes-orchestrator migrate` runs) hands over an open
  connection in `config.attributes["connection"]`;
- `alembic -c orchestrator/alembic.ini upgrade head` with `BES_DATABASE_URL` (and optionally
  `BES_DATABASE_PASSWORD`) in the environment;
- offline (`--sql`) with the same URL, to print the DDL.

SQLite runs in batch mode (`render_as_batch`): it cannot ALTER most things in place.
"""

from __future__ import annotations

import asyncio
import os

from alembic import context
from sqlalchemy import pool
from sqlalchemy.engine import Connection

from orchestrator.db import engine as db_engine
from orchestrator.db import tables

config = context.config
target_metadata = tables.metadata


def _url() -> str:
    url = config.attributes.get("url") or os.environ.get("BES_DATABASE_URL")
    if not url:
        raise SystemExit("set BES_DATABASE_URL to the database to migrate")
    return str(url)


def _password() -> str | None:
    password = config.attributes.get("password") or os.environ.get("BES_DATABASE_PASSWORD")
    return str(password) if password else None


def run_migrations_offline() -> None:
    context.configure(
        url=db_engine.parse_url(_url()),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def do_run_migrations(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_async_migrations() -> None:
    engine = db_engine.create_engine(_url(), password=_password(), poolclass=pool.NullPool)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(do_run_migrations)
    finally:
        await engine.dispose()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        do_run_migrations(connection)
    else:
        asyncio.run(run_async_migrations())


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
