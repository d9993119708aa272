"""The FHIR write interactions as store work: validate, map, then one job in the group-commit writer.

Each request becomes a list of :class:`Operation` (one for create/update/delete, one per entry of a
Bundle). :func:`prepare` validates and maps an operation before it reaches the writer (pure, no
I/O): the R4B model from ``fhir.resources`` checks structure and data types, :func:`check_codes`
checks the required value-set bindings that model does not, and the FHIR mapping
(``mappings/messages/fhir_*.yaml``) turns the resource into a canonical record write.

:func:`request_job` is the writer job: it stores the request like an inbound message (raw body,
``fhir+json``), applies every operation inside a SAVEPOINT and records the outcome on the message
row. A transaction Bundle is all-or-nothing: the first failing entry rolls every entry back, and
only the message row (status ``error``) stays. Business keys are claimed with
``INSERT .. ON CONFLICT DO NOTHING`` so that concurrent conditional creates make one record.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl

import orjson
from sqlalchemy import Connection, and_, insert, select, update
from sqlalchemy.exc import IntegrityError

from hms_ach.core.errors import MessageError
from hms_ach.core.records import FHIR_WRITABLE, RecordWrite, merge_content
from hms_ach.core.references import references, rewrite_references
from hms_ach.fhir.outcomes import FhirError, operation_outcome
from hms_ach.mapping.engine import MappingEngine
from hms_ach.store import messages
from hms_ach.store.models import RECORD_TABLES, FhirRequestLine, SearchToken
from hms_ach.store.repository import Repository, new_id
from hms_ach.store.workforce_queries import shift_overlap

#: The resource types the FHIR REST channel writes. ``Basic`` carries what FHIR R4 has no resource
#: for (its code says which canonical record type): a ``shift`` becomes a Shift record.
WRITE_TYPES = (*FHIR_WRITABLE, "Basic")
BASIC_TYPE_SYSTEM = "urn:hms-ach:code:basic-type"
BASIC_RECORDS = {"shift": "Shift"}
_ID_RE = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_URN = "urn:uuid:"
REQUEST_LINES = FhirRequestLine.__table__  # type: ignore[attr-defined]

#: Required bindings fhir.resources does not enforce: resource type -> element -> allowed codes.
REQUIRED_CODES: dict[str, dict[str, frozenset[str]]] = {
    "Patient": {"gender": frozenset({"male", "female", "other", "unknown"})},
    "Practitioner": {"gender": frozenset({"male", "female", "other", "unknown"})},
    "Encounter": {
        "status": frozenset(
            {
                "planned",
                "arrived",
                "triaged",
                "in-progress",
                "onleave",
                "finished",
                "cancelled",
                "entered-in-error",
                "unknown",
            }
        )
    },
    "Location": {
        "status": frozenset({"active", "suspended", "inactive"}),
        "mode": frozenset({"instance", "kind"}),
    },
}
#: Encounter.class codes (v3 ActEncounterCode, the R4 extensible binding's codes we accept).
ENCOUNTER_CLASSES = frozenset(
    {"AMB", "EMER", "FLD", "HH", "IMP", "ACUTE", "NONAC", "OBSENC", "PRENC", "SS", "VR"}
)
#: Qualification verification status (our extension) codes.
VERIFICATION_EXT = "urn:hms-ach:fhir:StructureDefinition/verification-status"
VERIFICATION_CODES = frozenset({"verified", "unverified", "pending", "failed", "expired"})


@dataclass
class Operation:
    """One write: ``method`` POST/PUT/DELETE on ``resource_type`` (``rid`` or a conditional ``query``)."""

    method: str
    resource_type: str
    rid: str | None = None
    query: str | None = None  # conditional update: identifier=system|value
    resource: dict[str, Any] | None = None
    if_match: str | None = None
    if_none_exist: str | None = None
    full_url: str | None = None
    where: str = ""  # "Bundle.entry[3]" for errors
    record: RecordWrite | None = None
    extra: list[RecordWrite] = field(default_factory=list)


@dataclass
class Result:
    status: int
    resource_type: str = ""
    rid: str = ""
    version: int = 0
    body: str | None = None  # the stored resource JSON
    last_updated: datetime | None = None
    outcome: dict[str, Any] | None = None
    changed: bool = False  # this request wrote a new version (replay diffs it against the one before)

    @property
    def location(self) -> str:
        return f"{self.resource_type}/{self.rid}/_history/{self.version}" if self.rid else ""


@dataclass
class RequestOutcome:
    message_id: int
    results: list[Result]
    error: FhirError | None = None


# ---------------------------------------------------------------------------- validation and mapping
def _where(prefix: str, loc: tuple[Any, ...]) -> str:
    text = prefix
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text


def validate(resource: Any, where: str = "") -> str:
    """Check ``resource``; returns its type. FhirError 400 (structure) or 422 (codes) naming the element."""
    if not isinstance(resource, dict):
        raise FhirError(
            400, "structure", "the body must be a JSON object (a FHIR resource)", expression=where or None
        )
    rtype = resource.get("resourceType")
    if not isinstance(rtype, str) or not rtype:
        raise FhirError(
            400, "required", "resourceType is missing", expression=f"{where}resourceType".lstrip(".")
        )
    if rtype not in WRITE_TYPES:
        raise FhirError(
            400,
            "not-supported",
            f"resource type {rtype[:64]!r} cannot be written here; writable: {', '.join(WRITE_TYPES)}",
            expression=f"{where}resourceType".lstrip("."),
        )
    import pydantic
    from fhir.resources.R4B import get_fhir_model_class

    try:
        get_fhir_model_class(rtype).model_validate(resource)
    except pydantic.ValidationError as exc:
        errors = exc.errors()
        first = errors[0]
        loc = _where(f"{where}{rtype}", tuple(first.get("loc", ())))
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise FhirError(
            400,
            "structure" if first.get("type") != "missing" else "required",
            f"{loc}: {first.get('msg', 'invalid')}{more}",
            expression=loc,
        ) from None
    check_codes(rtype, resource, where)
    return rtype


def check_codes(rtype: str, resource: dict[str, Any], where: str = "") -> None:
    """The required value-set bindings (gender, status, class...) that the R4B models do not check."""
    for element, allowed in REQUIRED_CODES.get(rtype, {}).items():
        value = resource.get(element)
        if value is not None and value not in allowed:
            raise FhirError(
                422,
                "code-invalid",
                f"{rtype}.{element} {str(value)[:64]!r} is not one of {', '.join(sorted(allowed))}",
                expression=f"{where}{rtype}.{element}",
            )
    if rtype == "Basic":
        codes = [
            c.get("code")
            for c in (resource.get("code") or {}).get("coding") or []
            if c.get("system") == BASIC_TYPE_SYSTEM
        ]
        if not codes or codes[0] not in BASIC_RECORDS:
            raise FhirError(
                422,
                "code-invalid",
                f"Basic.code must be one of {', '.join(sorted(BASIC_RECORDS))} in {BASIC_TYPE_SYSTEM}",
                expression=f"{where}Basic.code",
            )
    if rtype == "Encounter":
        cls = resource.get("class") or {}
        if cls.get("system", "").endswith("v3-ActCode") and cls.get("code") not in ENCOUNTER_CLASSES:
            raise FhirError(
                422,
                "code-invalid",
                f"Encounter.class {str(cls.get('code'))[:32]!r} is not one of "
                f"{', '.join(sorted(ENCOUNTER_CLASSES))}",
                expression=f"{where}Encounter.class",
            )
    if rtype == "Practitioner":
        for i, qual in enumerate(resource.get("qualification") or []):
            for ext in qual.get("extension") or []:
                if ext.get("url") == VERIFICATION_EXT and ext.get("valueCode") not in VERIFICATION_CODES:
                    raise FhirError(
                        422,
                        "code-invalid",
                        f"verification status {str(ext.get('valueCode'))[:32]!r} is not one of "
                        f"{', '.join(sorted(VERIFICATION_CODES))}",
                        expression=f"{where}Practitioner.qualification[{i}].extension",
                    )
            period = qual.get("period") or {}
            if period.get("start") and period.get("end") and str(period["end"]) < str(period["start"]):
                raise FhirError(
                    422,
                    "invariant",
                    "the period ends before it starts",
                    expression=f"{where}Practitioner.qualification[{i}].period",
                )


def prepare(op: Operation, engine: MappingEngine) -> None:
    """Validate and map ``op.resource`` (pure): sets ``op.record`` (and any further records)."""
    if op.method == "DELETE":
        return
    rtype = validate(op.resource, op.where + "." if op.where else "")
    if rtype != op.resource_type:
        raise FhirError(
            400,
            "invalid",
            f"the body is a {rtype} but the URL names {op.resource_type}",
            expression=f"{op.where}.resourceType".lstrip("."),
        )
    assert op.resource is not None
    if op.method == "PUT" and op.rid and op.resource.get("id") not in (None, op.rid):
        raise FhirError(
            400,
            "invalid",
            f"the body's id {str(op.resource.get('id'))[:64]!r} is not the id in the URL {op.rid!r}",
            expression=f"{rtype}.id",
        )
    body = {k: v for k, v in op.resource.items() if k not in ("id", "meta")}
    try:
        result = engine.map_input("fhir", rtype, body)
    except MessageError as exc:
        raise FhirError(
            422, "processing", f"{exc}", expression=getattr(exc, "location", None) or None
        ) from exc
    target = rtype
    if rtype == "Basic":
        code = next(c["code"] for c in op.resource["code"]["coding"] if c.get("system") == BASIC_TYPE_SYSTEM)
        target = BASIC_RECORDS[code]
    primary = [r for r in result.records if r.resource_type == target]
    if not primary:
        raise FhirError(422, "processing", f"the mapping for {rtype} produced no {target} record")
    op.record = primary[0]
    op.extra = [r for r in result.records if r is not primary[0]]
    op.resource_type = target


# ---------------------------------------------------------------------------- references
def _check_targets(conn: Connection, rtype: str, content: dict[str, Any], where: str) -> None:
    """Every literal reference ``Type/id`` to a type we store must name a live record."""
    for path, ref in references(content):
        if ref.startswith(_URN):
            raise FhirError(
                400,
                "not-found",
                f"{ref[:80]} is not the fullUrl of any entry of this Bundle",
                expression=f"{where}{rtype}.{path}",
            )
        parts = ref.split("/")
        if len(parts) != 2 or parts[0] not in RECORD_TABLES:
            continue
        t = RECORD_TABLES[parts[0]].__table__  # type: ignore[attr-defined]
        row = conn.execute(select(t.c.version_id, t.c.deleted).where(t.c.id == parts[1])).first()
        if row is None or row.version_id == 0 or row.deleted:
            raise FhirError(
                422,
                "not-found",
                f"{rtype}.{path} refers to {ref[:80]}, which does not exist",
                expression=f"{where}{rtype}.{path}",
            )


# ---------------------------------------------------------------------------- store work
def _etag_version(if_match: str | None) -> int | None:
    if if_match is None:
        return None
    m = re.fullmatch(r'\s*(?:W/)?"?(\d{1,18})"?\s*', if_match)
    if not m:
        raise FhirError(400, "invalid", f'If-Match {if_match[:40]!r} is not an ETag like W/"3"')
    return int(m.group(1))


def parse_identifier_query(query: str, header: str) -> tuple[str | None, str]:
    """``identifier=system|value`` (the only conditional criterion we accept) -> (system, value)."""
    pairs = parse_qsl(query, keep_blank_values=True)
    if len(pairs) != 1 or pairs[0][0] != "identifier" or not pairs[0][1]:
        raise FhirError(400, "not-supported", f"{header} must be identifier=system|value, got {query[:80]!r}")
    system, sep, value = pairs[0][1].rpartition("|")
    if not value:
        raise FhirError(400, "invalid", f"{header}: the identifier has no value")
    return (system or None) if sep else None, value


class Writer:
    """Applies operations on ``conn`` inside the writer's transaction."""

    def __init__(self, conn: Connection, message_id: int):
        self.conn = conn
        self.repo = Repository(conn)
        self.message_id = message_id
        self.lock = conn.dialect.name == "postgresql"

    def _table(self, rtype: str) -> Any:
        return RECORD_TABLES[rtype].__table__  # type: ignore[attr-defined]

    def _row(self, rtype: str, rid: str) -> Any:
        t = self._table(rtype)
        q = select(
            t.c.id, t.c.version_id, t.c.deleted, t.c.resource, t.c.key_system, t.c.key_value, t.c.last_updated
        ).where(t.c.id == rid)
        if self.lock:
            q = q.with_for_update()
        return self.conn.execute(q).first()

    def _by_key(self, rtype: str, system: str | None, value: str) -> Any:
        t = self._table(rtype)
        cond = t.c.key_system.is_(None) if system is None else t.c.key_system == system
        q = select(t.c.id).where(and_(cond, t.c.key_value == value))
        return self.conn.execute(q).scalar()

    def _by_identifier(self, rtype: str, system: str | None, value: str) -> list[str]:
        t, ix = self._table(rtype), SearchToken.__table__  # type: ignore[attr-defined]
        cond = [ix.c.resource_type == rtype, ix.c.param == "identifier", ix.c.value == value]
        if system is not None:
            cond.append(ix.c.system == system)
        sub = select(ix.c.resource_id).where(*cond)
        return list(
            self.conn.execute(select(t.c.id).where(t.c.id.in_(sub), t.c.deleted.is_(False))).scalars()
        )

    def _claim(self, rec: RecordWrite) -> tuple[str, bool]:
        """Insert a placeholder under the record's business key (ON CONFLICT DO NOTHING): (id, created)."""
        t = self._table(rec.resource_type)
        stmt = (
            self.repo._insert(t)
            .values(
                id=new_id(),
                key_system=rec.key_system,
                key_value=rec.key_value,
                version_id=0,
                last_updated=datetime.now(UTC),
                deleted=False,
                resource="{}",
            )
            .on_conflict_do_nothing(index_elements=["key_system", "key_value"])
        )
        created = self.conn.execute(stmt).rowcount == 1
        rid = self._by_key(rec.resource_type, rec.key_system, rec.key_value or "")
        row = self._row(rec.resource_type, rid)
        return rid, created or row.version_id == 0

    def _result(self, rtype: str, rid: str, status: int) -> Result:
        row = self._row(rtype, rid)
        return Result(status, rtype, rid, int(row.version_id), row.resource, row.last_updated)

    def _write(self, op: Operation, rid: str, created: bool, resolved: dict[str, str]) -> Result:
        """Write ``op.record`` as the next version of ``rid`` (If-Match checked first)."""
        rec = op.record
        assert rec is not None
        rtype = op.resource_type
        row = self._row(rtype, rid)
        expected = _etag_version(op.if_match)
        if expected is not None and (created or expected != row.version_id):
            raise FhirError(
                412,
                "conflict",
                f"If-Match {op.if_match} does not match the current version "
                f'W/"{0 if created else row.version_id}" of {rtype}/{rid}',
            )
        content = rewrite_references(rec.content, resolved)
        _check_targets(self.conn, rtype, content, f"{op.where}." if op.where else "")
        if rtype == "Shift":
            check_shift(self.conn, rid, content, f"{op.where}.Basic" if op.where else "Basic")
        old = (
            {}
            if created
            else {k: v for k, v in orjson.loads(row.resource).items() if k not in ("id", "meta")}
        )
        if rec.key_value and (row.key_system, row.key_value) != (rec.key_system, rec.key_value):
            other = self._by_key(rtype, rec.key_system, rec.key_value)
            if other is not None and other != rid:
                raise FhirError(
                    409,
                    "duplicate",
                    f"{rtype}/{other} already has the identifier {rec.key_system}|{rec.key_value}",
                )
            t = self._table(rtype)
            self.conn.execute(
                update(t).where(t.c.id == rid).values(key_system=rec.key_system, key_value=rec.key_value)
            )
        if rec.mode == "replace":
            merged = merge_content({}, content)
        elif rec.mode == "fill":
            merged = merge_content(content, old)
        else:
            merged = merge_content(old, content)
        merged["resourceType"] = rtype
        if not created and not row.deleted and merged == old:
            return self._result(rtype, rid, 200)
        self.repo._store_version(
            rtype,
            rid,
            int(row.version_id) + 1,
            merged,
            self.message_id,
            created,
            before=None if created else old,
        )
        for extra in op.extra:
            self.repo.upsert(extra, rewrite_references(extra.content, resolved), self.message_id)
        result = self._result(rtype, rid, 201 if created else 200)
        result.changed = True
        return result

    def apply(self, op: Operation, resolved: dict[str, str]) -> Result:
        rtype = op.resource_type
        if op.method == "DELETE":
            return self.delete(op)
        rec = op.record
        assert rec is not None
        if op.method == "POST":
            if op.if_none_exist:
                system, value = parse_identifier_query(op.if_none_exist, "If-None-Exist")
                if rec.key_value and (system, value) == (rec.key_system, rec.key_value):
                    rid, created = self._claim(rec)
                    if not created:
                        return self._result(rtype, rid, 200)
                    return self._write(op, rid, True, resolved)
                found = self._by_identifier(rtype, system, value)
                if len(found) > 1:
                    raise FhirError(
                        412, "multiple-matches", f"If-None-Exist matches {len(found)} {rtype} records"
                    )
                if found:
                    return self._result(rtype, found[0], 200)
            if not rec.key_value:
                rid = new_id()
                t = self._table(rtype)
                self.conn.execute(
                    t.insert().values(
                        id=rid,
                        key_system=None,
                        key_value=None,
                        version_id=0,
                        last_updated=datetime.now(UTC),
                        deleted=False,
                        resource="{}",
                    )
                )
                return self._write(op, rid, True, resolved)
            rid, created = self._claim(rec)
            if not created:
                raise FhirError(
                    409,
                    "duplicate",
                    f"{rtype}/{rid} already has the identifier {rec.key_system}|"
                    f"{rec.key_value}; use a conditional update (PUT {rtype}?identifier="
                    f"system|value) or If-None-Exist",
                )
            return self._write(op, rid, True, resolved)
        # PUT
        if op.rid is not None:
            row = self._row(rtype, op.rid)
            if row is None or row.version_id == 0:
                raise FhirError(
                    404,
                    "not-found",
                    f"{rtype}/{op.rid} is not known; this server does not create "
                    "on update (use POST or a conditional update)",
                )
            return self._write(op, op.rid, False, resolved)
        system, value = parse_identifier_query(op.query or "", "the conditional update")
        if rec.key_value and (system, value) == (rec.key_system, rec.key_value):
            rid, created = self._claim(rec)
            return self._write(op, rid, created, resolved)
        found = self._by_identifier(rtype, system, value)
        if len(found) > 1:
            raise FhirError(
                412, "multiple-matches", f"the conditional update matches {len(found)} {rtype} records"
            )
        if found:
            return self._write(op, found[0], False, resolved)
        op.if_none_exist = None
        return self.apply(
            Operation(
                "POST",
                rtype,
                resource=op.resource,
                if_match=op.if_match,
                where=op.where,
                record=rec,
                extra=op.extra,
            ),
            resolved,
        )

    def delete(self, op: Operation) -> Result:
        rtype = op.resource_type
        rid = op.rid or ""
        row = self._row(rtype, rid) if _ID_RE.match(rid) else None
        if row is None or row.version_id == 0:
            raise FhirError(404, "not-found", f"{rtype}/{rid[:64]} is not known")
        expected = _etag_version(op.if_match)
        if expected is not None and expected != row.version_id:
            raise FhirError(
                412,
                "conflict",
                f"If-Match {op.if_match} does not match the current version "
                f'W/"{row.version_id}" of {rtype}/{rid}',
            )
        if row.deleted:
            return Result(204, rtype, rid, int(row.version_id), None, row.last_updated)
        old = {k: v for k, v in orjson.loads(row.resource).items() if k not in ("id", "meta")}
        self.repo._store_version(
            rtype, rid, int(row.version_id) + 1, old, self.message_id, False, deleted=True, before=old
        )
        return Result(204, rtype, rid, int(row.version_id) + 1, None, datetime.now(UTC), changed=True)


