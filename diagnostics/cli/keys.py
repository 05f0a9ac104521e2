"""`diagnostics keys` (API keys of the clinic service) and `users` (review-page accounts)."""

from __future__ import annotations

from typing import Annotated

import typer

from diagnostics.cli.common import (
    DEFAULT_SERVE_CONFIG,
    ServeConfigOption,
    _fail,
    _open_store,
    _serve_config,
)


def _check_key_id(key_id: str) -> None:
    if key_id.startswith("dk_"):  # never echo a secret back
        raise _fail("give the key ID (key_..., from `keys list`), not the key itself")


def keys_create(
    role: Annotated[str, typer.Option(help="submitter, reviewer or admin")],
    clinic: Annotated[
        list[str] | None,
        typer.Option(help="submitter: its clinic; reviewer: clinics it may see (repeatable)"),
    ] = None,
    label: Annotated[str, typer.Option(help="who holds the key, for people")] = "",
    config: ServeConfigOption = DEFAULT_SERVE_CONFIG,
) -> None:
    """Create an API key. The key is printed once; only its hash is stored."""
    clinics = clinic or []
    if role == "submitter" and len(clinics) != 1:
        raise _fail("a submitter key belongs to exactly one clinic: give one --clinic")
    if role == "admin" and clinics:
        raise _fail("an admin key sees every clinic: --clinic does not apply")
    store, _ = _open_store(_serve_config(config, None))
    try:
        row, key = store.create_key(
            role,
            clinic=clinics[0] if role == "submitter" else None,
            scope=clinics if role == "reviewer" else None,
            label=label,
        )
    except ValueError as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"{row.id}  role={row.role}  clinics={','.join(clinics) or 'all'}")
    typer.echo(key)
    typer.secho("Store this key now: it is not shown again.", err=True, fg="yellow")


def keys_list(config: ServeConfigOption = DEFAULT_SERVE_CONFIG) -> None:
    """Key IDs, roles, clinics and state (never the keys themselves)."""
    store, _ = _open_store(_serve_config(config, None))
    for k in store.list_keys():
        clinics = k.clinic_id or ",".join(k.scope or []) or "all"
        state = f"revoked {k.revoked_at:%Y-%m-%d}" if k.revoked_at else "active"
        typer.echo(f"{k.id}\t{k.role}\t{clinics}\t{state}\t{k.label}")


def keys_rotate(
    key_id: Annotated[str, typer.Argument(help="the key ID (key_...)")],
    config: ServeConfigOption = DEFAULT_SERVE_CONFIG,
) -> None:
    """Replace a key: a new key with the same role and clinics; the old one is revoked."""
    _check_key_id(key_id)
    store, _ = _open_store(_serve_config(config, None))
    try:
        row, key = store.rotate_key(key_id)
    except (KeyError, ValueError) as exc:
        raise _fail(str(exc).strip("'")) from None
    typer.echo(f"{row.id}  replaces {key_id} (revoked)")
    typer.echo(key)
    typer.secho("Store this key now: it is not shown again.", err=True, fg="yellow")


def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="the key ID (key_...)")],
    config: ServeConfigOption = DEFAULT_SERVE_CONFIG,
) -> None:
    """Revoke a key at once."""
    _check_key_id(key_id)
    store, _ = _open_store(_serve_config(config, None))
    try:
        store.revoke_key(key_id)
    except KeyError as exc:
        raise _fail(str(exc).strip("'")) from None
    typer.echo(f"{key_id} revoked")


def users_create(
    username: Annotated[str, typer.Argument(help="sign-in name")],
    role: Annotated[str, typer.Option(help="reviewer or admin")] = "reviewer",
    clinic: Annotated[
        list[str] | None, typer.Option(help="clinics a reviewer may see (repeatable)")
    ] = None,
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="read the password from standard input")
    ] = False,
    config: ServeConfigOption = DEFAULT_SERVE_CONFIG,
) -> None:
    """Create a review-page account. The password is asked for (or read from stdin) and
    stored as an argon2 hash."""
    import sys

    if password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = typer.prompt("password", hide_input=True, confirmation_prompt=True)
    store, _ = _open_store(_serve_config(config, None))
    try:
        store.create_reviewer(username, password, role=role, scope=clinic or [])
    except ValueError as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"user {username} ({role}) created")
