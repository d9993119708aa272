"""The pure parts of the case flow API: If-Match, the comment JSON and the thread order."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from hms_ach.cases.flow_api import comment_json, comment_view, expected_version, threaded
from hms_ach.workforce.api import Problem


def test_if_match_names_one_version() -> None:
    assert expected_version(None) is None
    assert expected_version('W/"3"') == 3 and expected_version('"12"') == 12
    for bad in ("3", 'W/"x"', "*", 'W/"1", W/"2"'):
        with pytest.raises(Problem) as caught:
            expected_version(bad)
        assert caught.value.status == 400 and caught.value.errors[0]["location"] == "header.If-Match"


def _comment(cid: str, sent: str, reply_to: str | None = None) -> dict[str, Any]:
    task = {"id": "t1", "for": {"reference": "Patient/p1"}}
    moment = datetime.fromisoformat(sent).replace(tzinfo=UTC)
    return {"id": cid, **comment_json(task, f"text {cid}", reply_to, "d1", moment)}


def test_a_comment_is_a_communication_about_the_task() -> None:
    comm = _comment("c2", "2026-12-06T10:00:00", reply_to="c1")
    assert comm["about"] == [{"reference": "Task/t1"}] and comm["partOf"] == [
        {"reference": "Communication/c1"}
    ]
    assert comm["subject"] == {"reference": "Patient/p1"} and comm["sender"] == {
        "reference": "Practitioner/d1"
    }
    assert comm["payload"] == [{"contentString": "text c2"}] and comm["status"] == "completed"
    assert comment_view(comm) == {
        "id": "c2",
        "version": 0,
        "text": "text c2",
        "sender": "Practitioner/d1",
        "sent": "2026-12-06T10:00:00Z",
        "reply_to": "c1",
    }
    plain = comment_json({"id": "t2", "for": {"reference": "Group/g"}}, "x", None, None, datetime.now(UTC))
    assert "subject" not in plain and "sender" not in plain and "partOf" not in plain


def test_threads_in_order_with_replies_under_their_comment() -> None:
    comments = [
        _comment("b", "2026-12-06T10:05:00"),
        _comment("a1", "2026-12-06T10:02:00", reply_to="a"),
        _comment("a", "2026-12-06T10:00:00"),
        _comment("a2", "2026-12-06T10:01:00", reply_to="a"),
        _comment("a1x", "2026-12-06T10:03:00", reply_to="a1"),
        _comment("orphan", "2026-12-06T10:04:00", reply_to="gone"),  # its comment is not here
    ]
    order = [(c["id"], c["depth"]) for c in threaded(comments)]
    assert order == [("a", 0), ("a2", 1), ("a1", 1), ("a1x", 2), ("orphan", 0), ("b", 0)]
    looped = [
        _comment("x", "2026-12-06T10:00:00", reply_to="y"),
        _comment("y", "2026-12-06T10:01:00", reply_to="x"),
    ]
    # a loop of replies (written over FHIR) is listed once, from its earliest comment
    assert [(c["id"], c["depth"]) for c in threaded(looped)] == [("x", 0), ("y", 1)]
