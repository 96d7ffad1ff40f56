"""Table definitions (SQLAlchemy Core). The schema itself changes only through migrations:
`orchestrator/db/migrations/versions/` must create exactly what this module declares (a test
compares them).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect

#: Naming convention so constraint names are stable across dialects and migrations.
NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)


class UTCDateTime(sa.TypeDecorator[dt.datetime]):
    """Timezone-aware UTC in, timezone-aware UTC out, on every dialect.

    PostgreSQL stores `timestamptz`. SQLite has no time zone type: the value is stored as
    fixed-width UTC text (`2026-11-27 20:45:55.123456`), so text order is time order and
    the claim query can compare it directly.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            # A naive time is ambiguous; refusing it keeps every stored value UTC.
            raise ValueError("naive datetime given to the database; use clock.now()")
        value = value.astimezone(dt.UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(
        self, value: dt.datetime | None, dialect: Dialect
    ) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


def _id_type() -> sa.types.TypeEngine[int]:
    # SQLite: INTEGER PRIMARY KEY is the rowid alias (autoincrement without a sequence).
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("state", sa.String(32), nullable=False),
    sa.Column("service", sa.String(200), nullable=False),
    sa.Column("watch", sa.String(200), nullable=True),
    # The uniqueness rule that stops two hosts (or two daemons) claiming one file.
    sa.Column("claim_key", sa.Text(), nullable=False, unique=True),
    sa.Column("source_path", sa.Text(), nullable=False),
    sa.Column("input_name", sa.Text(), nullable=False),
    sa.Column("input_path", sa.Text(), nullable=False),
    sa.Column("input_sha256", sa.String(64), nullable=True),
    sa.Column("input_size", sa.BigInteger(), nullable=True),
    sa.Column("output_dir", sa.Text(), nullable=False),
    sa.Column("archive_dir", sa.Text(), nullable=False),
    sa.Column("failed_dir", sa.Text(), nullable=False),
    sa.Column("bes_job_id", sa.String(100), nullable=True),
    sa.Column("bes_status", sa.String(40), nullable=True),
    # JSON text (output name -> URL / local path): readable with plain sqlite3 and psql.
    sa.Column("result_refs", sa.Text(), nullable=False, server_default="{}"),
    sa.Column("outputs", sa.Text(), nullable=False, server_default="{}"),
    sa.Column("error", sa.Text(), nullable=True),
    sa.Column("error_code", sa.String(100), nullable=True),
    sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("runs", sa.Integer(), nullable=False, server_default="1"),
    sa.Column("poll_count", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("resubmits", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("cancel_requested", sa.Boolean(), nullable=False, server_default=sa.false()),
    sa.Column("lease_owner", sa.String(200), nullable=True),
    sa.Column("lease_expires_at", UTCDateTime(), nullable=True),
    sa.Column("next_run_at", UTCDateTime(), nullable=False),
    sa.Column("deadline_at", UTCDateTime(), nullable=True),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
    sa.Column("submitted_at", UTCDateTime(), nullable=True),
    sa.Column("started_at", UTCDateTime(), nullable=True),
    sa.Column("finished_at", UTCDateTime(), nullable=True),
    sa.Index("ix_jobs_state_next_run_at", "state", "next_run_at"),
    sa.Index("ix_jobs_lease_owner", "lease_owner"),
    sa.Index("ix_jobs_created_at", "created_at"),
    #: The scrape-time gauges read only this index.
    sa.Index("ix_jobs_gauges", "state", "service", "bes_status", "created_at", "submitted_at"),
)

job_events = sa.Table(
    "job_events",
    metadata,
    sa.Column("id", _id_type(), primary_key=True, autoincrement=True),
    sa.Column(
        "job_id", sa.String(32), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False
    ),
    sa.Column("at", UTCDateTime(), nullable=False),
    sa.Column("from_state", sa.String(32), nullable=True),
    sa.Column("to_state", sa.String(32), nullable=False),
    sa.Column("worker", sa.String(200), nullable=True),
    sa.Column("message", sa.Text(), nullable=False),
    sa.Index("ix_job_events_job_id", "job_id", "id"),
)

queue = sa.Table(
    "queue",
    metadata,
    sa.Column("id", _id_type(), primary_key=True, autoincrement=True),
    sa.Column("path", sa.Text(), nullable=False),
    sa.Column("service", sa.String(200), nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    # No ON DELETE action: a queue row whose job vanished must not look unclaimed again.
    sa.Column("job_id", sa.String(32), sa.ForeignKey("jobs.id"), nullable=True),
)


def _partial_index(
    name: str, *columns: sa.Column[Any], where: sa.ColumnElement[bool]
) -> sa.Index:
    """An index of the rows where `where` holds, on both dialects."""
    return sa.Index(name, *columns, sqlite_where=where, postgresql_where=where)


# Only the unclaimed rows are ever scanned: a partial index keeps that cheap forever.
_partial_index("ix_queue_unclaimed", queue.c.id, where=queue.c.job_id.is_(None))

# The claim loop's two reads (claims.claim_due): due jobs without a lease, and leases by expiry.
# Partial, so a poll of a held job (a new next_run_at) touches neither; lease_owner is also a
# column of the first so that SQLite, without statistics, prefers it to ix_jobs_lease_owner.
# (On PostgreSQL migration 0004 also adds statistics on (state, lease_owner) for its planner.)
_partial_index("ix_jobs_free_due", jobs.c.state, jobs.c.lease_owner, jobs.c.next_run_at,
               where=jobs.c.lease_owner.is_(None))
_partial_index("ix_jobs_lease_expiry", jobs.c.state, jobs.c.lease_expires_at,
               where=jobs.c.lease_expires_at.is_not(None))

workers = sa.Table(
    "workers",
    metadata,
    sa.Column("id", sa.String(200), primary_key=True),
    sa.Column("host", sa.String(255), nullable=False),
    sa.Column("pid", sa.Integer(), nullable=False),
    sa.Column("started_at", UTCDateTime(), nullable=False),
    sa.Column("last_seen_at", UTCDateTime(), nullable=False),
    sa.Column("stopped_at", UTCDateTime(), nullable=True),
)

#: The documented read interface (the README's "The job history"); created by the migrations,
#: one body per dialect.
JOB_HISTORY_VIEW = "job_history"
