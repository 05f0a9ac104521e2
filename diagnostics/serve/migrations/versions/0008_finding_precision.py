"""The precision each finding was scored in.

`findings.precision`: "int8" or "fp32", the model file that made the finding (the clinic runs a
model version's int8 twin where its accuracy gate passed and the CPU has VNNI or AMX). Rows
stored before keep NULL: not recorded (they were all fp32).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-08
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("findings", sa.Column("precision", sa.String(8), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("findings") as batch:
        batch.drop_column("precision")
