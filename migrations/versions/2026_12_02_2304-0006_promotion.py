"""promotion: job leases, steps and progress; deployments' routing fields; the routing epoch

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('gateway_replicas',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('epoch', sa.BigInteger(), nullable=False),
    sa.Column('seen_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_gateway_replicas'))
    )
    op.create_table('routing_epoch',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('epoch', sa.BigInteger(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_routing_epoch'))
    )
    with op.batch_alter_table('deployments', schema=None) as batch_op:
        batch_op.add_column(sa.Column('job_id', sa.Uuid(), nullable=True))
        batch_op.add_column(sa.Column('active', sa.Boolean(), server_default=sa.false(), nullable=False))
        batch_op.add_column(sa.Column('served_model_name', sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column('quantization', sa.String(length=16), server_default='none', nullable=False))
        batch_op.add_column(sa.Column('tensor_parallel_size', sa.Integer(), server_default='1', nullable=False))
        batch_op.add_column(sa.Column('handle', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('error', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('updated_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.create_foreign_key(batch_op.f('fk_deployments_job_id_jobs'), 'jobs', ['job_id'], ['id'], ondelete='SET NULL')

    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('step', sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column('progress', sa.Float(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('steps', sa.JSON(), server_default='[]', nullable=False))
        batch_op.add_column(sa.Column('log_tail', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('lease_owner', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('lease_until', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('attempts', sa.Integer(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('cancel_requested', sa.Boolean(), server_default=sa.false(), nullable=False))
        batch_op.add_column(sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index(batch_op.f('ix_jobs_state'), ['state'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_jobs_state'))
        batch_op.drop_column('finished_at')
        batch_op.drop_column('cancel_requested')
        batch_op.drop_column('attempts')
        batch_op.drop_column('lease_until')
        batch_op.drop_column('lease_owner')
        batch_op.drop_column('log_tail')
        batch_op.drop_column('steps')
        batch_op.drop_column('progress')
        batch_op.drop_column('step')

    with op.batch_alter_table('deployments', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('fk_deployments_job_id_jobs'), type_='foreignkey')
        batch_op.drop_column('updated_at')
        batch_op.drop_column('error')
        batch_op.drop_column('handle')
        batch_op.drop_column('tensor_parallel_size')
        batch_op.drop_column('quantization')
        batch_op.drop_column('served_model_name')
        batch_op.drop_column('active')
        batch_op.drop_column('job_id')

    op.drop_table('routing_epoch')
    op.drop_table('gateway_replicas')
