"""Schema migrations (Alembic), driven from Python so `bes-orchestrator migrate` needs no
alembic.ini in the working directory, and the schema check the daemon runs at start-up.

Alembic (with Mako and Pygments) and SQLAlchemy are imported only by the functions that need
them: the daemon and the commands compare the database's revision with `head_from_text()`, the
revision chain read from the scripts' text, and load Alembic only when that does not settle it
(another revision, or scripts that do not read as one chain); `migrate` loads every script."""

from __future__ import annotations

import functools
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator import errors

if TYPE_CHECKING:
    import sqlalchemy as sa
    from alembic import config as alembic_config
    from alembic import script as alembic_script
    from sqlalchemy.ext import asyncio as sa_asyncio

#: orchestrator/alembic.ini (package data); its script_location points at MIGRATIONS_DIR.
INI_PATH = Path(__file__).resolve().parent.parent / "alembic.ini"
#: orchestrator/db/migrations: package data, found beside this module in a wheel, an sdist
#: install and an editable checkout alike.
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
VERSION_TABLE = "alembic_version"


class MigrationsError(errors.DatabaseVersionError):
    """This install's migration scripts are missing or unreadable: a packaging fault, not a
    database one. The CLI prints it on one line and exits 78, like any database version error."""


def alembic_cfg() -> alembic_config.Config:
    from alembic import config as alembic_config

    cfg = alembic_config.Config(str(INI_PATH)) if INI_PATH.exists() else alembic_config.Config()
    # Set explicitly: correct even if the ini is missing or was read from another place.
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


def _broken(problem: str) -> MigrationsError:
    return MigrationsError(
        f"{problem}: this bes-orchestrator install is incomplete; reinstall it from its wheel "
        "(pip install --force-reinstall <the .whl file>)"
    )


def _one_line(exc: BaseException) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def script_directory() -> alembic_script.ScriptDirectory:
    """Alembic's view of MIGRATIONS_DIR, every script loaded; MigrationsError (one line) if the
    install lacks them or one cannot be loaded."""
    for needed in (MIGRATIONS_DIR / "env.py", MIGRATIONS_DIR / "versions"):
        if not needed.exists():
            raise _broken(f"the schema migrations are missing ({needed} not found)")
    from alembic import script as alembic_script

    try:
        with warnings.catch_warnings():
            # Alembic only warns about a revision whose parent is missing; here it is an error.
            warnings.simplefilter("error")
            scripts = alembic_script.ScriptDirectory.from_config(alembic_cfg())
            scripts.revision_map.heads  # noqa: B018 - loads and links every script now
    except Exception as exc:  # any fault in the scripts means a broken install
        raise _broken(
            f"the schema migrations in {MIGRATIONS_DIR} cannot be loaded ({_one_line(exc)})"
        ) from None
    return scripts


@functools.cache
def head_revision() -> str:
    """The revision this program's schema is at."""
    from alembic import util as alembic_util

    try:
        head = script_directory().get_current_head()
    except alembic_util.CommandError as exc:  # two heads
        raise _broken(
            f"the schema migrations in {MIGRATIONS_DIR} are inconsistent ({_one_line(exc)})"
        ) from None
    if head is None:
        raise _broken(f"no schema migrations found in {MIGRATIONS_DIR}")
    return head


def _known_revision(revision: str) -> bool:
    from alembic import util as alembic_util

    scripts = script_directory()
    try:
        return scripts.get_revision(revision) is not None
    except alembic_util.CommandError:
        return False


async def upgrade(url: str, password: str | None = None, *, revision: str = "head") -> None:
    """Bring the database at `url` up to `revision`, in one transaction."""
    from sqlalchemy import pool

    from orchestrator.db import engine as db_engine

    head_revision()  # a missing or broken set of migrations fails here, on one line
    engine = db_engine.create_engine(url, password=password, poolclass=pool.NullPool)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(_run_upgrade, revision)
    finally:
        await engine.dispose()


def _run_upgrade(connection: sa.Connection, revision: str) -> None:
    from alembic import command
    from alembic import util as alembic_util

    cfg = alembic_cfg()
    cfg.attributes["connection"] = connection
    try:
        command.upgrade(cfg, revision)
    except alembic_util.CommandError as exc:  # e.g. an unknown target revision
        raise MigrationsError(f"cannot migrate to {revision}: {_one_line(exc)}") from None
    except (ImportError, SyntaxError) as exc:  # env.py, which Alembic loads only now
        raise _broken(
            f"the schema migrations in {MIGRATIONS_DIR} cannot be loaded ({_one_line(exc)})"
        ) from None


async def current_revision(engine: sa_asyncio.AsyncEngine) -> str | None:
    """The revision stamped in the database; None if it was never migrated."""
    import sqlalchemy as sa

    from orchestrator.db import engine as db_engine

    async with engine.connect() as conn:
        conn = await conn.execution_options(**{db_engine.READ_ONLY: True})
        has_table = await conn.run_sync(
            lambda sync: sa.inspect(sync).has_table(VERSION_TABLE)
        )
        if not has_table:
            return None
        rows = (await conn.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE}"))).all()
    return str(rows[0][0]) if rows else None


def check_revision(revision: str | None) -> None:
    """Raise errors.DatabaseVersionError unless `revision` is this program's head."""
    head = head_revision()
    if revision == head:
        return
    if revision is None:
        raise errors.DatabaseVersionError(
            "the database has no schema yet: run `bes-orchestrator migrate`"
        )
    if _known_revision(revision):
        raise errors.DatabaseVersionError(
            f"the database schema is at revision {revision}, this program needs {head}: "
            "run `bes-orchestrator migrate`"
        )
    raise errors.DatabaseVersionError(
        f"the database schema is at revision {revision}, unknown to this program (head {head}): "
        "this database was migrated by a newer bes-orchestrator"
    )


_REVISION_RE = re.compile(r"^revision(?:\s*:[^=]+)?\s*=\s*['\"]([^'\"]+)['\"]", re.M)
_DOWN_RE = re.compile(r"^down_revision(?:\s*:[^=]+)?\s*=\s*(None|['\"]([^'\"]+)['\"])\s*$", re.M)


def head_from_text() -> str | None:
    """The head revision read from the scripts' text, without Alembic: None unless every
    script names one revision and one parent (or none) and they form a single chain."""
    if not (MIGRATIONS_DIR / "env.py").is_file():
        return None
    parents: dict[str, str | None] = {}
    try:
        for script in (MIGRATIONS_DIR / "versions").glob("*.py"):
            text = script.read_text(encoding="utf-8")
            revs, downs = _REVISION_RE.findall(text), _DOWN_RE.findall(text)
            if len(revs) != 1 or len(downs) != 1 or revs[0] in parents:
                return None
            parents[revs[0]] = downs[0][1] or None
    except (OSError, UnicodeDecodeError):
        return None
    roots = [r for r, p in parents.items() if p is None]
    heads = set(parents) - {p for p in parents.values() if p is not None}
    if len(roots) != 1 or len(heads) != 1 or any(
            p is not None and p not in parents for p in parents.values()):
        return None
    return heads.pop()


async def check(engine: sa_asyncio.AsyncEngine, *, quick: bool = False) -> None:
    """Raise errors.DatabaseVersionError unless the database is at this program's head.
    `quick`: a database at the head that the scripts' text names is accepted without loading
    Alembic; anything else (another revision, scripts that do not read as one chain) gets the
    full check and its message."""
    revision = await current_revision(engine)
    if quick and revision is not None and revision == head_from_text():
        return
    check_revision(revision)
