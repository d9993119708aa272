"""Bulk Data Access IG v2 ``$export``: kick-off, status, cancel, the NDJSON files, and the worker.

* **Kick-off** (``GET /fhir/$export`` system level, ``GET /fhir/Patient/$export`` patient level,
  ``GET /fhir/Group/<id>/$export`` group level; or ``POST`` to the same URL with the parameters in a
  ``Parameters`` body, :func:`post_params`) needs ``Prefer: respond-async`` and a token whose
  ``system/`` scopes allow reading and searching the types exported (``system/*.read``, v2
  ``system/*.rs``), and Group too for a group export. It stores the request as a ``bulk_export``
  row and answers 202 with ``Content-Location`` (the status URL). A group export holds the
  compartments of the Group's Patient members as they are at kick-off (:func:`member_patients`: a
  member marked ``inactive`` is left out, one that is not a Patient ignored); an unknown Group is
  404.
* **Status** (``GET /fhir/$export-status/<id>``): 202 with ``X-Progress`` and ``Retry-After`` while
  the export runs; 200 with the completion manifest when done; 500 with an OperationOutcome when it
  failed. ``DELETE`` on it cancels the export and deletes its files (202); then it is 404.
* **Files** (``GET /fhir/$export-file/<id>/<Type>.ndjson``): ``application/fhir+ndjson``, one
  resource per line. Only the caller that kicked the export off (same ``sub`` and client) may poll
  it or read its files; anyone else gets 404.
* **The worker** (:class:`ExportManager`, one thread per engine) writes each type's file from the
  store in id order, :attr:`ExportSettings.batch_size` records at a time, and after each batch
  commits where it is (the type, the last id written, the file's length), so memory stays bounded
  whatever the size, and an engine stopped or killed mid-export resumes it on its next start:
  the file is cut back to the committed length and the export goes on after the committed id.
  Exports older than :attr:`ExportSettings.retention_hours` are deleted with their files.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import orjson
from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import FileResponse, Response

from hms_ach.auth.caller import REQUEST_STATE_ATTRIBUTE, Caller
from hms_ach.auth.errors import challenge, insufficient_scope
from hms_ach.core.records import FHIR_SERVED
from hms_ach.fhir import audit_events
from hms_ach.fhir import read as reads
from hms_ach.fhir.bundles import instant
from hms_ach.fhir.everything import asked_types, patient_params
from hms_ach.fhir.outcomes import FhirError, operation_outcome
from hms_ach.store import export_queries, record_reads
from hms_ach.store.db import Store
from hms_ach.store.export_queries import Pointing, Slice
from hms_ach.store.search_params import date_range

log = logging.getLogger("hms_ach.fhir.export")

NDJSON = "application/fhir+ndjson"
OUTPUT_FORMATS = {"application/fhir+ndjson", "application/ndjson", "ndjson"}
KICK_OFF_PARAMS = {"_type", "_since", "_outputFormat"}
#: The operations' canonical definitions (declared in the CapabilityStatement).
DEFINITIONS = {
    "system": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export",
    "patient": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/patient-export",
    "group": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/group-export",
}
#: The most Patient members a group export takes (their ids are bound values of one query).
MAX_GROUP_MEMBERS = 10000
SYSTEM_SCOPE = "system/*.read"


class ExportSettings(BaseModel):
    """``bulk_export:`` in channels.yaml: the Bulk Data ``$export`` worker."""

    model_config = ConfigDict(extra="forbid")

    retention_hours: float = Field(
        24.0, gt=0, description="An export and its files are deleted this long after its kick-off"
    )
    batch_size: int = Field(
        1000,
        ge=1,
        le=100000,
        description="Records read, written and committed as progress at a time (bounds the memory)",
    )
    lease_seconds: float = Field(
        60.0,
        gt=0,
        description="How long a running export stays with the engine writing it without progress; past "
        "it another start (or instance) takes it over and resumes it",
    )
    retry_after_seconds: int = Field(2, ge=1, description="The Retry-After of a status answer while running")


# ---------------------------------------------------------------------------- the caller
def caller_of(request: Request) -> Caller:
    caller: Any = getattr(request.state, REQUEST_STATE_ATTRIBUTE, None)
    if not isinstance(caller, Caller):
        raise FhirError(
            401, "login", "no authenticated caller", headers={"WWW-Authenticate": 'Bearer realm="hms-ach"'}
        )
    return caller


def exportable(caller: Caller, resource_type: str) -> bool:
    """Whether the caller's ``system/`` scopes allow reading and searching ``resource_type``."""
    scopes = [s for s in caller.scopes.resource if s.context == "system"]
    return any(s.covers(resource_type, "read") for s in scopes) and any(
        s.covers(resource_type, "search") for s in scopes
    )


