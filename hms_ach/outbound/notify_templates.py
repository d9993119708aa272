"""Notification templates (``kind: notification`` files of mappings/notifications/): loading them,
rendering one in Jinja2's sandbox, and running their golden ``examples``.

The subject and text body render with autoescape off (they are plain text); the html body renders in
a second sandbox with autoescape on, so a value such as ``<b>`` arrives as text, never as markup. An
undefined name is an error (``StrictUndefined``): a typo in a template fails its examples in CI
instead of sending an empty sentence.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import StrictUndefined, TemplateError
from jinja2.sandbox import SandboxedEnvironment

from hms_ach.core.errors import ConfigError, ConfigErrors, SourcePosition
from hms_ach.mapping.loader import load_mappings
from hms_ach.mapping.spec import NotificationMapping

_TEXT = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=False)
_HTML = SandboxedEnvironment(undefined=StrictUndefined, autoescape=True, keep_trailing_newline=False)


class RenderError(Exception):
    """A template failed on the facts it was given (an undefined name, a bad filter call)."""


@dataclass(frozen=True)
class Rendered:
    """One message to one recipient."""

    subject: str
    text: str
    html: str | None


@dataclass(frozen=True)
class Notification:
    """A loaded notification file: its model and where it came from."""

    path: Path
    model: NotificationMapping

    @property
    def name(self) -> str:
        return self.model.name or self.path.stem


def load_notifications(folder: Path | str) -> dict[str, Notification]:
    """Every ``kind: notification`` file under ``folder`` by event name; errors name ``file:line:col``."""
    root = Path(folder)
    if not root.is_dir():
        raise ConfigErrors(
            [
                ConfigError(
                    f"notification template folder {str(root)!r} does not exist",
                    SourcePosition(str(root)),
                    "a folder of kind: notification YAML files (mappings/notifications)",
                )
            ]
        )
    mset = load_mappings(root)  # every file checked as `hms-ach check` checks it (file:line:col)
    found: dict[str, Notification] = {}
    errors: list[ConfigError] = []
    for loaded in sorted(mset.notifications.values(), key=lambda f: f.path):
        model = loaded.model
        assert isinstance(model, NotificationMapping)  # the loader's notification bucket
        if model.event in found:
            errors.append(
                ConfigError(
                    f"event {model.event!r} already has a notification in {found[model.event].path.name}",
                    SourcePosition(str(loaded.path)),
                    "one notification file per event",
                )
            )
            continue
        found[model.event] = Notification(loaded.path, model)
    if errors:
        raise ConfigErrors(errors)
    return found


def context(
    event: str,
    payload: dict[str, Any],
    employee: dict[str, Any] | None = None,
    recipient: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The names a template sees: ``event``, ``payload``, ``employee`` and ``recipient``."""
    return {
        "event": event,
        "payload": payload,
        "employee": employee or {"name": "", "given": "", "family": "", "reference": ""},
        "recipient": recipient or {"name": "", "rule": ""},
    }


def render(notification: NotificationMapping, facts: dict[str, Any]) -> Rendered:
    """Render the subject (first line only), text and html of ``notification`` over ``facts``."""
    try:
        subject = _TEXT.from_string(notification.subject).render(facts).strip().splitlines()
        text = _TEXT.from_string(notification.text).render(facts)
        html = _HTML.from_string(notification.html).render(facts) if notification.html else None
    except TemplateError as exc:
        raise RenderError(f"{type(exc).__name__}: {exc.message}") from exc
    return Rendered(subject[0] if subject else "", text, html)


def run_examples(notification: Notification) -> list[str]:
    """The golden cases of one notification; a problem per failing case (empty: all passed)."""
    problems: list[str] = []
    model = notification.model
    for case in model.examples:
        payload = {k: v for k, v in case.payload.items() if k != "employee"}
        employee = case.payload.get("employee")
        facts = context(model.event, payload, employee if isinstance(employee, dict) else None)
        where = f"{notification.path}::{case.name}"
        try:
            out = render(model, facts)
        except RenderError as exc:
            problems.append(f"{where}: {exc}")
            continue
        if case.subject is not None and out.subject != case.subject:
            problems.append(f"{where}: subject {out.subject!r}, expected {case.subject!r}")
        problems += [
            f"{where}: text body lacks {piece!r}" for piece in case.text_contains if piece not in out.text
        ]
        html = out.html or ""
        problems += [
            f"{where}: html body lacks {piece!r}" for piece in case.html_contains if piece not in html
        ]
    return problems
