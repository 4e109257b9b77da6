"""Fencing and attempts that mean deaths (issue 17): jobs.lease_token, jobs.expiries, jobs.releases.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06 08:00:00.000000

``lease_token`` grows by one on every claim; every write of a job's results checks it in the write's own
transaction. ``expiries`` counts leases that ran out (a death, unless the worker later reports the loss in
``lease_losses``) and ``releases`` the jobs handed back by a live worker (warm shutdown, model server
down); only deaths count toward the scheduler's ``max_attempts``. ``resend_step`` is the re-send back-off
step since the last claim (``resends`` keeps the total for ``marco status``).
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa

revision: str = '0005'
down_revision: Union[str, Sequence[str], None] = '0004'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.add_column('jobs', sa.Column('lease_token', sa.BigInteger(), server_default=sa.text('0'), nullable=False))
    op.add_column('jobs', sa.Column('expiries', sa.Integer(), server_default=sa.text('0'), nullable=False))
    op.add_column('jobs', sa.Column('releases', sa.Integer(), server_default=sa.text('0'), nullable=False))
    op.add_column('jobs', sa.Column('resend_step', sa.Integer(), server_default=sa.text('0'), nullable=False))
    op.add_column('nodes', sa.Column('claim', sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('nodes') as batch:
        batch.drop_column('claim')
    with op.batch_alter_table('jobs') as batch:
        batch.drop_column('resend_step')
        batch.drop_column('releases')
        batch.drop_column('expiries')
        batch.drop_column('lease_token')