def _refusal(resource_type: str) -> FhirError:
    error = insufficient_scope(f"a bulk export of {resource_type} needs a system/ read scope", SYSTEM_SCOPE)
    _status, headers = challenge(error)
    return FhirError(
        403, "forbidden", f"{error.description}; it needs a scope like {SYSTEM_SCOPE}", headers=headers
    )


def _own(row: dict[str, Any] | None, caller: Caller, export_id: str) -> dict[str, Any]:
    """The export row when the caller kicked it off; 404 otherwise (someone else's is not known)."""
    if row is None or row["sub"] != caller.sub or row["client_id"] != caller.client_id:
        raise FhirError(404, "not-found", f"export {export_id[:64]!r} is not known")
    return row


def _manager(request: Request) -> ExportManager:
    manager = getattr(request.app.state, "exports", None)
    if not isinstance(manager, ExportManager):
        raise FhirError(501, "not-supported", "bulk export runs only in the engine (hms-ach run)")
    return manager


# ---------------------------------------------------------------------------- kick-off
def candidate_types(kind: str) -> list[str]:
    """The types a ``kind`` export may hold: every served type (system), or the Patient and the types
    that refer to a patient (patient, group)."""
    if kind == "system":
        return list(FHIR_SERVED)
    return [t for t in FHIR_SERVED if t == "Patient" or patient_params(t)]


#: The largest Parameters body a POST kick-off may carry.
MAX_PARAMETERS_BYTES = 65536


def post_params(request: Request, body: bytes) -> list[tuple[str, str]]:
    """The kick-off parameters of ``POST [base]/$export`` (or ``Patient/$export``): a FHIR
    ``Parameters`` body, each ``parameter`` a name and one string-like ``value[x]`` (``_type`` may
    repeat). An empty body asks for everything. Query parameters are refused: a POST takes them from
    its body only."""
    if request.query_params:
        raise FhirError(
            400, "invalid", "a POST kick-off takes its parameters from its Parameters body, not the URL"
        )
    if not body.strip():
        return []
    if len(body) > MAX_PARAMETERS_BYTES:
        raise FhirError(413, "too-costly", f"the Parameters body exceeds {MAX_PARAMETERS_BYTES} bytes")
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind not in ("application/fhir+json", "application/json"):
        raise FhirError(
            415, "not-supported", f"content type {kind[:64]!r}: expected application/fhir+json Parameters"
        )
    try:
        parsed: Any = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise FhirError(400, "structure", f"the body is not JSON: {exc}; expected Parameters") from None
    if not isinstance(parsed, dict) or parsed.get("resourceType") != "Parameters":
        raise FhirError(400, "structure", "the body must be a Parameters resource", expression="Parameters")
    entries = parsed.get("parameter", [])
    if not isinstance(entries, list):
        raise FhirError(
            400, "structure", "Parameters.parameter must be a list", expression="Parameters.parameter"
        )
    params: list[tuple[str, str]] = []
    for i, entry in enumerate(entries):
        where = f"Parameters.parameter[{i}]"
        values = [v for k, v in entry.items() if k.startswith("value")] if isinstance(entry, dict) else []
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or len(values) != 1 or not isinstance(values[0], str):
            raise FhirError(
                400,
                "structure",
                f"{where}: expected a name and one string value (valueString, valueInstant...)",
                expression=where,
            )
        params.append((name, values[0]))
    return params


