"""A review case's audit log: every change of the case and of its records, and every read of it,
in order, from the audit trails (docs/review-cases.md, "Audit log").

The records of a case (the contract of issue 18):

* the case's Task, every version (created, state changes, assignment, notes, findings attached);
* the findings: QuestionnaireResponses named in any version's ``Task.output``, or whose
  ``subject`` is the case's focus and which carry the case extension pointing at the Task;
* the comments: Communications ``about`` the Task;
* the signatures: Provenances whose ``target`` is the Task or one of its findings.

Each version of each becomes one entry from the change trail (``hms_ach.store.audit``: when it was
written and by whom), its ``action`` and ``detail`` read from the version and the one before it.
The reads are the access records (``hms_ach.store.access_log``) of the case's URLs
(``/api/v1/review/<id>/...``, ``/api/v1/review/cases/<id>``, ``/fhir/Task/<id>``) or that returned
one of its records. The answer carries the trails' integrity, checked as ``hms-ach audit verify``
checks it. Details hold codes, states and references only, never note text or answers.

:func:`render_pdf` draws the same entries as a PDF (fpdf2, core fonts).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from hms_ach.cases.workflow import state_of
from hms_ach.store import case_audit_queries as q
from hms_ach.store.console_queries import verify_trails
from hms_ach.store.port import Tx

if TYPE_CHECKING:  # fpdf2 is imported when a PDF is drawn: with its fontTools and PIL it adds
    # about 45 MB to a process, which every engine paid at start whether it drew a PDF or not
    from fpdf import FPDF

#: QuestionnaireResponse.extension: the case whose findings it holds (valueReference Task/<id>).
CASE_EXT = "urn:hms-ach:fhir:StructureDefinition/case"
#: QuestionnaireResponse.extension: the Provenance that signs it.
SIGNATURE_EXT = "urn:hms-ach:fhir:StructureDefinition/signature"

#: The actions of the entries, in the words of docs/review-cases.md.
ACTIONS = (
    "created",
    "updated",
    "state-changed",
    "assigned",
    "commented",
    "findings",
    "signed",
    "deleted",
    "read",
)


@dataclass(frozen=True)
class Entry:
    """One line of the audit log."""

    at: str
    actor: str
    action: str
    resource: str
    version: int | None
    detail: str
    seq: int = 0  # the entry's number in its trail (change trail or access records)

    def to_dict(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "actor": self.actor,
            "action": self.action,
            "resource": self.resource,
            "version": self.version,
            "detail": self.detail,
        }


@dataclass
class AuditLog:
    """The audit log of one case: its entries in order and the trails' integrity."""

    case: str  # Task/<id>
    case_id: str | None
    entries: list[Entry] = field(default_factory=list)
    integrity: dict[str, Any] = field(default_factory=dict)
    reads_truncated: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "case": self.case,
            "case_id": self.case_id,
            "integrity": self.integrity,
            "reads_truncated": self.reads_truncated,
            "entries": [e.to_dict() for e in self.entries],
        }


def _ref(value: Any) -> str | None:
    return str(value["reference"]) if isinstance(value, dict) and value.get("reference") else None


def _ext_ref(resource: dict[str, Any], url: str) -> str | None:
    for e in resource.get("extension") or []:
        if isinstance(e, dict) and e.get("url") == url:
            return _ref(e.get("valueReference"))
    return None


def _outputs(task: dict[str, Any]) -> list[str]:
    return [
        r for o in task.get("output") or [] if isinstance(o, dict) and (r := _ref(o.get("valueReference")))
    ]


def _changed(before: dict[str, Any], after: dict[str, Any]) -> str:
    keys = sorted(
        k for k in set(before) | set(after) if k not in ("meta", "id") and before.get(k) != after.get(k)
    )
    return "changed: " + (", ".join(keys) if keys else "nothing")


def task_change(before: dict[str, Any] | None, after: dict[str, Any]) -> tuple[str, str]:
    """(action, detail) of a case's Task version ``after`` following ``before`` (None: the first)."""
    owner = _ref(after.get("owner"))
    state = state_of(after) or str(after.get("status") or "")
    if before is None:
        return "created", state + (f", assigned to {owner}" if owner else ", unassigned")
    was_state = state_of(before) or str(before.get("status") or "")
    was_owner = _ref(before.get("owner"))
    owner_text = f"assigned to {owner}" if owner else f"unassigned from {was_owner}"
    if state != was_state:
        return "state-changed", f"{was_state} -> {state}" + (f"; {owner_text}" if owner != was_owner else "")
    if owner != was_owner:
        return "assigned", owner_text
    added = [r for r in _outputs(after) if r not in _outputs(before)]
    if added:
        return "findings", "output " + ", ".join(added)
    if len(after.get("note") or []) > len(before.get("note") or []):
        return "commented", f"note {len(after.get('note') or [])} added"
    return "updated", _changed(before, after)


