"""An index that answers the scrape-time gauges (jobs by state, service and backend status, and
the oldest job of each) from the index alone.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30 17:20:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Without it SQLite reads every unfinished row at each Prometheus scrape (23 ms of the
    # daemon's CPU with 10,000 jobs held); with it the scrape reads the index only.
    op.create_index("ix_jobs_gauges", "jobs",
                    ["state", "service", "bes_status", "created_at", "submitted_at"])


def downgrade() -> None:
    op.drop_index("ix_jobs_gauges", table_name="jobs")
