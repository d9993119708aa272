"""Writes of review cases for the tests of the audit log and the analytics: a job run by the engine's
writer as one stored request of a caller (its ``sub`` is the audit entries' actor), the way the
cases API writes."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import orjson

from hms_ach.app.runtime import Engine
from hms_ach.ingest import pipeline
from hms_ach.ingest.pipeline import Duplicate, Finish
from hms_ach.store import messages
from hms_ach.store.audit import actor_json
from hms_ach.store.port import Tx

T = TypeVar("T")


async def write_as(engine: Engine, sub: str, what: str, work: Callable[[Tx, int], T]) -> T:
    """Run ``work(tx, message_id)`` in the engine's writer as a request of the caller ``sub``."""
    meta = messages.MessageMeta(
        channel="api",
        raw=orjson.dumps({"test": what}),
        content_type="json",
        message_type=what,
        control_id=str(uuid.uuid4()),
        actor=actor_json(kind="http", sub=sub, roles=["test"]),
    )

    def job(tx: Tx) -> T:
        def stored(tx: Tx, message_id: int) -> tuple[T, Finish]:
            return work(tx, message_id), Finish("processed", "200", None)

        result = pipeline.commit(tx, meta, stored)
        if isinstance(result, Duplicate):
            raise AssertionError("an unkeyed request was answered as a duplicate")
        return result

    return await engine.pipeline.writer.run(job)


def reviewer_role(number: str, practitioner_id: str) -> dict[str, Any]:
    """A PractitionerRole giving ``Practitioner/practitioner_id`` the case role ``reviewer``."""
    return {
        "resourceType": "PractitionerRole",
        "identifier": [{"system": "urn:hms-ach:id:role", "value": f"{number}-reviewer"}],
        "active": True,
        "practitioner": {"reference": f"Practitioner/{practitioner_id}"},
        "code": [{"coding": [{"system": "urn:hms-ach:code:case-role", "code": "reviewer"}]}],
    }
