"""The entries of a transaction Bundle, written in groups with a few statements each.

A transaction Bundle is all-or-nothing: one writer job, one commit (on PostgreSQL on the writer's
second connection, :mod:`hms_ach.store.writer`). So that a 1,000-entry Bundle holds the writer
for a short time (docs/reliability.md, "Fairness between channels"), runs of
consecutive entries (in :func:`~hms_ach.fhir.write.order_entries` order) that are creates,
conditional creates or conditional updates on the record's own business key are written as one
group with :mod:`hms_ach.store.bulk`:

1. the records that already have the entries' keys are read with one SELECT per type;
2. each entry's target is decided as the per-entry path decides it (a new id, or the record
   found), and every ``urn:uuid`` fullUrl of the group is resolved at once;
3. references are checked against the records that are live (one SELECT per type) or written by
   an earlier entry of the Bundle, If-Match is compared, the content merged, a write that changes
   nothing makes no version;
4. the versions are written with one ``executemany`` per table, and the change listeners (audit
   chain, outbox) run for all of them.

The group runs in a SAVEPOINT. Anything the per-entry path would refuse (a key that exists for a
plain create, a version mismatch, a reference to nothing...) or that this path does not cover
(deletes, updates by id, records with further records, shifts, a key twice in the group) sends the
group to the per-entry path (:func:`hms_ach.fhir.write._apply`), which then answers exactly as it
always did: the fast path changes how long a transaction takes, never its outcome.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from hms_ach.core import fairness
from hms_ach.core.records import RECORD_MATCHERS, RECORD_MERGERS, RECORD_TYPES, Mode, merge_record
from hms_ach.core.references import references, rewrite_references
from hms_ach.fhir.write import Operation, Result, etag_version, parse_identifier_query
from hms_ach.store import bulk
from hms_ach.store.errors import DomainError
from hms_ach.store.ids import new_id, ordered_ids
from hms_ach.store.port import Tx
from hms_ach.store.repository import Repository
from hms_ach.store.savepoint import savepoint

#: A run of fewer eligible entries than this is written entry by entry (nothing to gain).
MIN_GROUP = 4
_URN = "urn:uuid:"
#: Writes one entry on the per-entry path (and records its fullUrl): the caller's.
ApplyOne = Callable[[Operation], Result]


@dataclass
class _Entry:
    op: Operation
    kind: str  # create | create_unless (If-None-Exist on the key) | update (conditional, on the key)
    expected: int | None  # If-Match


def _entry(op: Operation) -> _Entry | None:
    """``op`` as a bulk entry, or None when the per-entry path must write it."""
    rec = op.record
    if rec is None or op.extra or op.method == "DELETE" or op.resource_type == "Shift":
        return None
    if rec.key_value and rec.key_system is None:
        return None
    try:
        expected = etag_version(op.if_match)
        if op.method == "POST" and not op.if_none_exist:
            return _Entry(op, "create", expected)
        if op.method == "POST":
            condition = parse_identifier_query(op.if_none_exist or "", "If-None-Exist")
            kind = "create_unless"
        elif op.rid is None:
            condition = parse_identifier_query(op.query or "", "the conditional update")
            kind = "update"
        else:
            return None
    except DomainError:  # the per-entry path refuses it with its own answer
        return None
    if not rec.key_value or condition != (rec.key_system, rec.key_value):
        return None
    return _Entry(op, kind, expected)


@dataclass
class _Plan:
    """A transaction entry's work done before the writer, on the guess that its record is new
    (the usual case of a load): its id, its content with the Bundle's fullUrls resolved (``urls``:
    those it refers to, and what they were resolved to), and its version 1 rendered and indexed,
    with the change listeners' rows (its outbox events) and its audit diff made
    (:func:`bulk.render_ahead`); a type merged by its source is merged for ``source``. The writer
    uses it only when the guess holds (and the stored message has that source)."""

    rid: str
    urls: dict[str, str]
    content: dict[str, Any]
    refs: list[tuple[str, str]]  # the records of stored types it refers to
    rendered: bulk.Rendered | None  # None: a urn:uuid is left, the writer resolves it
    source: str  # the source a type merged by source was merged for (the request's channel)


#: The planning thread pauses this long every ``PLAN_PAUSE_EVERY`` entries (the event loop's turn).
PLAN_PAUSE_SECONDS = 0.001
PLAN_PAUSE_EVERY = 20


def plan(ops: list[Operation], source: str | None = None) -> None:
    """Plan the entries of a prepared transaction that the bulk path may write (``op.plan``): run in a
    worker thread before the request is queued, so that the writer only reads keys and writes rows.

    ``source``: the channel the request's message is stored under, which a type merged by its
    source (:data:`~hms_ach.core.records.RECORD_MERGERS`, Practitioner survivorship) is merged for;
    without it such entries are merged in the writer. The writer checks it against the stored
    message's channel before it uses the plan."""
    entries = [e for e in (_entry(op) for op in ops) if e is not None]
    if len(entries) < MIN_GROUP:
        return
    rids = dict(zip((id(e.op) for e in entries), ordered_ids(len(entries)), strict=True))
    guessed = {e.op.full_url: f"{e.op.resource_type}/{rids[id(e.op)]}" for e in entries if e.op.full_url}
    for i, e in enumerate(entries, start=1):
        rec, rtype = e.op.record, e.op.resource_type
        assert rec is not None
        urls = {ref: guessed[ref] for _path, ref in references(rec.content) if ref in guessed}
        content = rewrite_references(rec.content, urls)
        found = references(content)
        rendered = None
        # a type merged by its source (survivorship) is merged for ``source``, or in the writer
        if not any(ref.startswith(_URN) for _path, ref in found) and (
            rtype not in RECORD_MERGERS or source is not None
        ):
            merged = _merged(rec.mode, {}, content, rtype, source or "")
            rendered = bulk.render_ahead(rtype, rids[id(e.op)], merged)
        refs = [(parts[0], parts[1]) for parts in (ref.split("/") for _p, ref in found) if _stored(parts)]
        e.op.plan = _Plan(rids[id(e.op)], urls, content, refs, rendered, source or "")
        if i % PLAN_PAUSE_EVERY == 0:
            fairness.pause(PLAN_PAUSE_SECONDS)