def record_change(rtype: str, before: dict[str, Any] | None, after: dict[str, Any]) -> tuple[str, str]:
    """(action, detail) of a version of one of the case's other records."""
    if rtype == "QuestionnaireResponse":
        signature = _ext_ref(after, SIGNATURE_EXT)
        if before is None:
            return "findings", f"status {after.get('status') or 'unknown'}"
        if signature and signature != _ext_ref(before, SIGNATURE_EXT):
            return "signed", f"signature {signature}"
        if after.get("status") != before.get("status"):
            return "findings", f"status {before.get('status')} -> {after.get('status')}"
    if rtype == "Communication" and before is None:
        parent = next((r for p in after.get("partOf") or [] if (r := _ref(p))), None)
        return "commented", f"reply to {parent}" if parent else "comment"
    if rtype == "Provenance" and before is None:
        who = next(
            (r for a in after.get("agent") or [] if isinstance(a, dict) and (r := _ref(a.get("who")))), None
        )
        targets = ", ".join(r for t in after.get("target") or [] if (r := _ref(t)))
        return "signed", f"{who or 'unknown signer'} signed {targets}"
    if before is None:
        return "created", rtype
    return "updated", _changed(before, after)


def actor_of(agent: str, actor: str | None) -> str:
    """Who made a change: the caller's ``sub``, the scheduled job or the replaying user, else the
    channel (``agent``) that took the message."""
    if actor:
        try:
            fields = orjson.loads(actor)
        except orjson.JSONDecodeError:
            fields = None
        if isinstance(fields, dict):
            if fields.get("sub"):
                return str(fields["sub"])
            if fields.get("job"):
                return f"job:{fields['job']}"
            if fields.get("user"):
                return f"user:{fields['user']}"
    return agent


def _path(query: str) -> str:
    """The request path of an access record, without the query string (it may name a patient)."""
    return query.split("?", 1)[0]


def case_records(tx: Tx, task_id: str, task_versions: list[q.RecordVersion]) -> list[tuple[str, str]]:
    """The (type, id) of the case's Task and of every record belonging to it (module docstring)."""
    target = f"Task/{task_id}"
    findings: set[str] = set()
    for v in task_versions:
        findings.update(
            r.split("/", 1)[1] for r in _outputs(v.content) if r.startswith("QuestionnaireResponse/")
        )
    focus = next((f for v in reversed(task_versions) if (f := _ref(v.content.get("focus")))), None)
    if focus is not None:
        about = q.referrers(tx, "QuestionnaireResponse", "subject", focus)
        for rid, qr in q.current_records(tx, "QuestionnaireResponse", about).items():
            if _ext_ref(qr, CASE_EXT) == target:
                findings.add(rid)
    records = [("Task", task_id)]
    records += [("QuestionnaireResponse", rid) for rid in sorted(findings)]
    records += [("Communication", rid) for rid in q.referrers(tx, "Communication", "about", target)]
    signatures = set(q.referrers(tx, "Provenance", "target", target))
    for rid in findings:
        signatures.update(q.referrers(tx, "Provenance", "target", f"QuestionnaireResponse/{rid}"))
    records += [("Provenance", rid) for rid in sorted(signatures)]
    return records