def member_patients(group: dict[str, Any], base: str) -> list[str]:
    """The ids of the Patients ``group`` has as members: each ``member.entity`` that refers to a
    Patient (``Patient/<id>``, or absolute on ``base``; a ``_history`` suffix dropped), unless the
    member is ``inactive``. Sorted, each once."""
    ids: set[str] = set()
    for member in group.get("member") or []:
        if not isinstance(member, dict) or member.get("inactive") is True:
            continue
        entity = member.get("entity")
        ref = entity.get("reference") if isinstance(entity, dict) else None
        if not isinstance(ref, str):
            continue
        ref = ref.split("/_history/")[0]
        if ref.startswith(base + "/"):
            ref = ref[len(base) + 1 :]
        rtype, _, rid = ref.partition("/")
        if rtype == "Patient" and rid and "/" not in rid:
            ids.add(rid)
    return sorted(ids)


def _group_patients(store: Store, caller: Caller, group_id: str, base: str) -> list[str]:
    """The Patient members of ``Group/group_id`` for a group export (403 without a Group scope, 404
    for an unknown or deleted Group)."""
    if not exportable(caller, "Group"):
        raise _refusal("Group")
    with store.read() as conn:
        found = record_reads.stored(conn, f"Group/{group_id}")
    if found is None or found.deleted or found.version_id == 0:
        raise FhirError(404, "not-found", f"Group {group_id[:64]!r} is not known")
    patients = member_patients(found.content, base)
    if len(patients) > MAX_GROUP_MEMBERS:
        raise FhirError(
            422,
            "too-costly",
            f"Group {group_id[:64]!r} has {len(patients)} Patient members; a group export takes at "
            f"most {MAX_GROUP_MEMBERS}",
        )
    return patients


def kick_off(
    request: Request,
    store: Store,
    kind: str,
    posted: list[tuple[str, str]] | None = None,
    group_id: str | None = None,
) -> Response:
    """``GET [base]/$export``, ``GET [base]/Patient/$export`` or ``GET [base]/Group/<group_id>/$export``
    (the parameters in the query), or the same URL POSTed with the parameters of ``posted``
    (:func:`post_params`): 202 with the status URL."""
    manager = _manager(request)
    caller = caller_of(request)
    base = str(request.base_url).rstrip("/") + "/fhir"
    patients = _group_patients(store, caller, group_id or "", base) if kind == "group" else None
    prefer = [p.strip().lower() for p in request.headers.get("prefer", "").split(",")]
    if "respond-async" not in prefer:
        raise FhirError(400, "invalid", "a bulk export needs the header 'Prefer: respond-async'")
    params = list(request.query_params.multi_items()) if posted is None else posted
    unknown = sorted({k for k, _v in params} - KICK_OFF_PARAMS)
    if unknown:
        raise FhirError(
            400,
            "not-supported",
            f"parameter {unknown[0][:64]!r} is not supported by $export; supported: "
            f"{', '.join(sorted(KICK_OFF_PARAMS))}",
            expression=unknown[0][:64],
        )
    fmt = next((v for k, v in params if k == "_outputFormat" and v), None)
    if fmt is not None and fmt.strip().lower() not in OUTPUT_FORMATS:
        raise FhirError(
            400,
            "not-supported",
            f"_outputFormat={fmt[:64]!r} is not supported; use application/fhir+ndjson",
            expression="_outputFormat",
        )
    candidates = candidate_types(kind)
    named = asked_types(params)
    if named is not None:
        outside = [t for t in named if t not in candidates]
        if outside:
            raise FhirError(
                400, "invalid", f"{outside[0]} is not in a patient compartment export", expression="_type"
            )
        refused = [t for t in named if not exportable(caller, t)]
        if refused:
            raise _refusal(refused[0])
        types = named
    else:
        types = [t for t in candidates if exportable(caller, t)]
        if not types:
            raise _refusal("*")
    since = None
    raw_since = next((v for k, v in params if k == "_since" and v), None)
    if raw_since is not None:
        try:
            since, _hi = date_range(raw_since.replace(" ", "+"))
        except ValueError as exc:
            raise FhirError(
                400, "invalid", f"_since: {exc}; expected an instant", expression="_since"
            ) from None
    export_id = uuid.uuid4().hex
    progress: dict[str, Any] = {"index": 0, "after": None, "offset": 0, "count": 0, "output": []}
    if patients is not None:
        progress["patients"] = patients  # the members at kick-off: a resumed export keeps them
    now = datetime.now(UTC)
    row = {
        "id": export_id,
        "status": "accepted",
        "kind": kind,
        "sub": caller.sub,
        "client_id": caller.client_id,
        "request": str(request.url),
        "base": base,
        "types": orjson.dumps(types).decode(),
        "since": since,
        "transaction_time": now,
        "directory": str(manager.root / export_id),
        "progress": orjson.dumps(progress).decode(),
        "created_at": now,
    }
    with store.transaction() as tx:
        export_queries.insert_export(tx, row)
    manager.wake()
    log.info("export.accepted", extra={"export": export_id, "kind": kind, "types": len(types)})
    return Response(status_code=202, headers={"Content-Location": f"{base}/$export-status/{export_id}"})


