"""Search depth: how deep a search's tree grew and how deep its chosen answer lies.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06 08:00:00.000000

`searches.tree_depth` is the deepest non-rollout node of the tree, `searches.path_depth` the deepest one on
the chosen answer's path (issue 15: report depth with accuracy). Both are NULL for searches finished
before this revision.
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = '0006'
down_revision: Union[str, Sequence[str], None] = '0005'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.add_column('searches', sa.Column('tree_depth', sa.Integer(), nullable=True))
    op.add_column('searches', sa.Column('path_depth', sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('searches') as batch:
        batch.drop_column('path_depth')
        batch.drop_column('tree_depth')
