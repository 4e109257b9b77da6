"""Trace explorer indexes: searches newest first, batches by name.

Revision ID: 0004
Revises: 0003_queue_faults
Create Date: 2026-11-29 20:00:00.000000

The explorer's and `marco traces list`'s default listing is "newest searches first, one page": without an
index on `searches.created_at` that is a sort of every search. `marco report NAME`, `--batch NAME` and the
explorer resolve batch names on every request.
"""
from typing import Sequence, Union

from alembic import op

revision: str = '0004'
down_revision: Union[str, Sequence[str], None] = '0003_queue_faults'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_index('ix_searches_created_at', 'searches', ['created_at'], unique=False)
    op.create_index('ix_batches_name', 'batches', ['name'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_batches_name', table_name='batches')
    op.drop_index('ix_searches_created_at', table_name='searches')