# ---------------------------------------------------------------------------- status, cancel, files
def _utc(value: datetime) -> datetime:
    """A stored instant in UTC (SQLite gives them back without a zone)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _progress(row: dict[str, Any]) -> dict[str, Any]:
    progress: dict[str, Any] = orjson.loads(row["progress"] or "{}")
    return progress


def status(request: Request, store: Store, export_id: str) -> Response:
    manager = _manager(request)
    with store.read() as conn:
        row = _own(export_queries.export_row(conn, export_id), caller_of(request), export_id)
    progress = _progress(row)
    types: list[str] = orjson.loads(row["types"])
    if row["status"] in ("accepted", "running"):
        done = min(int(progress.get("index", 0)), len(types))
        written = sum(int(o["count"]) for o in progress.get("output", [])) + int(progress.get("count", 0))
        text = f"{row['status']}: {done} of {len(types)} types done, {written} resources written"
        headers = {"X-Progress": text, "Retry-After": str(manager.settings.retry_after_seconds)}
        return Response(status_code=202, headers=headers)
    if row["status"] == "failed":
        outcome = operation_outcome("exception", f"the export failed: {row['error'] or 'unknown error'}")
        return reads.fhir_response(orjson.dumps(outcome), 500)
    base = row["base"]
    manifest = {
        "transactionTime": instant(row["transaction_time"]),
        "request": row["request"],
        "requiresAccessToken": True,
        "output": [
            {"type": o["type"], "url": f"{base}/$export-file/{export_id}/{o['file']}", "count": o["count"]}
            for o in progress.get("output", [])
        ],
        "error": [],
    }
    expires = _utc(row["created_at"]) + timedelta(hours=manager.settings.retention_hours)
    headers = {"Expires": format_datetime(expires, usegmt=True)}
    return Response(orjson.dumps(manifest), 200, headers=headers, media_type="application/json")


def cancel(request: Request, store: Store, export_id: str) -> Response:
    """``DELETE`` on the status URL: the export is cancelled and its files deleted (202)."""
    manager = _manager(request)
    with store.read() as conn:
        row = _own(export_queries.export_row(conn, export_id), caller_of(request), export_id)
    with store.transaction() as tx:
        export_queries.delete_export(tx, export_id)
    manager.remove_files(row["directory"])
    log.info("export.cancelled", extra={"export": export_id})
    return Response(status_code=202)


def download(request: Request, store: Store, export_id: str, name: str) -> Response:
    """One NDJSON file of a complete export, to the caller that kicked it off; recorded as an access
    (the type and the number of resources handed out)."""
    _manager(request)
    caller = caller_of(request)
    with store.read() as conn:
        row = _own(export_queries.export_row(conn, export_id), caller, export_id)
    output = next((o for o in _progress(row).get("output", []) if o["file"] == name), None)
    if row["status"] != "complete" or output is None:
        raise FhirError(404, "not-found", f"export {export_id[:64]!r} has no file {name[:64]!r}")
    path = Path(row["directory"]) / output["file"]
    if not path.is_file():
        raise FhirError(404, "not-found", f"the file {name[:64]!r} of export {export_id[:64]!r} was deleted")
    audit_events.record_access(request, "export", output["type"], 200, (), int(output["count"]))
    return FileResponse(path, media_type=NDJSON)


# ---------------------------------------------------------------------------- the worker
def export_slice(
    kind: str, resource_type: str, since: datetime | None, patients: list[str] | None = None
) -> Slice:
    """What an export of ``kind`` reads of ``resource_type``; a group export, the compartments of
    ``patients`` only."""
    members = tuple(patients or ()) if kind == "group" else None
    if kind in ("patient", "group") and resource_type != "Patient":
        pointing = Pointing(patient_params(resource_type), "Patient", members)
        return Slice(resource_type, since, pointing=(pointing,))
    if members is not None:
        return Slice(resource_type, since, ids=members)
    return Slice(resource_type, since)


def _ndjson_line(text: str) -> bytes:
    """One resource as one NDJSON line (stored JSON is compact; re-encoded if it ever holds a newline)."""
    if "\n" in text or "\r" in text:
        return orjson.dumps(orjson.loads(text)) + b"\n"
    return text.encode() + b"\n"


class _Cancelled(Exception):
    """The export's row went away (DELETE) or another worker took it over."""