def _instant(text: Any, where: str) -> datetime:
    try:
        value = datetime.fromisoformat(str(text))
    except ValueError:
        value = None
    if value is None or value.tzinfo is None:
        raise FhirError(
            422, "value", f"{str(text)[:40]!r} is not a dateTime with a UTC offset", expression=where
        )
    return value


def check_shift(conn: Connection, rid: str, content: dict[str, Any], where: str) -> None:
    """A shift ends after it starts, has a known status and does not overlap its employee's others."""
    ext = f"{where}.extension"
    start, end = _instant(content.get("start"), ext), _instant(content.get("end"), ext)
    if end <= start:
        raise FhirError(422, "invariant", "the shift ends before it starts", expression=ext)
    if content.get("status") not in ("planned", "confirmed", "swapped", "cancelled"):
        raise FhirError(
            422,
            "code-invalid",
            f"shift status {str(content.get('status'))[:32]!r} is not one of "
            "planned, confirmed, swapped, cancelled",
            expression=ext,
        )
    who = (content.get("practitioner") or {}).get("reference")
    if who and content.get("status") != "cancelled":
        clash = shift_overlap(conn, who, start, end, rid)  # that employee's shifts only, by the index
        if clash:
            raise FhirError(
                422,
                "business-rule",
                f"{who} already works shift Shift/{clash} then",
                expression=f"{where}.subject",
            )


