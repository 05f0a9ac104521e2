"""Per-site recalibration profiles, and the raw logit and profile of each finding.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "site_profiles",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("model_sha256", sa.String(64), nullable=False),
        sa.Column("site", sa.String(64), nullable=False),
        sa.Column("temperatures", sa.JSON(), nullable=False),
        sa.Column("thresholds", sa.JSON(), nullable=False),
        sa.Column("policy", sa.String(64), nullable=False),
        sa.Column("evidence", sa.JSON(), nullable=False),
        sa.Column("created_by", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_site_profiles_model_site", "site_profiles", ["model_sha256", "site"])
    with op.batch_alter_table("findings") as batch:
        batch.add_column(sa.Column("logit", sa.Float(), nullable=True))
        batch.add_column(sa.Column("profile_id", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("findings") as batch:
        batch.drop_column("profile_id")
        batch.drop_column("logit")
    op.drop_table("site_profiles")