class _Stopping(Exception):
    """The engine stops: the export is left to resume on the next start."""


@dataclass
class ExportManager:
    """Runs the exports of one store on one thread; :meth:`start` at engine start, :meth:`stop`
    before the store closes (a running export is left to resume)."""

    store: Store
    root: Path
    settings: ExportSettings = field(default_factory=ExportSettings)
    cleanup_every_seconds: float = 600.0

    def __post_init__(self) -> None:
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_cleanup = 0.0

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._stopping.clear()
        self._thread = threading.Thread(target=self._loop, name="bulk-export", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def wake(self) -> None:
        self._wake.set()

    def remove_files(self, directory: str) -> None:
        """Delete an export's directory (only ever one under :attr:`root`)."""
        path = Path(directory).resolve()
        if path.parent == self.root.resolve() and path.exists():
            shutil.rmtree(path, ignore_errors=True)

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self._cleanup()
                self.run_pending()
            except Exception as exc:  # the thread must survive a store outage; it retries on the next wake
                log.error("export.worker_failed", extra={"error": type(exc).__name__})
            self._wake.wait(5.0)
            self._wake.clear()

    def _cleanup(self) -> None:
        now = datetime.now(UTC)
        if now.timestamp() - self._last_cleanup < self.cleanup_every_seconds:
            return
        self._last_cleanup = now.timestamp()
        cutoff = now - timedelta(hours=self.settings.retention_hours)
        with self.store.read() as conn:
            old = export_queries.expired(conn, cutoff)
        for export_id, directory in old:
            with self.store.transaction() as tx:
                export_queries.delete_export(tx, export_id)
            self.remove_files(directory)
        if old:
            log.info("export.expired_deleted", extra={"count": len(old)})

    def run_pending(self) -> None:
        """Run every export waiting for a worker, oldest first, until none is left or the engine stops."""
        while not self._stopping.is_set():
            now = datetime.now(UTC)
            with self.store.read() as conn:
                waiting = export_queries.claimable(conn, now)
            taken = None
            for export_id in waiting:
                with self.store.transaction() as tx:
                    if export_queries.claim(tx, export_id, now, self._lease()):
                        taken = export_id
                        break
            if taken is None:
                return
            self._run(taken)

    def _lease(self) -> datetime:
        return datetime.now(UTC) + timedelta(seconds=self.settings.lease_seconds)

    def _save(self, export_id: str, progress: dict[str, Any], lease: datetime | None) -> None:
        with self.store.transaction() as tx:
            if not export_queries.save_progress(tx, export_id, orjson.dumps(progress).decode(), lease):
                raise _Cancelled

    def _run(self, export_id: str) -> None:
        with self.store.read() as conn:
            row = export_queries.export_row(conn, export_id)
        if row is None:
            return
        progress = _progress(row)
        directory = Path(row["directory"])
        try:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            types: list[str] = orjson.loads(row["types"])
            since = _utc(row["since"]) if row["since"] is not None else None
            while int(progress.get("index", 0)) < len(types):
                self._write_type(
                    export_id, row["kind"], types[int(progress["index"])], since, directory, progress
                )
            with self.store.transaction() as tx:
                export_queries.finish(
                    tx, export_id, "complete", orjson.dumps(progress).decode(), datetime.now(UTC), None
                )
            log.info("export.complete", extra={"export": export_id, "files": len(progress["output"])})
        except _Cancelled:
            self.remove_files(str(directory))
            log.info("export.stopped_cancelled", extra={"export": export_id})
        except _Stopping:
            log.info("export.paused", extra={"export": export_id, "type_index": progress.get("index")})
        except Exception as exc:
            with self.store.read() as conn:
                if export_queries.export_row(conn, export_id) is None:  # cancelled meanwhile
                    self.remove_files(str(directory))
                    return
            log.error("export.failed", extra={"export": export_id, "error": type(exc).__name__})
            with self.store.transaction() as tx:
                export_queries.finish(
                    tx,
                    export_id,
                    "failed",
                    orjson.dumps(progress).decode(),
                    datetime.now(UTC),
                    f"{type(exc).__name__} while writing the files",
                )

    def _write_type(
        self,
        export_id: str,
        kind: str,
        rtype: str,
        since: datetime | None,
        directory: Path,
        progress: dict[str, Any],
    ) -> None:
        """Write (or go on writing) ``rtype``'s file, committing ``progress`` after each batch."""
        path = directory / f"{rtype}.ndjson"
        offset = int(progress.get("offset", 0))
        if not path.exists() or path.stat().st_size < offset:  # lost since the last commit: start over
            offset, progress["after"], progress["count"] = 0, None, 0
        s = export_slice(kind, rtype, since, progress.get("patients"))
        with open(path, "r+b" if path.exists() else "wb") as out:
            out.truncate(offset)
            out.seek(offset)
            while True:
                if self._stopping.is_set():
                    self._save(export_id, progress, None)  # released: the next start resumes at once
                    raise _Stopping
                with self.store.read() as conn:
                    rows = export_queries.page(conn, s, progress.get("after"), self.settings.batch_size)
                if not rows:
                    break
                out.write(b"".join(_ndjson_line(text) for _rid, text in rows))
                out.flush()
                os.fsync(out.fileno())
                progress.update(
                    after=rows[-1][0], offset=out.tell(), count=int(progress["count"]) + len(rows)
                )
                self._save(export_id, progress, self._lease())
                del rows
        if int(progress["count"]):
            progress["output"].append({"type": rtype, "file": path.name, "count": int(progress["count"])})
        else:
            path.unlink(missing_ok=True)  # no record of this type: no file (Bulk Data: omit it)
        progress.update(index=int(progress["index"]) + 1, after=None, offset=0, count=0)
        self._save(export_id, progress, self._lease())
