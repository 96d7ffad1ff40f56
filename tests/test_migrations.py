"""Migrations: the schema check, and that the migrations build exactly what tables.py declares."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import autogenerate
from alembic import migration as alembic_migration

import orchestrator
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
    head = migrate.head_revision()
    with pytest.raises(errors.DatabaseVersionError,
                       match=rf"at revision 0001.*needs {head}.*migrate"):
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


def test_head_revision_is_the_newest_script_inside_the_package() -> None:
    versions = sorted(p.name.split("_", 1)[0] for p in
                      migrate.MIGRATIONS_DIR.joinpath("versions").glob("[0-9]*.py"))
    assert migrate.head_revision() == versions[-1]
    # Package data, beside the code (so a wheel carries it), not at the checkout's top level.
    package = Path(orchestrator.__file__).parent
    assert migrate.MIGRATIONS_DIR == package / "db" / "migrations"
    assert migrate.MIGRATIONS_DIR.joinpath("env.py").is_file()
    assert migrate.INI_PATH == package / "alembic.ini" and migrate.INI_PATH.is_file()


@pytest.fixture
def migrations_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A copy of the migrations that the test breaks, used in place of the package's."""
    copy = tmp_path / "migrations"
    shutil.copytree(migrate.MIGRATIONS_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(migrate, "MIGRATIONS_DIR", copy)
    migrate.head_revision.cache_clear()
    yield copy
    migrate.head_revision.cache_clear()


def test_missing_migrations_are_one_line_naming_the_fix(migrations_copy: Path) -> None:
    shutil.rmtree(migrations_copy)
    with pytest.raises(migrate.MigrationsError) as info:
        migrate.head_revision()
    message = str(info.value)
    assert "migrations are missing" in message and "reinstall" in message
    assert "\n" not in message
    assert isinstance(info.value, errors.DatabaseVersionError)  # the CLI: one line, exit 78


async def test_missing_migrations_fail_before_the_database_is_touched(
    migrations_copy: Path, tmp_path: Path
) -> None:
    (migrations_copy / "env.py").unlink()
    db = tmp_path / "state.db"
    with pytest.raises(migrate.MigrationsError, match=r"env\.py not found"):
        await migrate.upgrade(f"sqlite+aiosqlite:///{db}")
    assert not db.exists()


def test_a_revision_whose_parent_is_missing_is_a_broken_install(migrations_copy: Path) -> None:
    (first,) = migrations_copy.joinpath("versions").glob("0001_*.py")
    first.unlink()
    with pytest.raises(migrate.MigrationsError, match=r"cannot be loaded.*reinstall") as info:
        migrate.head_revision()
    assert "\n" not in str(info.value)


def test_a_script_that_cannot_be_imported_is_a_broken_install(migrations_copy: Path) -> None:
    migrations_copy.joinpath("versions", "0999_bad.py").write_text("import no_such_module_x\n")
    with pytest.raises(migrate.MigrationsError, match="ModuleNotFoundError: No module named"):
        migrate.head_revision()


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


async def test_an_env_py_that_cannot_be_loaded_is_a_broken_install(
    migrations_copy: Path, tmp_path: Path
) -> None:
    migrations_copy.joinpath("env.py").write_text("def broken(:\n")
    with pytest.raises(migrate.MigrationsError, match=r"SyntaxError.*reinstall"):
        await migrate.upgrade(f"sqlite+aiosqlite:///{tmp_path / 'state.db'}")