def order_entries(ops: list[Operation]) -> list[Operation]:
    """DELETEs first, then writes so that every urn:uuid target is written before it is referred to."""
    full_urls = {op.full_url: op for op in ops if op.full_url}
    deletes = [op for op in ops if op.method == "DELETE"]
    pending = [op for op in ops if op.method != "DELETE"]
    done: set[str] = set()
    ordered: list[Operation] = []
    while pending:
        progressed = False
        for op in list(pending):
            needs = {ref for _p, ref in references(op.resource or {}) if ref in full_urls} - {op.full_url}
            if needs - done:
                continue
            pending.remove(op)
            ordered.append(op)
            if op.full_url:
                done.add(op.full_url)
            progressed = True
        if not progressed:
            raise FhirError(
                400,
                "invalid",
                "the Bundle's urn:uuid references form a cycle: " + ", ".join(op.where for op in pending),
            )
    return deletes + ordered


@dataclass
class RequestLine:
    """The method, the URL under /fhir and the conditional headers of a write: stored beside its body
    (table ``message_fhir_request``) so that ``hms-ach replay`` can run the same request again."""

    method: str
    target: str = ""  # Practitioner, Practitioner/123, Practitioner?identifier=s|v; "" for a Bundle
    if_match: str | None = None
    if_none_exist: str | None = None


