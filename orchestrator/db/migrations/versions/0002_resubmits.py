"""jobs.resubmits: BES jobs submitted again after an environmental failure.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 21:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A plain ADD COLUMN with a constant default: no table rebuild on SQLite, and the
    # job_history view (which names its columns) is untouched.
    op.add_column(
        "jobs", sa.Column("resubmits", sa.Integer(), nullable=False, server_default="0")
    )


def downgrade() -> None:
    op.drop_column("jobs", "resubmits")  # SQLite >= 3.35 drops a column in place
