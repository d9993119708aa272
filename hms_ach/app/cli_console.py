"""``hms-ach console``: print a one-time sign-in link to the web console (docs/console.md).

The link carries a short-lived token of the engine's local issuer (``auth.mode: local``) for the
console's login client; the engine accepts it once and answers with a session cookie."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hms_ach.app.cli_common import ConfigOpt, load_or_exit
from hms_ach.app.config import Config
from hms_ach.app.runtime import auth_settings
from hms_ach.auth.local_issuer import (
    KeyFileError,
    TokenRequest,
    issue_token,
    load_or_create_key,
    split_values,
)
from hms_ach.console.roles import CONSOLE_ROLES
from hms_ach.console.session import LOGIN_CLIENT_ID, LOGIN_TTL_SECONDS
from hms_ach.core.errors import ConfigError


def console_command(
    role: Annotated[
        list[str] | None,
        typer.Option("--role", help="a console role (repeatable): operator, analyst, auditor"),
    ] = None,
    sub: Annotated[str, typer.Option("--sub", help="who signs in (the audit trail names them)")] = "",
    url: Annotated[
        str | None, typer.Option("--url", help="the engine's base URL (default: from the http: section)")
    ] = None,
    config: ConfigOpt = Path("channels.yaml"),
) -> None:
    """Print a one-time link that signs in to the web console at /console (valid 5 minutes)."""
    cfg = load_or_exit(config)
    try:  # the environment overrides, and off mode only on loopback, as hms-ach run checks them
        settings = auth_settings(cfg)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc), param_hint="--config") from exc
    base = (url or _base_url(cfg)).rstrip("/")
    if settings.mode == "off":
        typer.echo(f"{base}/console/login  (auth mode off: no token needed)")
        return
    if settings.mode != "local":
        typer.echo(
            f"auth mode is {settings.mode}: sign in at the OpenID provider by opening {base}/console/login "
            "(the one-time link is for auth.mode local)",
            err=True,
        )
        raise typer.Exit(2)
    roles = split_values(role or ["operator"])
    unknown = [r for r in roles if r not in CONSOLE_ROLES]
    if unknown:
        raise typer.BadParameter(
            f"unknown console role {', '.join(unknown)}; one of {', '.join(CONSOLE_ROLES)}",
            param_hint="--role",
        )
    request = TokenRequest(
        scope="",
        sub=sub or _os_user(),
        roles=roles,
        ttl_seconds=min(LOGIN_TTL_SECONDS, settings.local_max_token_ttl_seconds),
        client_id=LOGIN_CLIENT_ID,
    )
    try:  # the signing key is created in the data directory on first use, as by hms-ach token
        token = issue_token(settings, load_or_create_key(cfg.data_dir), request)
    except KeyFileError as exc:
        typer.echo(f"cannot sign the login link: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(f"{base}/console/login?token={token}")


def _base_url(cfg: Config) -> str:
    """The URL a browser on this machine reaches the engine at: the bind address, or loopback."""
    http = cfg.http
    host = str(http.host).strip("[]")
    if host in ("0.0.0.0", "::", "*", ""):
        host = "127.0.0.1"
    elif ":" in host:
        host = f"[{host}]"
    scheme = "https" if http.tls_files() else "http"
    return f"{scheme}://{host}:{http.port}"


def _os_user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name known: a neutral subject
        return "console-user"
