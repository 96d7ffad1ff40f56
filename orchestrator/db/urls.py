"""SQLite database URLs read without SQLAlchemy.

`import sqlalchemy` costs about 0.2 s, more than the whole budget of `status`. The common form
of a SQLite URL, `sqlite+aiosqlite:///<path>` with no query string, is parsed here exactly as
SQLAlchemy's `make_url` parses it (the database part is percent-decoded; rendering quotes it
again); every other URL, PostgreSQL's included, goes to SQLAlchemy. A test holds the two to the
same answers."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote, unquote

SQLITE_SCHEMES = ("sqlite+aiosqlite", "sqlite", "sqlite+pysqlite")


def plain_sqlite_database(url: str) -> str | None:
    """The database part of `<sqlite scheme>:///<database>` without `?`: a path, `:memory:`
    or "" (in-memory). None for any other URL: ask SQLAlchemy."""
    scheme, sep, rest = url.partition(":///")
    if not sep or scheme not in SQLITE_SCHEMES or "?" in rest:
        return None
    return unquote(rest)


def render_sqlite(database: str) -> str:
    """`sqlite+aiosqlite:///<database>`, quoted as SQLAlchemy's `render_as_string` does."""
    return "sqlite+aiosqlite:///" + quote(database, safe=" +/")


def sqlite_file(database: str) -> Path | None:
    """The file a SQLite URL's database part names; None for an in-memory database (`""`,
    `:memory:`) or a `file:` URI."""
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)