def build(tx: Tx, task_id: str, case_id: str | None) -> AuditLog:
    """The audit log of the case ``Task/<task_id>`` (see the module docstring)."""
    task_versions = q.versions(tx, "Task", task_id)
    records = case_records(tx, task_id, task_versions)
    contents: dict[tuple[str, str, int], q.RecordVersion] = {}
    for rtype, rid in records:
        for v in task_versions if (rtype, rid) == ("Task", task_id) else q.versions(tx, rtype, rid):
            contents[(rtype, rid, v.version_id)] = v
    entries: list[Entry] = []
    for row in q.change_rows(tx, records):
        version = contents.get((row.entity_type, row.entity_id, row.version_id))
        previous = contents.get((row.entity_type, row.entity_id, row.version_id - 1))
        before = previous.content if previous is not None and not previous.deleted else None
        if row.action == "delete" or (version is not None and version.deleted):
            action, detail = "deleted", row.entity_type
        elif version is None:  # the history row is gone; the trail still says it happened
            action, detail = ("created" if row.action == "create" else "updated"), "version not stored"
        elif row.entity_type == "Task":
            action, detail = task_change(before, version.content)
        else:
            action, detail = record_change(row.entity_type, before, version.content)
        entries.append(
            Entry(
                row.recorded,
                actor_of(row.agent, row.actor),
                action,
                f"{row.entity_type}/{row.entity_id}",
                row.version_id,
                detail,
                row.seq,
            )
        )
    refs = [f"{t}/{i}" for t, i in records]
    paths = (f"/api/v1/review/{task_id}", f"/api/v1/review/cases/{task_id}", f"/fhir/Task/{task_id}")
    reads, truncated = q.access_rows(tx, paths, refs)
    for r in reads:
        detail = f"{r['subtype']} {_path(str(r['query']))} -> {r['outcome']}"
        entries.append(
            Entry(
                str(r["recorded"]),
                str(r["sub"]) or "anonymous",
                "read",
                f"Task/{task_id}",
                None,
                detail,
                int(r["seq"]),
            )
        )
    # changes before reads at the same instant; each trail keeps its own order
    entries.sort(key=lambda e: (e.at, e.action == "read", e.seq))
    check = verify_trails(tx)
    integrity: dict[str, Any] = {"intact": check.ok, "summary": check.summary}
    if not check.ok:
        integrity["problem"] = check.problem
        integrity["broken_at"] = check.at
    return AuditLog(f"Task/{task_id}", case_id, entries, integrity, truncated)


# ---------------------------------------------------------------------------- PDF
def _latin1(text: str) -> str:
    """The core PDF fonts hold Latin-1 only: anything else becomes '?'."""
    return text.encode("latin-1", "replace").decode("latin-1")


def _line(pdf: FPDF, text: str, height: float, indent: float = 0) -> None:
    """One line of text at the left margin (plus ``indent``); wrapped only when it does not fit
    (``cell`` is many times cheaper than ``multi_cell``: a log of thousands of reads renders)."""
    pdf.set_x(pdf.l_margin + indent)
    text = _latin1(text)
    if pdf.get_string_width(text) <= pdf.epw - indent - 2 * pdf.c_margin:
        pdf.cell(0, height, text, new_x="LMARGIN", new_y="NEXT")
    else:
        pdf.multi_cell(0, height, text, new_x="LMARGIN", new_y="NEXT")


def render_pdf(log: AuditLog, generated_at: str) -> bytes:
    """The audit log as a PDF: a heading with the case and the trails' integrity, then one block per
    entry in order (number, time, actor, action, resource and version; the detail below)."""
    from fpdf import FPDF

    pdf = FPDF(orientation="L", unit="mm", format="A4")
    pdf.set_title(_latin1(f"Audit log of {log.case}"))
    pdf.set_creator("hms-ach")
    pdf.set_auto_page_break(auto=True, margin=12)
    pdf.add_page()
    pdf.set_font("Helvetica", "B", 13)
    _line(pdf, f"Audit log of case {log.case_id or '-'} ({log.case})", 7)
    pdf.set_font("Helvetica", "", 9)
    integrity = (
        "intact"
        if log.integrity.get("intact")
        else f"NOT intact (broken at {log.integrity.get('broken_at')})"
    )
    _line(pdf, f"Generated {generated_at}; {len(log.entries)} entries.", 5)
    _line(pdf, f"Audit trails: {integrity}. {log.integrity.get('summary', '')}", 5)
    if log.reads_truncated:
        _line(pdf, "Only the oldest reads are listed: there are more.", 5)
    pdf.ln(3)
    for n, e in enumerate(log.entries, 1):
        version = f" v{e.version}" if e.version is not None else ""
        pdf.set_font("Helvetica", "B", 9)
        _line(pdf, f"{n}. {e.at}  {e.action}  {e.resource}{version}  by {e.actor}", 5)
        pdf.set_font("Helvetica", "", 9)
        _line(pdf, e.detail, 5, indent=6)
    return bytes(pdf.output())
