"""The outbox of DICOM results (SRs, heatmap secondary captures) bound for clinics' PACS."""

from __future__ import annotations

from diagnostics.serve.store.audit import AuditMixin


class OutboxMixin(AuditMixin):
    pass
