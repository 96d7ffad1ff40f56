"""Initial schema: jobs, job_events, queue, workers and the job_history view.

Revision ID: 0001
Revises:
Create Date: 2026-01-01 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The columns of job_history (the README lists them), in order; the bodies below differ only in
# how each dialect turns a timestamp into ISO-8601 UTC text and computes the duration.
_PLAIN_COLUMNS = (
    "input_path, input_name, input_sha256, input_size, service, watch, state, "
    "bes_job_id, bes_status, attempts, runs"
)
_TIMESTAMPS = ("created_at", "submitted_at", "started_at", "finished_at", "updated_at")


def _sqlite_iso(column: str) -> str:
    # Stored as fixed-width 'YYYY-MM-DD HH:MM:SS.ffffff' UTC text (tables.UTCDateTime):
    # cut to milliseconds (truncating, as PostgreSQL's MS and clock.iso do) and add the T/Z.
    return f"substr({column}, 1, 10) || 'T' || substr({column}, 12, 12) || 'Z'"


def _pg_iso(column: str) -> str:
    return f"""to_char({column} AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')"""


def _view_sql(dialect: str) -> str:
    iso = _sqlite_iso if dialect == "sqlite" else _pg_iso
    if dialect == "sqlite":
        duration = "round((julianday(finished_at) - julianday(created_at)) * 86400.0, 3)"
    else:
        duration = (
            "round(EXTRACT(EPOCH FROM (finished_at - created_at))::numeric, 3)::double precision"
        )
    stamps = ",\n    ".join(f"{iso(c)} AS {c}" for c in _TIMESTAMPS)
    return f"""CREATE VIEW job_history AS
SELECT
    id AS job_id,
    {_PLAIN_COLUMNS},
    {stamps},
    CASE WHEN finished_at IS NULL THEN NULL ELSE {duration} END AS duration_s,
    outputs,
    error,
    error_code,
    lease_owner AS worker
FROM jobs"""


def _ts() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def _id_type() -> sa.types.TypeEngine[int]:
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("service", sa.String(200), nullable=False),
        sa.Column("watch", sa.String(200), nullable=True),
        sa.Column("claim_key", sa.Text(), nullable=False),
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
        sa.Column("result_refs", sa.Text(), nullable=False, server_default="{}"),
        sa.Column("outputs", sa.Text(), nullable=False, server_default="{}"),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("error_code", sa.String(100), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("runs", sa.Integer(), nullable=False, server_default="1"),
        sa.Column("poll_count", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("lease_owner", sa.String(200), nullable=True),
        sa.Column("lease_expires_at", _ts(), nullable=True),
        sa.Column("next_run_at", _ts(), nullable=False),
        sa.Column("deadline_at", _ts(), nullable=True),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("updated_at", _ts(), nullable=False),
        sa.Column("submitted_at", _ts(), nullable=True),
        sa.Column("started_at", _ts(), nullable=True),
        sa.Column("finished_at", _ts(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_jobs"),
        sa.UniqueConstraint("claim_key", name="uq_jobs_claim_key"),
    )
    op.create_index("ix_jobs_state_next_run_at", "jobs", ["state", "next_run_at"])
    op.create_index("ix_jobs_lease_owner", "jobs", ["lease_owner"])
    op.create_index("ix_jobs_created_at", "jobs", ["created_at"])

    op.create_table(
        "job_events",
        sa.Column("id", _id_type(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("at", _ts(), nullable=False),
        sa.Column("from_state", sa.String(32), nullable=True),
        sa.Column("to_state", sa.String(32), nullable=False),
        sa.Column("worker", sa.String(200), nullable=True),
        sa.Column("message", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name="fk_job_events_job_id_jobs", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_job_events"),
    )
    op.create_index("ix_job_events_job_id", "job_events", ["job_id", "id"])

    op.create_table(
        "queue",
        sa.Column("id", _id_type(), autoincrement=True, nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("service", sa.String(200), nullable=False),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("job_id", sa.String(32), nullable=True),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name="fk_queue_job_id_jobs"),
        sa.PrimaryKeyConstraint("id", name="pk_queue"),
    )
    op.create_index(
        "ix_queue_unclaimed",
        "queue",
        ["id"],
        sqlite_where=sa.text("job_id IS NULL"),
        postgresql_where=sa.text("job_id IS NULL"),
    )

    op.create_table(
        "workers",
        sa.Column("id", sa.String(200), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("started_at", _ts(), nullable=False),
        sa.Column("last_seen_at", _ts(), nullable=False),
        sa.Column("stopped_at", _ts(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_workers"),
    )

    op.execute(_view_sql(op.get_context().dialect.name))


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS job_history")
    op.drop_table("workers")
    op.drop_index("ix_queue_unclaimed", table_name="queue")
    op.drop_table("queue")
    op.drop_index("ix_job_events_job_id", table_name="job_events")
    op.drop_table("job_events")
    op.drop_index("ix_jobs_created_at", table_name="jobs")
    op.drop_index("ix_jobs_lease_owner", table_name="jobs")
    op.drop_index("ix_jobs_state_next_run_at", table_name="jobs")
    op.drop_table("jobs")
