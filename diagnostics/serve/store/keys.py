"""API keys and the clinics they belong to. Only a hash of a key is stored; the clear key is
shown once, when it is made."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import secrets

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from diagnostics.serve.store.audit import AuditMixin
from diagnostics.serve.store.tables import CLINIC_CODE, ROLES, ApiKey, Clinic, now


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> tuple[str, str]:
    """(prefix, full key). 32 random bytes: a plain sha256 suffices to store it."""
    prefix = secrets.token_hex(6)
    return prefix, f"dk_{prefix}_{secrets.token_urlsafe(32)}"


def _key_row(
    prefix: str,
    key: str,
    role: str,
    clinic: str | None,
    scope: list[str] | None,
    label: str,
    replaces: str | None,
) -> ApiKey:
    """A key row: only the hash of the key; the clinic for submitters, the scope for reviewers."""
    return ApiKey(
        id=f"key_{prefix}",
        prefix=prefix,
        key_hash=hash_key(key),
        role=role,
        clinic_id=clinic if role == "submitter" else None,
        scope=list(scope or []) if role == "reviewer" else [],
        label=label,
        replaces=replaces,
    )


class ClinicsMixin(AuditMixin):
    def ensure_clinic(self, clinic: str) -> None:
        """Create the clinic row if it is new; a concurrent creation is not an error."""
        with self.session() as s:
            if s.get(Clinic, clinic) is not None:
                return

        def tx(s: Session) -> None:
            if s.get(Clinic, clinic) is None:
                s.add(Clinic(id=clinic, name=clinic))

        with contextlib.suppress(IntegrityError):  # another request created it first
            self.write(tx)

    def clinics(self) -> list[str]:
        with self.session() as s:
            return list(s.scalars(select(Clinic.id).order_by(Clinic.id)))


class KeysMixin(ClinicsMixin):
    def create_key(
        self,
        role: str,
        *,
        clinic: str | None = None,
        scope: list[str] | None = None,
        label: str = "",
        actor: str = "cli",
        replaces: str | None = None,
    ) -> tuple[ApiKey, str]:
        """A new key; the clear key is returned once and never stored."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}")
        for cid in [clinic, *(scope or [])]:
            if cid is not None and not CLINIC_CODE.fullmatch(cid):
                raise ValueError(
                    f"clinic code {cid!r}: use 1-64 lower-case letters, digits, '.', '_' or '-'"
                )
        if role == "submitter" and not clinic:
            raise ValueError("a submitter key belongs to a clinic: give --clinic")
        if role == "reviewer" and not scope:
            raise ValueError("a reviewer key needs the clinics it may see: give --clinic")
        prefix, key = new_key()

        for cid in [clinic, *(scope or [])]:
            if cid:
                self.ensure_clinic(cid)

        def tx(s: Session) -> ApiKey:
            row = _key_row(prefix, key, role, clinic, scope, label, replaces)
            s.add(row)
            self.audit(s, actor, "key.create", "api_key", row.id, role=role, clinic=clinic)
            return row

        return self.write(tx), key

    def authenticate(self, key: str) -> ApiKey | None:
        parts = key.split("_")
        if len(parts) < 3 or parts[0] != "dk":
            return None
        with self.session() as s:
            row = s.scalar(select(ApiKey).where(ApiKey.prefix == parts[1]))
            if row is None or row.revoked_at is not None:
                return None
            if not hmac.compare_digest(row.key_hash, hash_key(key)):
                return None
            return row

    def list_keys(self) -> list[ApiKey]:
        with self.session() as s:
            return list(s.scalars(select(ApiKey).order_by(ApiKey.created_at)))

    def revoke_key(self, key_id: str, actor: str = "cli") -> ApiKey:
        def tx(s: Session) -> ApiKey:
            row = s.get(ApiKey, key_id)
            if row is None:
                raise KeyError(f"no key {key_id}")
            if row.revoked_at is None:
                row.revoked_at = now()
                self.audit(s, actor, "key.revoke", "api_key", key_id)
            return row

        return self.write(tx)

    def rotate_key(self, key_id: str, actor: str = "cli") -> tuple[ApiKey, str]:
        """A new key with the same role and clinics; the old one is revoked in the same
        transaction, so there is never a moment with both or neither valid."""
        prefix, key = new_key()

        def tx(s: Session) -> ApiKey:
            old = s.get(ApiKey, key_id)
            if old is None:
                raise KeyError(f"no key {key_id}")
            if old.revoked_at is not None:
                raise ValueError(f"{key_id} is revoked; create a new key instead")
            row = _key_row(prefix, key, old.role, old.clinic_id, old.scope, old.label, key_id)
            s.add(row)
            old.revoked_at = now()
            self.audit(s, actor, "key.create", "api_key", row.id, role=row.role, replaces=key_id)
            self.audit(s, actor, "key.revoke", "api_key", key_id, replaced_by=row.id)
            return row

        return self.write(tx), key
