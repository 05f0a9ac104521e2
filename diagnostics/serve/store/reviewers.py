"""Reviewer accounts: the clinicians who sign in to the review page (argon2 password hashes)."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy.orm import Session

from diagnostics.serve.store.audit import AuditMixin
from diagnostics.serve.store.tables import USERNAME, Reviewer


class ReviewersMixin(AuditMixin):
    def create_reviewer(
        self, username: str, password: str, *, role: str = "reviewer", scope: Sequence[str] = ()
    ) -> Reviewer:
        from argon2 import PasswordHasher

        if role not in ("reviewer", "admin"):
            raise ValueError("role is reviewer or admin")
        if not USERNAME.fullmatch(username):
            raise ValueError("user names are 2-26 lower-case letters, digits, '.', '_' or '-'")
        if role == "reviewer" and not scope:
            raise ValueError("a reviewer needs the clinics they may see")
        if len(password) < 10:
            raise ValueError("the password needs at least 10 characters")
        digest = PasswordHasher().hash(password)

        def tx(s: Session) -> Reviewer:
            if s.get(Reviewer, username) is not None:
                raise ValueError(f"user {username} exists")
            row = Reviewer(username=username, password_hash=digest, role=role, scope=list(scope))
            s.add(row)
            self.audit(s, "cli", "user.create", "user", username, role=role)
            return row

        return self.write(tx)

    def check_password(self, username: str, password: str) -> Reviewer | None:
        from argon2 import PasswordHasher
        from argon2.exceptions import InvalidHashError, VerificationError

        with self.session() as s:
            row = s.get(Reviewer, username)
        hasher = PasswordHasher()
        if row is None or row.disabled_at is not None:
            hasher.hash(password)  # the same work either way: no user enumeration by timing
            return None
        try:
            hasher.verify(row.password_hash, password)
        except (VerificationError, InvalidHashError):
            return None
        return row

    def get_reviewer(self, username: str) -> Reviewer | None:
        with self.session() as s:
            row = s.get(Reviewer, username)
        return row if row is not None and row.disabled_at is None else None
