"""Initial schema: models, batches, jobs, problems, searches, nodes.

Revision ID: 0001
Revises:
Create Date: 2026-11-27 12:00:01.580999

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

# revision identifiers, used by Alembic.
revision: str = '0001'
down_revision: Union[str, Sequence[str], None] = None
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

# Spelled out here (not imported from marco.store.types) so this migration never changes with the models.
ID = sa.Uuid(as_uuid=False).with_variant(sa.String(length=36), "sqlite")
JSONDOC = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
NOW = sa.text("CURRENT_TIMESTAMP")


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table('models',
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('spec', sa.String(length=500), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('parent_id', ID, nullable=True),
    sa.Column('path', sa.Text(), nullable=True),
    sa.Column('meta', JSONDOC, nullable=False),
    sa.Column('id', ID, nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=NOW, nullable=False),
    sa.ForeignKeyConstraint(['parent_id'], ['models.id'], name=op.f('fk_models_parent_id_models')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_models')),
    sa.UniqueConstraint('spec', name=op.f('uq_models_spec'))
    )
    op.create_table('batches',
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('dataset', sa.String(length=100), nullable=True),
    sa.Column('model_id', ID, nullable=True),
    sa.Column('config', JSONDOC, nullable=False),
    sa.Column('priority', sa.Integer(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('n_problems', sa.Integer(), nullable=False),
    sa.Column('n_jobs', sa.Integer(), nullable=False),
    sa.Column('n_searches', sa.Integer(), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('id', ID, nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=NOW, nullable=False),
    sa.CheckConstraint("kind IN ('reason', 'synthesize', 'train')", name=op.f('ck_batches_kind')),
    sa.CheckConstraint("status IN ('queued', 'running', 'done', 'failed', 'cancelled')", name=op.f('ck_batches_status')),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_batches_model_id_models')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_batches'))
    )
    op.create_index(op.f('ix_batches_dataset'), 'batches', ['dataset'], unique=False)
    op.create_index(op.f('ix_batches_model_id'), 'batches', ['model_id'], unique=False)
    op.create_index(op.f('ix_batches_status_priority'), 'batches', ['status', 'priority'], unique=False)
    op.create_table('jobs',
    sa.Column('batch_id', ID, nullable=False),
    sa.Column('seq', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('payload', JSONDOC, nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('lease_until', sa.DateTime(timezone=True), nullable=True),
    sa.Column('worker', sa.String(length=200), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('id', ID, nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=NOW, nullable=False),
    sa.CheckConstraint("status IN ('queued', 'running', 'done', 'failed', 'cancelled')", name=op.f('ck_jobs_status')),
    sa.ForeignKeyConstraint(['batch_id'], ['batches.id'], name=op.f('fk_jobs_batch_id_batches'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_jobs')),
    sa.UniqueConstraint('batch_id', 'seq', name=op.f('uq_jobs_batch_id_seq'))
    )
    op.create_index(op.f('ix_jobs_batch_id'), 'jobs', ['batch_id'], unique=False)
    op.create_index(op.f('ix_jobs_status_lease_until'), 'jobs', ['status', 'lease_until'], unique=False)
    op.create_table('problems',
    sa.Column('batch_id', ID, nullable=False),
    sa.Column('dataset', sa.String(length=100), nullable=False),
    sa.Column('lang', sa.String(length=32), nullable=False),
    sa.Column('index', sa.Integer(), nullable=False),
    sa.Column('question', sa.Text(), nullable=False),
    sa.Column('reference', JSONDOC, nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('meta', JSONDOC, nullable=False),
    sa.Column('id', ID, nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=NOW, nullable=False),
    sa.ForeignKeyConstraint(['batch_id'], ['batches.id'], name=op.f('fk_problems_batch_id_batches'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_problems')),
    sa.UniqueConstraint('batch_id', 'dataset', 'lang', 'index', name=op.f('uq_problems_batch_id_dataset_lang_index'))
    )
    op.create_index(op.f('ix_problems_batch_id'), 'problems', ['batch_id'], unique=False)
    op.create_index(op.f('ix_problems_dataset_lang_index'), 'problems', ['dataset', 'lang', 'index'], unique=False)
    op.create_table('searches',
    sa.Column('batch_id', ID, nullable=False),
    sa.Column('job_id', ID, nullable=True),
    sa.Column('problem_id', ID, nullable=False),
    sa.Column('model_id', ID, nullable=True),
    sa.Column('dataset', sa.String(length=100), nullable=False),
    sa.Column('lang', sa.String(length=32), nullable=False),
    sa.Column('strategy', sa.String(length=16), nullable=False),
    sa.Column('action', sa.String(length=32), nullable=False),
    sa.Column('label', sa.String(length=100), nullable=False),
    sa.Column('config', JSONDOC, nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('final_answer', sa.Text(), nullable=True),
    sa.Column('final_node_id', ID, nullable=True),
    sa.Column('correct', sa.Boolean(), nullable=True),
    sa.Column('score', sa.Float(), nullable=True),
    sa.Column('confidence', sa.Float(), nullable=True),
    sa.Column('tokens', sa.Integer(), nullable=False),
    sa.Column('rounds', sa.Integer(), nullable=False),
    sa.Column('elapsed_s', sa.Float(), nullable=False),
    sa.Column('chosen_path', JSONDOC, nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('id', ID, nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=NOW, nullable=False),
    sa.CheckConstraint("status IN ('pending', 'running', 'done', 'failed', 'cancelled')", name=op.f('ck_searches_status')),
    sa.ForeignKeyConstraint(['batch_id'], ['batches.id'], name=op.f('fk_searches_batch_id_batches'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_searches_job_id_jobs'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_searches_model_id_models')),
    sa.ForeignKeyConstraint(['problem_id'], ['problems.id'], name=op.f('fk_searches_problem_id_problems'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_searches'))
    )
    op.create_index(op.f('ix_searches_batch_id'), 'searches', ['batch_id'], unique=False)
    op.create_index(op.f('ix_searches_batch_id_label_lang'), 'searches', ['batch_id', 'label', 'lang'], unique=False)
    op.create_index(op.f('ix_searches_dataset_lang_strategy'), 'searches', ['dataset', 'lang', 'strategy'], unique=False)
    op.create_index(op.f('ix_searches_job_id'), 'searches', ['job_id'], unique=False)
    op.create_index(op.f('ix_searches_problem_id'), 'searches', ['problem_id'], unique=False)
    op.create_index(op.f('ix_searches_strategy_correct'), 'searches', ['strategy', 'correct'], unique=False)
    op.create_table('nodes',
    sa.Column('search_id', ID, nullable=False),
    sa.Column('parent_id', ID, nullable=True),
    sa.Column('seq', sa.Integer(), nullable=False),
    sa.Column('round', sa.Integer(), nullable=False),
    sa.Column('sibling_index', sa.Integer(), nullable=False),
    sa.Column('depth', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('text', sa.Text(), nullable=False),
    sa.Column('token_ids', sa.JSON().with_variant(postgresql.ARRAY(sa.Integer()), 'postgresql'), nullable=False),
    sa.Column('confidences', sa.JSON().with_variant(postgresql.ARRAY(postgresql.DOUBLE_PRECISION()), 'postgresql'), nullable=False),
    sa.Column('num_tokens', sa.Integer(), nullable=False),
    sa.Column('mean_confidence', sa.Float(), nullable=True),
    sa.Column('value', sa.Float(), nullable=True),
    sa.Column('value_sum', sa.Float(), nullable=False),
    sa.Column('visits', sa.Integer(), nullable=False),
    sa.Column('terminal', sa.Boolean(), nullable=False),
    sa.Column('answer', sa.Text(), nullable=True),
    sa.Column('finish_reason', sa.String(length=16), nullable=True),
    sa.Column('id', ID, nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=NOW, nullable=False),
    sa.CheckConstraint("kind IN ('root', 'step', 'ministep', 'rollout', 'reflection', 'answer')", name=op.f('ck_nodes_kind')),
    sa.ForeignKeyConstraint(['search_id'], ['searches.id'], name=op.f('fk_nodes_search_id_searches'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_nodes'))
    )
    op.create_index(op.f('ix_nodes_parent_id'), 'nodes', ['parent_id'], unique=False)
    op.create_index(op.f('ix_nodes_search_id_seq'), 'nodes', ['search_id', 'seq'], unique=False)


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_index(op.f('ix_nodes_search_id_seq'), table_name='nodes')
    op.drop_index(op.f('ix_nodes_parent_id'), table_name='nodes')
    op.drop_table('nodes')
    op.drop_index(op.f('ix_searches_strategy_correct'), table_name='searches')
    op.drop_index(op.f('ix_searches_problem_id'), table_name='searches')
    op.drop_index(op.f('ix_searches_job_id'), table_name='searches')
    op.drop_index(op.f('ix_searches_dataset_lang_strategy'), table_name='searches')
    op.drop_index(op.f('ix_searches_batch_id_label_lang'), table_name='searches')
    op.drop_index(op.f('ix_searches_batch_id'), table_name='searches')
    op.drop_table('searches')
    op.drop_index(op.f('ix_problems_dataset_lang_index'), table_name='problems')
    op.drop_index(op.f('ix_problems_batch_id'), table_name='problems')
    op.drop_table('problems')
    op.drop_index(op.f('ix_jobs_status_lease_until'), table_name='jobs')
    op.drop_index(op.f('ix_jobs_batch_id'), table_name='jobs')
    op.drop_table('jobs')
    op.drop_index(op.f('ix_batches_status_priority'), table_name='batches')
    op.drop_index(op.f('ix_batches_model_id'), table_name='batches')
    op.drop_index(op.f('ix_batches_dataset'), table_name='batches')
    op.drop_table('batches')
    op.drop_table('models')
