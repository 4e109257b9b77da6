"""Queue faults (issue 10): jobs.enqueued_at, jobs.resends, jobs.lease_losses.

Revision ID: 0003_queue_faults
Revises: 0002
Create Date: 2026-11-29 20:00:00.000000

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa

revision: str = '0003_queue_faults'
down_revision: Union[str, Sequence[str], None] = '0002'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.add_column('jobs', sa.Column('enqueued_at', sa.DateTime(timezone=True), server_default=sa.text('CURRENT_TIMESTAMP'), nullable=True))
    op.add_column('jobs', sa.Column('resends', sa.Integer(), server_default=sa.text('0'), nullable=False))
    op.add_column('jobs', sa.Column('lease_losses', sa.Integer(), server_default=sa.text('0'), nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('jobs') as batch:
        batch.drop_column('lease_losses')
        batch.drop_column('resends')
        batch.drop_column('enqueued_at')