def store_request_line(conn: Connection, message_id: int, line: RequestLine | None) -> None:
    if line is not None:
        conn.execute(
            insert(REQUEST_LINES).values(
                message_id=message_id,
                method=line.method[:10],
                target=line.target,
                if_match=line.if_match[:255] if line.if_match else None,
                if_none_exist=line.if_none_exist,
            )
        )


def stored_request_line(conn: Connection, message_id: int) -> RequestLine | None:
    row = conn.execute(select(REQUEST_LINES).where(REQUEST_LINES.c.message_id == message_id)).first()
    if row is None:
        return None
    return RequestLine(str(row.method), str(row.target or ""), row.if_match, row.if_none_exist)


def request_job(
    meta: messages.MessageMeta, ops: list[Operation], kind: str, line: RequestLine | None = None
) -> Any:
    """The writer job for one request: ``kind`` is single, transaction or batch."""

    def job(conn: Connection) -> RequestOutcome:
        message_id = messages.insert_message(conn, meta, keyed=False)
        store_request_line(conn, message_id, line)
        return apply_request(conn, message_id, ops, kind)

    return job


def apply_request(
    conn: Connection, message_id: int, ops: list[Operation], kind: str, replay: bool = False
) -> RequestOutcome:
    """Apply the prepared ``ops`` of the stored request ``message_id`` and record its outcome on the row."""
    writer = Writer(conn, message_id)
    results: list[Result] = []
    error: FhirError | None = None
    if kind == "batch":
        for op in ops:
            sp = conn.begin_nested()
            try:
                results.append(writer.apply(op, {}))
                sp.commit()
            except FhirError as exc:
                sp.rollback()
                results.append(Result(exc.status, op.resource_type, outcome=_outcome(exc)))
            except IntegrityError as exc:
                sp.rollback()
                results.append(
                    Result(
                        409,
                        op.resource_type,
                        outcome=operation_outcome(
                            "conflict", f"a unique constraint refused the write: {type(exc.orig).__name__}"
                        ),
                    )
                )
    else:
        sp = conn.begin_nested()
        resolved: dict[str, str] = {}
        try:
            for op in order_entries(ops) if kind == "transaction" else ops:
                res = writer.apply(op, resolved)
                if op.full_url and res.rid:
                    resolved[op.full_url] = f"{res.resource_type}/{res.rid}"
                results.append(res)
            sp.commit()
        except FhirError as exc:
            sp.rollback()
            error, results = exc, []
        except IntegrityError as exc:
            sp.rollback()
            error, results = (
                FhirError(
                    409, "conflict", f"a unique constraint refused the write ({type(exc.orig).__name__})"
                ),
                [],
            )
    if kind == "transaction" and error is None:
        # keep the Bundle's entry order in the response
        by_op = dict(zip([id(o) for o in order_entries(ops)], results, strict=True))
        results = [by_op[id(o)] for o in ops]
    status = "error" if error else "processed"
    ack = orjson.dumps(
        {
            "status": error.status if error else [r.status for r in results],
            "location": [r.location for r in results],
        }
    ).decode()
    messages.finish(
        conn,
        message_id,
        status,
        str(error.status) if error else "200",
        ack,
        error=error.diagnostics if error else None,
        error_location=(error.expression or "")[:200] if error else None,
        replay=replay,
    )
    return RequestOutcome(message_id, results, error)


def rejection_job(meta: messages.MessageMeta, error: FhirError, line: RequestLine | None = None) -> Any:
    """Store a request refused before it could be applied (bad JSON, invalid resource) with its reason."""

    def job(conn: Connection) -> int:
        message_id = messages.insert_message(conn, meta, keyed=False)
        store_request_line(conn, message_id, line)
        record_rejection(conn, message_id, error)
        return message_id

    return job


def _outcome(exc: FhirError) -> dict[str, Any]:
    return operation_outcome(
        exc.code, exc.diagnostics, expression=[exc.expression] if exc.expression else None
    )


def record_rejection(conn: Connection, message_id: int, error: FhirError, replay: bool = False) -> None:
    messages.finish(
        conn,
        message_id,
        "rejected",
        str(error.status),
        None,
        error=error.diagnostics,
        error_location=(error.expression or "")[:200] or None,
        replay=replay,
    )
