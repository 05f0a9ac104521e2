"""Alembic environment for the clinic service store. Run through `store.migrate(engine)`, which
hands over an open connection; `alembic` on the command line is not needed."""

from __future__ import annotations

from alembic import context

from diagnostics.serve.store import Base

target_metadata = Base.metadata
connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through diagnostics.serve.store.migrate(engine)")
context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
