"""Migrations: the schema check, and that the migrations build exactly what tables.py declares."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from alembic import autogenerate
from alembic import migration as alembic_migration

from orchestrator import errors
from orchestrator.db import engine as db_engine
from orchestrator.db import migrate, repository, tables


async def test_fresh_database_fails_check_until_migrated(database_url: str) -> None:
    repo = await repository.Repository.open(database_url)
    try:
        with pytest.raises(errors.DatabaseVersionError, match="run `bes-orchestrator migrate`"):
            await repo.check_schema()
        await migrate.upgrade(database_url)
        await repo.check_schema()
        # Migrating again is a no-op, not an error.
        await migrate.upgrade(database_url)
        await repo.check_schema()
    finally:
        await repo.close()


async def _exec(url: str, *statements: str) -> None:
    engine = db_engine.create_engine(url)
    try:
        async with engine.begin() as conn:
            for statement in statements:
                await conn.execute(sa.text(statement))
    finally:
        await engine.dispose()


async def test_database_from_a_newer_program_fails_check(database_url: str) -> None:
    await migrate.upgrade(database_url)
    await _exec(database_url, "UPDATE alembic_version SET version_num = '9999_future'")
    repo = await repository.Repository.open(database_url)
    try:
        with pytest.raises(errors.DatabaseVersionError, match="migrated by a newer"):
            await repo.check_schema()
    finally:
        await repo.close()


async def test_empty_version_table_means_no_schema(database_url: str) -> None:
    await migrate.upgrade(database_url)
    await _exec(database_url, "DELETE FROM alembic_version")
    repo = await repository.Repository.open(database_url)
    try:
        with pytest.raises(errors.DatabaseVersionError, match="no schema"):
            await repo.check_schema()
    finally:
        await repo.close()


def test_older_known_revision_is_reported_as_behind() -> None:
    with pytest.raises(errors.DatabaseVersionError, match=r"at revision 0001.*needs 0002.*migrate"):
        migrate.check_revision("0001")


async def test_database_at_0001_is_behind_then_upgrades(database_url: str) -> None:
    await migrate.upgrade(database_url, revision="0001")
    repo = await repository.Repository.open(database_url)
    try:
        with pytest.raises(errors.DatabaseVersionError, match="migrate"):
            await repo.check_schema()
    finally:
        await repo.close()
    await migrate.upgrade(database_url)
    repo = await repository.Repository.open(database_url)
    try:
        await repo.check_schema()
    finally:
        await repo.close()


def test_head_revision() -> None:
    assert migrate.head_revision() == "0002"
    assert migrate.MIGRATIONS_DIR.joinpath("env.py").is_file()
    assert migrate.INI_PATH.is_file()


async def test_migrations_match_tables_py(database_url: str) -> None:
    """Autogenerate finds nothing to do: tables.py and the migrations agree, per dialect."""
    await migrate.upgrade(database_url)
    engine = db_engine.create_engine(database_url)

    def diff(sync: sa.Connection) -> list[Any]:
        context = alembic_migration.MigrationContext.configure(
            sync, opts={"compare_type": True, "compare_server_default": False}
        )
        return list(autogenerate.compare_metadata(context, tables.metadata))

    try:
        async with engine.connect() as conn:
            differences = await conn.run_sync(diff)
            views = await conn.run_sync(lambda sync: sa.inspect(sync).get_view_names())
    finally:
        await engine.dispose()
    assert differences == []
    assert views == [tables.JOB_HISTORY_VIEW]
