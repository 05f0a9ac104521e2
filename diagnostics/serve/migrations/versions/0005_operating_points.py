"""The operating point each finding was judged by.

`findings` gains the temperature, how the threshold was chosen (`threshold_policy`), the
sensitivity and specificity it gave where it was chosen, and where it came from
(`operating_point_source`: `model`, the file's own validation split, or `site_profile`). The
review page explains a finding with these, never with whichever model serves today. Rows stored
before keep NULL here (`operating_point_source` NULL: not recorded); the review page says so.
The preprocessing a study went through is kept in `studies.result` (JSON), which needs no
change of schema.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

COLUMNS = (
    ("temperature", sa.Float()),
    ("threshold_policy", sa.String(64)),
    ("threshold_sensitivity", sa.Float()),
    ("threshold_specificity", sa.Float()),
    ("operating_point_source", sa.String(16)),
)


def upgrade() -> None:
    with op.batch_alter_table("findings") as batch:
        for name, kind in COLUMNS:
            batch.add_column(sa.Column(name, kind, nullable=True))


def downgrade() -> None:
    # Drops what findings recorded about their operating points; their thresholds stay.
    with op.batch_alter_table("findings") as batch:
        for name, _ in reversed(COLUMNS):
            batch.drop_column(name)
