"""outbox: each event's content hash and a look-up by (source, id) for the HTTP front door; when
each row was last sent, for the relay's backlog-aware resend

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable: rows written before, and by upstream systems' own SQL, have none; the front
    # door then reads the body (worker/store/outbox.py).
    op.add_column("outbox", sa.Column("content_hash", sa.Text(), nullable=True))
    op.create_index("ix_outbox_source_event_id", "outbox", ["source", "event_id"], unique=False)
    op.add_column("outbox", sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("outbox", "sent_at")
    op.drop_index("ix_outbox_source_event_id", table_name="outbox")
    op.drop_column("outbox", "content_hash")
