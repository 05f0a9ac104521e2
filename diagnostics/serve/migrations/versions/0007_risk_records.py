"""Risk at the clinic: clinical records scored by a risk model, and their confirmed outcomes.

- `risk_records`: one row per record sent to `POST /v1/risk/{model}` (JSON or FHIR), scored or
  refused with a code. The record itself is a blob; the row holds no patient data.
- `risk_outcomes`: the confirmed outcome a clinician records later (append-only).
- `site_profiles.intercepts`: a risk model's per-site recalibration is a slope (kept, as for
  images, as a temperature) and an intercept on the logit scale.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.add_column("site_profiles", sa.Column("intercepts", sa.JSON(), nullable=True))
    op.create_table(
        "risk_records",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("clinic_id", sa.String(64), sa.ForeignKey("clinics.id"), nullable=False),
        sa.Column("model", sa.String(64), nullable=False),
        sa.Column("label", sa.String(64), nullable=False),
        sa.Column("source", sa.String(8), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("content_sha256", sa.String(64), nullable=False),
        sa.Column("idempotency_key", sa.String(140), nullable=True),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("probability", sa.Float(), nullable=True),
        sa.Column("raw_probability", sa.Float(), nullable=True),
        sa.Column("category", sa.String(16), nullable=True),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("imputed", sa.JSON(), nullable=False),
        sa.Column("code", sa.String(64), nullable=True),
        sa.Column("reasons", sa.JSON(), nullable=False),
        sa.Column("model_name", sa.String(128), nullable=False),
        sa.Column("model_sha256", sa.String(64), nullable=False),
        sa.Column("model_version", sa.String(32), nullable=True),
        sa.Column("profile_id", sa.Integer(), nullable=True),
        sa.Column("created_at", TZ, nullable=False),
        sa.UniqueConstraint("clinic_id", "idempotency_key", name="uq_risk_idempotency"),
    )
    op.create_index("ix_risk_records_status", "risk_records", ["status"])
    op.create_index(
        "ix_risk_records_worklist", "risk_records", ["clinic_id", "model", "created_at"]
    )
    op.create_table(
        "risk_outcomes",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("record_id", sa.String(32), sa.ForeignKey("risk_records.id"), nullable=False),
        sa.Column("outcome", sa.Boolean(), nullable=True),
        sa.Column("reviewer", sa.String(32), nullable=False),
        sa.Column("note", sa.Text(), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
    )
    op.create_index("ix_risk_outcomes_record_id", "risk_outcomes", ["record_id"])


def downgrade() -> None:
    # Drops the risk records and their outcomes (the record blobs stay on disk).
    op.drop_index("ix_risk_outcomes_record_id", table_name="risk_outcomes")
    op.drop_table("risk_outcomes")
    op.drop_index("ix_risk_records_worklist", table_name="risk_records")
    op.drop_index("ix_risk_records_status", table_name="risk_records")
    op.drop_table("risk_records")
    with op.batch_alter_table("site_profiles") as batch:
        batch.drop_column("intercepts")