def _stored(parts: list[str]) -> bool:
    return len(parts) == 2 and parts[0] in RECORD_TYPES


def apply_transaction(
    tx: Tx, message_id: int, ordered: list[Operation], resolved: dict[str, str], apply_one: ApplyOne
) -> list[Result]:
    """The results of the transaction's ``ordered`` operations: groups of eligible entries through
    the bulk path, the others (and any group it does not cover) through ``apply_one``."""
    results: list[Result] = []
    i = 0
    while i < len(ordered):
        group: list[_Entry] = []
        while i + len(group) < len(ordered):
            found = _entry(ordered[i + len(group)])
            if found is None:
                break
            group.append(found)
        if len(group) >= MIN_GROUP:
            written = _try_group(tx, message_id, group, resolved)
            if written is not None:
                results += written
                i += len(group)
                continue
        for op in ordered[i : i + max(1, len(group))]:
            results.append(apply_one(op))
        i += max(1, len(group))
    return results


def _try_group(tx: Tx, message_id: int, group: list[_Entry], resolved: dict[str, str]) -> list[Result] | None:
    """The group written in a SAVEPOINT, or None (rolled back) when the per-entry path must write it."""
    before = dict(resolved)
    try:
        with savepoint(tx):
            return _write_group(tx, message_id, group, resolved)
    except (bulk.Fallback, DomainError):  # DomainError: a unique constraint refused an INSERT
        resolved.clear()
        resolved.update(before)
        return None


def _content(text: str) -> dict[str, Any]:
    return {k: v for k, v in orjson.loads(text).items() if k not in ("id", "meta")}


def _merged(
    mode: Mode, old: dict[str, Any], content: dict[str, Any], rtype: str, source: str = ""
) -> dict[str, Any]:
    merged = merge_record(rtype, mode, old, content, source)
    merged["resourceType"] = rtype
    return merged


