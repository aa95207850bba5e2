"""message_deliveries.open_runs: one token per unfinished run, in place of one shared flag (kept
for the previous release's workers until a later release drops it)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Expand only (docs/operations.md, "Upgrades"): the previous release's workers still set
    # `running` while the new ones roll out, and the new ones keep it up to date and count the
    # runs it marks (worker/store/deliveries.py); a later release drops it.
    op.add_column(
        "message_deliveries",
        sa.Column("open_runs", sa.ARRAY(sa.Text()), server_default="{}", nullable=False),
    )


def downgrade() -> None:
    op.execute("UPDATE message_deliveries SET running = running OR cardinality(open_runs) > 0")
    op.drop_column("message_deliveries", "open_runs")
