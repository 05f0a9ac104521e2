"""The intended population: findings without a call, a study's flag, a site's population limit.

- `findings.positive` may be NULL: the study was outside the model's intended population and
  the site scores such studies with a flag instead of refusing them; no call is made.
- `studies.flag`: why a scored study carries no call (`outside_intended_population`).
- `site_profiles.population_threshold`: a site's own threshold for the model's population check.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("findings") as batch:
        batch.alter_column("positive", existing_type=sa.Boolean(), nullable=True)
    with op.batch_alter_table("studies") as batch:
        batch.add_column(sa.Column("flag", sa.String(64), nullable=True))
    with op.batch_alter_table("site_profiles") as batch:
        batch.add_column(sa.Column("population_threshold", sa.Float(), nullable=True))


def downgrade() -> None:
    # A finding without a call cannot become a positive or negative one: refuse, and say so.
    bind = op.get_bind()
    if bind.execute(sa.text("SELECT COUNT(*) FROM findings WHERE positive IS NULL")).scalar():
        raise RuntimeError(
            "findings without a call (studies outside the population, flagged) exist; "
            "revision 0003 cannot hold them: downgrade refused"
        )
    with op.batch_alter_table("site_profiles") as batch:
        batch.drop_column("population_threshold")
    with op.batch_alter_table("studies") as batch:
        batch.drop_column("flag")
    with op.batch_alter_table("findings") as batch:
        batch.alter_column("positive", existing_type=sa.Boolean(), nullable=False)