def _write_group(tx: Tx, message_id: int, group: list[_Entry], resolved: dict[str, str]) -> list[Result]:
    # 1. the records that have the entries' keys
    keys: dict[str, list[tuple[str, str]]] = {}
    for e in group:
        rec = e.op.record
        assert rec is not None  # _entry took only prepared operations
        if rec.key_value:
            keys.setdefault(e.op.resource_type, []).append((str(rec.key_system), rec.key_value))
    if sum(len(k) for k in keys.values()) != sum(len(set(k)) for k in keys.values()):
        raise bulk.Fallback("a business key twice in the group")
    found = {
        (rtype, key): row
        for rtype, ks in keys.items()
        for key, row in bulk.find_by_keys(tx, rtype, ks).items()
    }

    # 2. each entry's target, and the group's fullUrls
    targets: list[tuple[str, bulk.Existing | None]] = []
    new_keys: dict[str, tuple[str | None, str | None]] = {}
    for e in group:
        rec, rtype = e.op.record, e.op.resource_type
        assert rec is not None
        row = found.get((rtype, (str(rec.key_system), rec.key_value))) if rec.key_value else None
        if row is not None and (row.version == 0 or e.kind == "create"):
            raise bulk.Fallback("a claimed or taken key")  # per entry: a stale claim, or AlreadyExists
        planned: _Plan | None = e.op.plan
        rid = row.id if row is not None else planned.rid if planned is not None else new_id()
        if row is None and e.kind == "update" and rtype in RECORD_MATCHERS:
            if Repository(tx).matched_id(rtype, rec.content) is not None:
                raise bulk.Fallback("the match policy finds the record")  # per entry: updated
        if row is None:
            new_keys[rid] = (rec.key_system, rec.key_value)
        targets.append((rid, row))
        if e.op.full_url:
            resolved[e.op.full_url] = f"{rtype}/{rid}"

    # 3. contents, and the records they refer to (as planned, when the plan's guess held)
    repo = Repository(tx)  # the source of the request, for a type merged by source
    contents: list[dict[str, Any]] = []
    refs: list[list[tuple[str, str]]] = []
    usable: list[_Plan | None] = []
    for e, (rid, _row) in zip(group, targets, strict=True):
        assert e.op.record is not None
        planned = e.op.plan
        if (
            planned is not None
            and planned.rid == rid
            and planned.rendered is not None
            and all(resolved.get(u) == r for u, r in planned.urls.items())
            and (
                e.op.resource_type not in RECORD_MERGERS
                or planned.source == repo.source_of(e.op.resource_type, message_id)
            )
        ):
            usable.append(planned)
            contents.append(planned.content)
            refs.append(planned.refs)
            continue
        usable.append(None)
        content = rewrite_references(e.op.record.content, resolved)
        found_refs = references(content)
        if any(ref.startswith(_URN) for _path, ref in found_refs):
            raise bulk.Fallback("a urn:uuid that no entry has")
        contents.append(content)
        refs.append([(p[0], p[1]) for p in (ref.split("/") for _path, ref in found_refs) if _stored(p)])
    wanted: dict[str, set[str]] = {}
    for entry_refs in refs:
        for rtype, rid in entry_refs:
            wanted.setdefault(rtype, set()).add(rid)
    live = {(rtype, rid) for rtype, ids in wanted.items() for rid in bulk.live_ids(tx, rtype, ids)}

    # 4. what each entry writes, decided as the per-entry path decides it
    results: list[Result | None] = []
    versions: list[bulk.NewVersion] = []
    for e, (rid, row), content, entry_refs, planned in zip(
        group, targets, contents, refs, usable, strict=True
    ):
        rec, rtype = e.op.record, e.op.resource_type
        assert rec is not None
        if row is not None and e.kind == "create_unless":  # found: nothing written
            results.append(Result(200, rtype, rid, row.version, row.resource, row.last_updated))
            continue
        created = row is None
        if e.expected is not None and (row is None or e.expected != row.version):
            raise bulk.Fallback("If-Match")  # per entry: VersionConflict
        if any(ref not in live for ref in entry_refs):
            raise bulk.Fallback("a reference to no live record")  # per entry: RuleViolation
        if row is None and planned is not None:
            versions.append(bulk.NewVersion(rtype, rid, 1, {}, True, None, planned.rendered))
            live.add((rtype, rid))
            results.append(None)
            continue
        old = {} if row is None else _content(row.resource)
        merged = _merged(rec.mode, old, content, rtype, repo.source_of(rtype, message_id))
        if row is not None and not row.deleted and merged == old:  # no change: no new version
            results.append(Result(200, rtype, rid, row.version, row.resource, row.last_updated))
            continue
        version = 1 if row is None else row.version + 1
        versions.append(bulk.NewVersion(rtype, rid, version, merged, created, None if created else old))
        live.add((rtype, rid))  # later entries may refer to it
        results.append(None)

    # 5. the versions, with a few statements for all of them
    stored = iter(bulk.write_versions(tx, versions, new_keys, message_id))
    made = iter(versions)
    out: list[Result] = []
    for res in results:
        if res is None:
            v, s = next(made), next(stored)
            res = Result(
                201 if v.created else 200,
                v.resource_type,
                v.id,
                v.version,
                s.text,
                s.last_updated,
                changed=True,
            )
        out.append(res)
    return out
