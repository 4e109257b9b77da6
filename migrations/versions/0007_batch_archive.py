"""Archived batches (issue 18): batches.archived_at, archive_path, archive_rows, archive_sha256.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06 12:00:00.000000

`marco archive` moves an ended batch's tree nodes out of `nodes` into a compressed file (gzip JSON lines,
every column) and records here when, where, how many rows and the file's SHA-256; `marco archive --restore`
puts them back and clears these columns. The `nodes` table itself is unchanged: archiving deletes rows, it
does not change the schema. Every column is NULL for a batch whose nodes are in the table.
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = '0007'
down_revision: Union[str, Sequence[str], None] = '0006'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.add_column('batches', sa.Column('archived_at', sa.DateTime(timezone=True), nullable=True))
    op.add_column('batches', sa.Column('archive_path', sa.Text(), nullable=True))
    op.add_column('batches', sa.Column('archive_rows', sa.BigInteger(), nullable=True))
    op.add_column('batches', sa.Column('archive_sha256', sa.String(length=64), nullable=True))


def downgrade() -> None:
    # Downgrading forgets where archived nodes went: restore them first (`marco archive --restore BATCH`).
    with op.batch_alter_table('batches') as batch:
        batch.drop_column('archive_sha256')
        batch.drop_column('archive_rows')
        batch.drop_column('archive_path')
        batch.drop_column('archived_at')
