"""``hms-ach notify``: the notification templates of mappings/notifications/, previewed over a
sample payload (``notify preview EVENT --sample FILE``) or checked against their golden
``examples`` (``notify test``). Nothing is sent."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import orjson
import typer

from hms_ach.core.errors import ConfigError, ConfigErrors

notify_app = typer.Typer(no_args_is_help=True, help="Notification templates: preview and test them.")

TemplatesOpt = Annotated[
    Path,
    typer.Option("--templates", help="folder of the kind: notification files", exists=True, file_okay=False),
]


def _load(folder: Path) -> dict[str, Any]:
    from hms_ach.outbound.notify_templates import load_notifications

    try:
        return load_notifications(folder)
    except (ConfigError, ConfigErrors) as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from exc


def _sample(path: Path) -> dict[str, Any]:
    from hms_ach.mapping.loader import load_yaml

    try:
        data: Any = orjson.loads(path.read_bytes()) if path.suffix == ".json" else load_yaml(path)[0]
    except (OSError, orjson.JSONDecodeError, ConfigError, ConfigErrors) as exc:
        typer.echo(f"{path}: cannot read the sample: {exc} (expected a JSON or YAML payload)", err=True)
        raise typer.Exit(2) from exc
    if not isinstance(data, dict):
        typer.echo(
            f"{path}: the sample is a {type(data).__name__}, expected a mapping (the payload)", err=True
        )
        raise typer.Exit(2)
    return data


@notify_app.command("preview")
def preview(
    event: Annotated[str, typer.Argument(help="the event, e.g. credential.expiring")],
    sample: Annotated[
        Path, typer.Option(help="JSON or YAML event payload (employee: and recipient: optional)", exists=True)
    ],
    templates: TemplatesOpt = Path("mappings/notifications"),
) -> None:
    """Render the notification of EVENT over a sample payload and print subject, text and html."""
    from hms_ach.outbound.notify_templates import RenderError, context, render

    found = _load(templates).get(event)
    if found is None:
        typer.echo(f"no notification template for {event!r} in {templates}", err=True)
        raise typer.Exit(2)
    payload = _sample(sample)
    employee, recipient = payload.pop("employee", None), payload.pop("recipient", None)
    try:
        out = render(found.model, context(event, payload, employee, recipient))
    except RenderError as exc:
        typer.echo(f"{found.path}: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"To:      {', '.join(found.model.recipients)}\nSubject: {out.subject}\n\n{out.text}")
    if out.html is not None:
        typer.echo(f"--- html ---\n{out.html}")


@notify_app.command("test")
def test(templates: TemplatesOpt = Path("mappings/notifications")) -> None:
    """Run the golden examples of every notification template."""
    from hms_ach.outbound.notify_templates import run_examples

    failed = passed = 0
    for note in _load(templates).values():
        problems = run_examples(note)
        for problem in problems:
            typer.echo(f"FAIL {problem}")
        failed += len(problems)
        passed += len(note.model.examples) - len({p.split(": ", 1)[0] for p in problems})
    typer.echo(f"{passed} passed, {failed} problem(s)")
    raise typer.Exit(1 if failed else 0)
