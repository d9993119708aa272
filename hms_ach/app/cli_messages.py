"""``hms-ach messages``: the stored inbound messages, listed, or one shown whole (``messages show``).

The list fits the terminal (a rich table that folds the error column); ``--status`` takes only the
statuses a message can have. ``messages show ID`` prints the message's envelope, its error, its ACK
and the records it wrote; ``--raw``, ``--ack`` and ``--records`` print just that part (the raw
message with one segment per line, the ACK text, the record versions as JSON), for piping.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from hms_ach.app.cli_common import ConfigOpt, MessageStatus, parse_since, store_of

messages_app = typer.Typer(help="Stored inbound messages: list them, or show one (raw, ACK, records).")


@messages_app.callback(invoke_without_command=True)
def list_messages(
    ctx: typer.Context,
    config: ConfigOpt = Path("channels.yaml"),
    status: Annotated[MessageStatus | None, typer.Option(help="only messages with this status")] = None,
    type: Annotated[str | None, typer.Option("--type", help="message type, e.g. ADT^A01 or ADT")] = None,
    since: Annotated[str | None, typer.Option(help="ISO time or age (30m, 2h, 7d)")] = None,
    limit: Annotated[int, typer.Option(min=1, max=100_000, help="messages listed")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per line")] = False,
) -> None:
    """List stored inbound messages, newest first."""
    if ctx.invoked_subcommand is not None:
        return
    from hms_ach.store import messages as store_messages

    store = store_of(config)
    try:
        with store.read() as conn:
            rows = store_messages.list_messages(
                conn, status.value if status else None, type, parse_since(since), limit
            )
    finally:
        store.dispose()
    if as_json:
        for r in rows:
            typer.echo(json.dumps(dict(r._mapping), default=str))
        return
    table = Table(box=None, pad_edge=False, header_style="bold")
    table.add_column("id", justify="right", no_wrap=True)
    table.add_column("received (UTC)", no_wrap=True)
    table.add_column("channel", overflow="ellipsis", max_width=16)
    table.add_column("type", no_wrap=True)
    table.add_column("control id", overflow="ellipsis", max_width=24)
    table.add_column("status", no_wrap=True)
    table.add_column("ack", no_wrap=True)
    table.add_column("error", overflow="fold", ratio=1)
    for r in rows:
        received = r.received_at.strftime("%Y-%m-%d %H:%M:%S") if r.received_at else ""
        err = ((f"{r.error_location}: " if r.error_location else "") + r.error) if r.error else ""
        table.add_row(
            str(r.id), received, r.channel, r.message_type, r.control_id, r.status, r.ack_code or "", err
        )
    Console(soft_wrap=False).print(table)


@messages_app.command("show")
def show_message(
    message_id: Annotated[int, typer.Argument(help="the message's id (see hms-ach messages)")],
    config: ConfigOpt = Path("channels.yaml"),
    raw: Annotated[bool, typer.Option("--raw", help="only the raw message, one segment per line")] = False,
    ack: Annotated[bool, typer.Option("--ack", help="only the ACK sent (or the HTTP answer)")] = False,
    records: Annotated[
        bool, typer.Option("--records", help="only the record versions it wrote, as JSON")
    ] = False,
) -> None:
    """Show one stored message: envelope, error, ACK and the records it wrote."""
    from hms_ach.store import messages as store_messages

    if raw + ack + records > 1:
        raise typer.BadParameter("give at most one of --raw, --ack and --records")
    store = store_of(config)
    try:
        with store.read() as conn:
            row = store_messages.get(conn, message_id)
            written = store_messages.versions_written(conn, message_id) if row is not None else []
    finally:
        store.dispose()
    if row is None:
        typer.echo(f"no message with id {message_id}", err=True)
        raise typer.Exit(1)
    text = _segments(row.raw)
    ack_text = (row.ack or "").replace("\r", "\n").strip()
    if raw:
        typer.echo(text)
        return
    if ack:
        typer.echo(ack_text)
        return
    if records:
        for version in written:
            typer.echo(_record_json(version))
        return
    fields = [
        ("id", str(row.id)),
        ("channel", row.channel),
        ("received", str(row.received_at)),
        ("processed", str(row.processed_at or "")),
        ("type", row.message_type),
        ("control id", row.control_id),
        ("sender", "/".join(x for x in (row.sending_application, row.sending_facility) if x)),
        ("content type", row.content_type),
        ("status", row.status + (f" (duplicate of {row.duplicate_of})" if row.duplicate_of else "")),
        ("ACK code", row.ack_code or ""),
        ("replayed", str(row.replay_count)),
    ]
    if row.error:
        fields.append(("error", (f"{row.error_location}: " if row.error_location else "") + row.error))
    width = max(len(k) for k, _ in fields)
    for k, v in fields:
        typer.echo(f"{k:<{width}}  {v}")
    typer.echo(f"\n-- message ({len(row.raw)} bytes)\n{text}")
    typer.echo(f"\n-- ACK\n{ack_text or '(none)'}")
    typer.echo(f"\n-- records written ({len(written)})")
    for version in written:
        state = " (deleted)" if version["deleted"] else ""
        typer.echo(f"{version['resource_type']}/{version['id']} version {version['version_id']}{state}")


def _segments(raw: bytes) -> str:
    """The raw message for a terminal: one segment (or line) per line, undecodable bytes shown as
    replacement characters, control characters other than tab as ``\\xNN``."""
    text = raw.decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n")
    return "".join(c if c in "\n\t" or c.isprintable() else f"\\x{ord(c):02x}" for c in text).strip()


def _record_json(version: dict[str, Any]) -> str:
    resource: Any
    try:
        resource = json.loads(version["resource"])
    except (TypeError, ValueError):
        resource = version["resource"]
    return json.dumps(
        {
            "reference": f"{version['resource_type']}/{version['id']}",
            "version": version["version_id"],
            "deleted": bool(version["deleted"]),
            "resource": resource,
        }
    )
