"""Shared fixtures: a real Azurite per test session, real databases (SQLite file, PostgreSQL)."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from orchestrator import azurite as azurite_mod
from orchestrator.db import migrate, repository

#: The PostgreSQL server CI starts (trust auth). Override with BES_TEST_PG.
PG_ADMIN_DSN = os.environ.get("BES_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture(scope="session")
def azurite() -> Iterator[azurite_mod.Azurite]:
    with azurite_mod.running() as az:
        yield az


async def _create_pg_database() -> str:
    name = f"bes_test_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return name


async def _drop_pg_database(name: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def _pg_url(name: str) -> str:
    base = PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    return f"{base}/{name}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh, empty database: a SQLite file, or a new PostgreSQL database on the test server.
    Suites that take this fixture run once per backend (issue: one parametrised suite)."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'state.db'}"
        return
    name = await _create_pg_database()
    try:
        yield _pg_url(name)
    finally:
        await _drop_pg_database(name)


@pytest.fixture
async def repo(database_url: str) -> AsyncIterator[repository.Repository]:
    """A repository on a freshly migrated database (each backend of `database_url`)."""
    await migrate.upgrade(database_url)
    r = await repository.Repository.open(database_url)
    await r.check_schema()
    try:
        yield r
    finally:
        await r.close()


