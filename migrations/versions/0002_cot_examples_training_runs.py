"""Data loop: cot_examples (synthesised CoT data with its source path) and training_runs (SFT lineage).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 09:00:00.000000

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision: str = '0002'
down_revision: Union[str, Sequence[str], None] = '0001'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

# Spelled out here (not imported from marco.store.types) so this migration never changes with the models.
ID = sa.Uuid(as_uuid=False).with_variant(sa.String(length=36), "sqlite")
JSONDOC = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
NOW = sa.text("CURRENT_TIMESTAMP")


def upgrade() -> None:
    op.create_table('cot_examples',
    sa.Column('run_id', ID, nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('source_batch_id', ID, nullable=True),
    sa.Column('search_id', ID, nullable=True),
    sa.Column('problem_id', ID, nullable=True),
    sa.Column('node_path', JSONDOC, nullable=False),
    sa.Column('messages', JSONDOC, nullable=False),
    sa.Column('rejected', sa.Text(), nullable=True),
    sa.Column('rejected_search_id', ID, nullable=True),
    sa.Column('rejected_path', JSONDOC, nullable=False),
    sa.Column('answer', sa.Text(), nullable=True),
    sa.Column('correct', sa.Boolean(), nullable=True),
    sa.Column('quality', sa.Float(), nullable=False),
    sa.Column('dataset', sa.String(length=100), nullable=True),
    sa.Column('lang', sa.String(length=32), nullable=False),
    sa.Column('meta', JSONDOC, nullable=False),
    sa.Column('id', ID, nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=NOW, nullable=False),
    sa.CheckConstraint("kind IN ('sft', 'preference')", name=op.f('ck_cot_examples_kind')),
    sa.ForeignKeyConstraint(['run_id'], ['batches.id'], name=op.f('fk_cot_examples_run_id_batches'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['search_id'], ['searches.id'], name=op.f('fk_cot_examples_search_id_searches'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['source_batch_id'], ['batches.id'], name=op.f('fk_cot_examples_source_batch_id_batches'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_cot_examples'))
    )
    op.create_index(op.f('ix_cot_examples_run_id_kind'), 'cot_examples', ['run_id', 'kind'], unique=False)
    op.create_index(op.f('ix_cot_examples_dataset_lang'), 'cot_examples', ['dataset', 'lang'], unique=False)
    op.create_index(op.f('ix_cot_examples_search_id'), 'cot_examples', ['search_id'], unique=False)
    op.create_index(op.f('ix_cot_examples_source_batch_id'), 'cot_examples', ['source_batch_id'], unique=False)

    op.create_table('training_runs',
    sa.Column('batch_id', ID, nullable=True),
    sa.Column('job_id', ID, nullable=True),
    sa.Column('base', sa.String(length=500), nullable=False),
    sa.Column('base_model_id', ID, nullable=True),
    sa.Column('output_model_id', ID, nullable=True),
    sa.Column('data', sa.Text(), nullable=False),
    sa.Column('data_path', sa.Text(), nullable=True),
    sa.Column('synthesis_id', ID, nullable=True),
    sa.Column('n_examples', sa.Integer(), nullable=True),
    sa.Column('hyperparameters', JSONDOC, nullable=False),
    sa.Column('losses', JSONDOC, nullable=False),
    sa.Column('metrics', JSONDOC, nullable=False),
    sa.Column('checkpoint', sa.Text(), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('id', ID, nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=NOW, nullable=False),
    sa.CheckConstraint("status IN ('queued', 'running', 'done', 'failed')", name=op.f('ck_training_runs_status')),
    sa.ForeignKeyConstraint(['base_model_id'], ['models.id'], name=op.f('fk_training_runs_base_model_id_models')),
    sa.ForeignKeyConstraint(['batch_id'], ['batches.id'], name=op.f('fk_training_runs_batch_id_batches'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['output_model_id'], ['models.id'], name=op.f('fk_training_runs_output_model_id_models')),
    sa.ForeignKeyConstraint(['synthesis_id'], ['batches.id'], name=op.f('fk_training_runs_synthesis_id_batches'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_training_runs'))
    )
    op.create_index(op.f('ix_training_runs_batch_id'), 'training_runs', ['batch_id'], unique=False)
    op.create_index(op.f('ix_training_runs_output_model_id'), 'training_runs', ['output_model_id'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_training_runs_output_model_id'), table_name='training_runs')
    op.drop_index(op.f('ix_training_runs_batch_id'), table_name='training_runs')
    op.drop_table('training_runs')
    op.drop_index(op.f('ix_cot_examples_source_batch_id'), table_name='cot_examples')
    op.drop_index(op.f('ix_cot_examples_search_id'), table_name='cot_examples')
    op.drop_index(op.f('ix_cot_examples_dataset_lang'), table_name='cot_examples')
    op.drop_index(op.f('ix_cot_examples_run_id_kind'), table_name='cot_examples')
    op.drop_table('cot_examples')
