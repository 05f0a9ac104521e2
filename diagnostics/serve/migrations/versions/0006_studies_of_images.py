"""Studies of several images, and the outbox of DICOM results.

- `instances`: one row per image, de-duplicated per clinic by content and SOP Instance UID.
  Every existing study gets one instance, made from its own columns, with its stored result.
- `studies` gains the Study Instance UID that groups images, the source (http, dicom, stow),
  the calling AE title, when its newest image arrived, and how many it has.
- `findings.images`: each image's part in a study-level finding.
- `outbox`: the SRs and secondary captures bound for a clinic's PACS, with their send state.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

import uuid

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    # Plain ADD COLUMN and an index: no table rebuild (SQLite would have to drop `studies`,
    # which jobs and findings refer to). One study per Study Instance UID is kept by the
    # store's write (SQLite: the write lock; PostgreSQL: an advisory lock on the UID).
    op.add_column("studies", sa.Column("study_instance_uid", sa.String(128), nullable=True))
    op.add_column(
        "studies", sa.Column("source", sa.String(8), nullable=False, server_default="http")
    )
    op.add_column("studies", sa.Column("calling_ae", sa.String(16), nullable=True))
    op.add_column("studies", sa.Column("last_instance_at", TZ, nullable=True))
    op.add_column(
        "studies",
        sa.Column("instance_count", sa.Integer(), nullable=False, server_default="1"),
    )
    op.create_index("ix_studies_study_uid", "studies", ["clinic_id", "study_instance_uid"])
    op.add_column("findings", sa.Column("images", sa.JSON(), nullable=True))
    instances = op.create_table(
        "instances",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("study_id", sa.String(32), sa.ForeignKey("studies.id"), nullable=False),
        sa.Column("clinic_id", sa.String(64), sa.ForeignKey("clinics.id"), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("code", sa.String(64), nullable=True),
        sa.Column("content_sha256", sa.String(64), nullable=False),
        sa.Column("size_bytes", sa.Integer(), nullable=False),
        sa.Column("format", sa.String(16), nullable=False),
        sa.Column("original_filename", sa.String(255), nullable=False),
        sa.Column("sop_instance_uid", sa.String(128), nullable=True),
        sa.Column("sop_class_uid", sa.String(64), nullable=True),
        sa.Column("series_instance_uid", sa.String(128), nullable=True),
        sa.Column("view", sa.String(16), nullable=True),
        sa.Column("source", sa.String(8), nullable=False),
        sa.Column("result", sa.JSON(), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.UniqueConstraint("clinic_id", "content_sha256", name="uq_instance_content"),
        sa.UniqueConstraint("clinic_id", "sop_instance_uid", name="uq_instance_sop_uid"),
    )
    op.create_index("ix_instances_study", "instances", ["study_id", "position"])
    op.create_table(
        "outbox",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("study_id", sa.String(32), sa.ForeignKey("studies.id"), nullable=False),
        sa.Column("clinic_id", sa.String(64), sa.ForeignKey("clinics.id"), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("route", sa.String(8), nullable=False),
        sa.Column("sop_instance_uid", sa.String(128), nullable=False),
        sa.Column("file", sa.String(255), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", TZ, nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("sent_at", TZ, nullable=True),
        sa.UniqueConstraint("study_id", "kind", "key", "route", name="uq_outbox_object"),
    )
    op.create_index("ix_outbox_study_id", "outbox", ["study_id"])
    op.create_index("ix_outbox_due", "outbox", ["state", "next_attempt_at"])

    # every study so far is one image: make that image its instance, with its outcome
    studies = sa.table(
        "studies",
        sa.column("id", sa.String),
        sa.column("clinic_id", sa.String),
        sa.column("status", sa.String),
        sa.column("content_sha256", sa.String),
        sa.column("size_bytes", sa.Integer),
        sa.column("format", sa.String),
        sa.column("original_filename", sa.String),
        sa.column("sop_instance_uid", sa.String),
        sa.column("result", sa.JSON),
        sa.column("created_at", TZ),
    )
    conn = op.get_bind()
    rows = conn.execute(sa.select(studies)).mappings().all()
    state = {"scored": "scored", "failed_qc": "failed_qc", "failed": "failed"}
    op.bulk_insert(
        instances,
        [
            {
                "id": uuid.uuid4().hex,
                "study_id": r["id"],
                "clinic_id": r["clinic_id"],
                "position": 1,
                "status": state.get(r["status"], "received"),
                "code": (r["result"] or {}).get("code"),
                "content_sha256": r["content_sha256"],
                "size_bytes": r["size_bytes"],
                "format": r["format"],
                "original_filename": r["original_filename"] or "",
                "sop_instance_uid": r["sop_instance_uid"],
                "sop_class_uid": None,
                "series_instance_uid": None,
                "view": None,
                "source": "http",
                "result": r["result"] or {},
                "created_at": r["created_at"],
            }
            for r in rows
        ],
    )


def downgrade() -> None:
    # Drops the images beyond each study's first, and the outbox (the files stay on disk).
    op.drop_index("ix_outbox_due", table_name="outbox")
    op.drop_index("ix_outbox_study_id", table_name="outbox")
    op.drop_table("outbox")
    op.drop_index("ix_instances_study", table_name="instances")
    op.drop_table("instances")
    op.drop_column("findings", "images")
    op.drop_index("ix_studies_study_uid", table_name="studies")
    for name in (
        "instance_count",
        "last_instance_at",
        "calling_ae",
        "source",
        "study_instance_uid",
    ):
        op.drop_column("studies", name)
