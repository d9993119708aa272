"""The notification templates of mappings/notifications/: their golden examples pass, a broken one is
refused with file:line, html bodies are autoescaped, `hms-ach notify preview` renders a sample, and
the notify sink's settings refuse what cannot work."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from hms_ach.app.cli import app
from hms_ach.core.errors import ConfigErrors
from hms_ach.outbound.notify import NotifySink, render_body
from hms_ach.outbound.notify_templates import load_notifications, run_examples

ROOT = Path(__file__).resolve().parents[3]
TEMPLATES = ROOT / "mappings" / "notifications"


def test_every_shipped_notification_passes_its_examples() -> None:
    notes = load_notifications(TEMPLATES)
    assert {"credential.expiring", "credential.expired", "credential.escalated", "alert.firing"} <= set(notes)
    for note in notes.values():
        assert note.model.examples, f"{note.path.name} has no examples"
        assert run_examples(note) == []


def test_a_template_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "broken.yaml").write_text(
        "kind: notification\nevent: x.y\nsubject: ok\ntext: |\n  line one\n  {% if payload.a %}no end\n"
    )
    with pytest.raises(ConfigErrors) as exc:
        load_notifications(tmp_path)
    message = str(exc.value)
    assert "broken.yaml:4:" in message and "line 2 of the template" in message


def test_unknown_recipient_rules_and_two_files_for_one_event_are_refused(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(
        "kind: notification\nevent: x.y\nsubject: s\ntext: t\nrecipients: [boss]\n"
    )
    with pytest.raises(ConfigErrors, match="unknown recipient 'boss'"):
        load_notifications(tmp_path)
    (tmp_path / "a.yaml").write_text("kind: notification\nevent: x.y\nsubject: s\ntext: t\n")
    (tmp_path / "b.yaml").write_text("kind: notification\nevent: x.y\nsubject: s\ntext: t\n")
    with pytest.raises(ConfigErrors, match="already has a notification in a.yaml"):
        load_notifications(tmp_path)


def test_a_failing_example_is_reported(tmp_path: Path) -> None:
    (tmp_path / "n.yaml").write_text(
        "kind: notification\nevent: x.y\nsubject: 'Hi {{ payload.name }}'\ntext: '{{ payload.nope }}'\n"
        "examples:\n  - {name: wrong subject, payload: {name: A, nope: 1}, subject: Hi B}\n"
        "  - {name: undefined, payload: {name: A}}\n"
    )
    problems = run_examples(load_notifications(tmp_path)["x.y"])
    assert problems[0].endswith("wrong subject: subject 'Hi A', expected 'Hi B'")
    assert "undefined: UndefinedError" in problems[1]


def test_notify_preview_and_test_commands(tmp_path: Path) -> None:
    sample = tmp_path / "sample.json"
    sample.write_text(
        '{"practitioner": "Practitioner/1", "credential": "RN-1", "type": "RN", "issuer": null,'
        ' "expires": "2027-01-31", "days_left": 7, "employee": {"name": "Maria Lopez"}}'
    )
    runner = CliRunner()
    args = [
        "notify",
        "preview",
        "credential.expiring",
        "--sample",
        str(sample),
        "--templates",
        str(TEMPLATES),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "Subject: Your RN RN-1 expires in 7 days" in result.output and "Dear Maria Lopez," in result.output
    missing = runner.invoke(app, [*args[:2], "nope.event", *args[3:]])
    assert missing.exit_code == 2 and "no notification template for 'nope.event'" in missing.output
    tested = runner.invoke(app, ["notify", "test", "--templates", str(TEMPLATES)])
    assert tested.exit_code == 0 and "0 problem(s)" in tested.output


def test_sink_settings_refuse_what_cannot_work() -> None:
    base = {"name": "n", "type": "notify", "templates_dir": str(TEMPLATES)}
    with pytest.raises(ValidationError, match="needs `url:`"):
        NotifySink.Config(**base, channel="http")
    with pytest.raises(ValidationError, match="in clear"):
        NotifySink.Config(
            **base,
            channel="email",
            smtp_host="mail.example.org",
            smtp_security="none",
            smtp_username="u",
            smtp_password="p",
        )
    with pytest.raises(ValidationError, match="go together"):
        NotifySink.Config(**base, channel="email", smtp_username="u")
    assert render_body('{"to": {{ to | tojson }}}', {"to": 'a"b'}) == b'{"to":"a\\"b"}'


def test_role_recipients_name_a_role_code(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(
        "kind: notification\nevent: x.y\nsubject: s\ntext: t\nrecipients: ['role:supervisor', notify_role]\n"
    )
    assert load_notifications(tmp_path)["x.y"].model.recipients == ["role:supervisor", "notify_role"]
    (tmp_path / "a.yaml").write_text(
        "kind: notification\nevent: x.y\nsubject: s\ntext: t\nrecipients: ['role:']\n"
    )
    with pytest.raises(ConfigErrors, match="unknown recipient 'role:'"):
        load_notifications(tmp_path)
