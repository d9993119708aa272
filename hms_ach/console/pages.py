"""The console's pages and actions under ``/console`` (docs/console.md).

Each route checks its permission (:mod:`hms_ach.console.roles`) first; every POST checks the CSRF
token. What shows message content (the message list and one message) is recorded as an access;
what changes something (replay applied, retry, pause, resume, reload) is recorded too.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from starlette.responses import RedirectResponse, Response
from starlette.staticfiles import StaticFiles

from hms_ach.console import control, oidc, signin
from hms_ach.console.session import Session, SessionStore
from hms_ach.console.web import (
    STATIC_DIR,
    ConsoleRefusal,
    record_access,
    refusal_response,
    render,
    require,
    require_post,
)
from hms_ach.core.errors import MessageError
from hms_ach.fhir.replay import fhir_replayer
from hms_ach.hl7v2.parse import parse
from hms_ach.ingest.replay import ReplayReport, replay_messages, replayers
from hms_ach.mapping import goldens
from hms_ach.mapping.paths import CsvRecord
from hms_ach.mapping.preview import Preview, message_tree, preview, preview_csv_row, preview_fhir
from hms_ach.store import console_queries as q
from hms_ach.store import job_runs, messages, outbox
from hms_ach.store.access_log import AccessQuery, search_records
from hms_ach.store.audit import AuditQuery, actor_json, instant, search_trail
from hms_ach.store.db import Store

router = APIRouter(prefix="/console", include_in_schema=False)
STATUSES = ("processed", "error", "rejected", "duplicate", "received")


def _store(request: Request) -> Store:
    store: Store = request.app.state.store
    return store


def _engine(request: Request) -> control.ConsoleEngine:
    engine: control.ConsoleEngine | None = getattr(request.app.state, "console_engine", None)
    if engine is None:
        raise ConsoleRefusal(503, "no engine runs behind this app: start it with hms-ach run")
    return engine


def _parse_time(text: str, field: str) -> datetime | None:
    if not text.strip():
        return None
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError as exc:
        raise ConsoleRefusal(
            400, f"{field}: {text!r} is not a date or time (expected 2026-12-01 or 2026-12-01T08:00)"
        ) from exc
    return value if value.tzinfo else value.replace(tzinfo=UTC)


# ---------------------------------------------------------------------- dashboard
async def _dashboard_context(request: Request) -> dict[str, Any]:
    store = _store(request)
    engine: control.ConsoleEngine | None = getattr(request.app.state, "console_engine", None)
    now = datetime.now(UTC)
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)

    def read() -> tuple[Any, Any, Any, Any]:
        with store.read() as conn:
            return (
                q.channel_figures(conn, today),
                q.last_received(conn),
                q.sink_figures(conn, now),
                job_runs.last_runs(conn),
            )

    figures, last, sinks, runs = await asyncio.to_thread(read)
    channels = []
    for name, channel in (engine.channels if engine else {}).items():
        switch = control.pause_switch(channel)
        fig = figures.get(name) or q.ChannelFigures(name)
        channels.append(
            {
                "name": name,
                "type": control.channel_type(channel),
                "state": "paused" if switch and switch.paused else "running",
                "connections": control.connection_count(channel),
                "fig": fig,
                "last": last.get(name),
            }
        )
    sink_rows = []
    for s in engine.config.sinks if engine else []:
        sink_rows.append(sinks.get(s.name) or q.SinkFigures(s.name))
    jobs = []
    scheduler = engine.scheduler if engine else None
    if scheduler is not None:
        for name in sorted(scheduler.jobs):
            run = runs.get(name)
            jobs.append({"name": name, "next": scheduler.next_run(name), "run": run})
    readiness = request.app.state.readiness
    failed = await readiness() if readiness is not None else {}
    return {"channels": channels, "sinks": sink_rows, "jobs": jobs, "failed": failed, "now": now}


@router.get("")
async def dashboard(request: Request) -> Response:
    session = require(request, "dashboard.read")
    return render(request, "dashboard.html", session=session, **await _dashboard_context(request))


@router.get("/fragments/dashboard")
async def dashboard_fragment(request: Request) -> Response:
    session = require(request, "dashboard.read")
    return render(request, "dashboard_panel.html", session=session, **await _dashboard_context(request))


# ---------------------------------------------------------------------- messages
def _filter(request: Request) -> q.MessageFilter:
    p = request.query_params
    status = p.get("status", "")
    if status and status not in STATUSES:
        raise ConsoleRefusal(400, f"status {status!r}: expected one of {', '.join(STATUSES)}")
    return q.MessageFilter(
        channel=p.get("channel", "").strip(),
        message_type=p.get("type", "").strip(),
        status=status,
        control_id=p.get("control_id", "").strip(),
        since=_parse_time(p.get("since", ""), "since"),
        until=_parse_time(p.get("until", ""), "until"),
        patient=p.get("patient", "").strip(),
    )


async def _search(request: Request) -> tuple[q.MessageFilter, list[dict[str, Any]]]:
    f = _filter(request)
    store = _store(request)

    def read() -> list[dict[str, Any]]:
        with store.read() as conn:
            return q.search_messages(conn, f)

    rows = await asyncio.to_thread(read)
    record_access(request, "search-type", "Message", [f"Message/{r['id']}" for r in rows], len(rows))
    return f, rows


@router.get("/messages")
async def message_list(request: Request) -> Response:
    session = require(request, "messages.read")
    f, rows = await _search(request)
    fragment = request.url.path + "/rows?" + request.url.query
    return render(
        request, "messages.html", session=session, f=f, rows=rows, statuses=STATUSES,
        live=request.query_params.get("live") == "1", fragment=fragment,
    )  # fmt: skip


@router.get("/messages/rows")
async def message_rows(request: Request) -> Response:
    session = require(request, "messages.read")
    _f, rows = await _search(request)
    return render(request, "message_rows.html", session=session, rows=rows)


def _lineage(
    engine: control.ConsoleEngine | None, row: messages.StoredMessage
) -> tuple[list[Any], list[str], str]:
    """The message tree, and the lineage of its mapping under the current mappings (HL7 v2 only)."""
    if row.content_type != "hl7v2":
        return [], [], ""
    try:
        msg = parse(row.raw)
    except MessageError as exc:
        return [], [], f"the stored bytes do not parse: {exc}"
    tree = message_tree(msg)
    if engine is None:
        return tree, [], ""
    try:
        pv = preview(engine.pipeline.engine, msg)
    except MessageError as exc:
        return tree, [], f"the current mappings refuse it: {exc}"
    return tree, [str(lin) for rec in pv.result.records for lin in rec.lineage], ""


@router.get("/messages/{message_id}")
async def message_view(request: Request, message_id: int) -> Response:
    session = require(request, "messages.read")
    store = _store(request)

    def read() -> tuple[messages.StoredMessage | None, list[dict[str, Any]]]:
        with store.read() as conn:
            row = messages.get(conn, message_id)
            return row, (messages.versions_written(conn, message_id) if row else [])

    row, written = await asyncio.to_thread(read)
    if row is None:
        raise ConsoleRefusal(404, f"message {message_id}: no such message")
    engine: control.ConsoleEngine | None = getattr(request.app.state, "console_engine", None)
    tree, lineage, problem = await asyncio.to_thread(_lineage, engine, row)
    records = [
        {
            "reference": f"{v['resource_type']}/{v['id']}",
            "version": v["version_id"],
            "deleted": v["deleted"],
            "json": json.dumps(json.loads(v["resource"]), indent=2, ensure_ascii=False)
            if v["resource"]
            else "",
        }
        for v in written
    ]
    record_access(
        request, "read", "Message", [f"Message/{message_id}"] + [r["reference"] for r in records], 1
    )
    raw_text = row.raw.decode("utf-8", errors="replace").replace("\r", "\n")
    return render(
        request, "message.html", session=session, m=row, tree=tree, lineage=lineage, problem=problem,
        records=records, raw=raw_text, ack=(row.ack or "").replace("\r", "\n"),
    )  # fmt: skip


def _replay(request: Request, message_id: int, apply: bool, who: str) -> list[ReplayReport]:
    engine = _engine(request)
    table = {
        **replayers(engine.pipeline.engine, control.hl7_policies(engine)),
        "fhir+json": fhir_replayer(engine.pipeline.engine, control.bundle_limit(engine)),
    }
    actor = actor_json(kind="console", command="replay", user=who)
    return replay_messages(_store(request), [message_id], table, apply=apply, actor=actor)


@router.post("/messages/{message_id}/replay")
async def replay(request: Request, message_id: int) -> Response:
    session, form = await require_post(request, "messages.replay_preview")
    apply = form.get("apply") == "1"
    if apply:
        session = require(request, "messages.replay_apply")
    reports = await asyncio.to_thread(_replay, request, message_id, apply, session.caller.sub)
    record_access(
        request, "replay" if apply else "replay-dry-run", "Message", [f"Message/{message_id}"], len(reports)
    )
    return render(
        request, "replay.html", session=session, message_id=message_id, reports=reports, applied=apply
    )


# ---------------------------------------------------------------------- outbox
@router.get("/outbox")
async def outbox_page(request: Request) -> Response:
    session = require(request, "outbox.read")
    sink = request.query_params.get("sink", "")
    status = request.query_params.get("status", "")
    if status and status not in ("pending", "delivered", "dead"):
        raise ConsoleRefusal(400, f"status {status!r}: expected pending, delivered or dead")
    store = _store(request)

    def read() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        with store.read() as conn:
            return outbox.summary(conn), outbox.list_rows(conn, status or None, sink or None, limit=100)

    summary, rows = await asyncio.to_thread(read)
    return render(
        request, "outbox.html", session=session, summary=summary, rows=rows, sink=sink, row_status=status
    )


@router.post("/outbox/{row_id}/retry")
async def outbox_retry(request: Request, row_id: int) -> Response:
    await require_post(request, "outbox.retry")
    store = _store(request)

    def write() -> int:
        with store.transaction() as conn:
            return outbox.retry(conn, row_id)

    count = await asyncio.to_thread(write)
    if not count:
        raise ConsoleRefusal(409, f"outbox row {row_id}: not found, or already pending")
    record_access(request, "retry", "Outbox", [f"Outbox/{row_id}"], count)
    return RedirectResponse(f"/console/outbox?retried={row_id}", status_code=303)


# ---------------------------------------------------------------------- mapping workbench
def _previews(engine: control.ConsoleEngine, kind: str, dataset: str, sample: str) -> list[Preview | str]:
    mapper = engine.pipeline.engine
    out: list[Preview | str] = []
    if kind == "fhir":
        try:
            resource = json.loads(sample)
        except ValueError as exc:
            return [f"not JSON: {exc}"]
        if not isinstance(resource, dict):
            return ["expected one FHIR resource (a JSON object)"]
        return [preview_fhir(mapper, resource)]
    if kind == "csv":
        if not dataset:
            return ["a CSV sample needs its dataset (the CSV mapping's name)"]
        reader = csv.DictReader(io.StringIO(sample.strip()))
        for values in reader:
            record = CsvRecord(
                {k: v or "" for k, v in values.items() if k is not None},
                reader.line_num,
                "sample",
                list(values),
            )
            out.append(preview_csv_row(mapper, dataset, record))
        return out or ["no data row: give the header line and at least one row"]
    text = sample.strip().replace("\r\n", "\r").replace("\n", "\r")
    return [preview(mapper, parse(text.encode("utf-8")))]


def _workbench(request: Request, session: Session, **shown: Any) -> Response:
    """The workbench page: the form (``kind``, ``dataset``, ``sample``), ``previews`` and ``results``."""
    page: dict[str, Any] = {"kind": "hl7", "dataset": "", "sample": "", "previews": [], "results": None}
    return render(request, "workbench.html", session=session, **(page | shown))


@router.get("/workbench")
def workbench(request: Request) -> Response:
    return _workbench(request, require(request, "workbench.use"))


@router.post("/workbench")
async def workbench_preview(request: Request) -> Response:
    session, form = await require_post(request, "workbench.use")
    engine = _engine(request)
    kind = form.get("kind", "hl7")
    if kind not in ("hl7", "csv", "fhir"):
        raise ConsoleRefusal(400, f"kind {kind!r}: expected hl7, csv or fhir")
    sample, dataset = form.get("sample", ""), form.get("dataset", "").strip()
    try:
        previews = await asyncio.to_thread(_previews, engine, kind, dataset, sample)
    except MessageError as exc:
        previews = [f"{exc.ack_code} {exc.code} at {exc.location or '-'}: {exc.message}"]
    shown = [
        {"text": p}
        if isinstance(p, str)
        else {"pv": p, "lineage": [str(x) for r in p.result.records for x in r.lineage]}
        for p in previews
    ]
    return _workbench(request, session, kind=kind, dataset=dataset, sample=sample, previews=shown)


@router.post("/workbench/goldens")
async def workbench_goldens(request: Request) -> Response:
    session, _form = await require_post(request, "workbench.use")
    engine = _engine(request)

    def run() -> list[goldens.CaseResult]:
        results: list[goldens.CaseResult] = []
        for f in goldens.discover(engine.config.mappings_dir):
            results.extend(goldens.run_golden_file(f, engine.mappings, Path.cwd(), parse))
        return results

    return _workbench(request, session, results=await asyncio.to_thread(run))


# ---------------------------------------------------------------------- channel control
@router.get("/channels")
async def channels_page(request: Request) -> Response:
    session = require(request, "channels.control")
    engine = _engine(request)
    rows = []
    for name, channel in engine.channels.items():
        switch = control.pause_switch(channel)
        rows.append({"name": name, "type": control.channel_type(channel), "pausable": switch is not None,
                     "paused": bool(switch and switch.paused)})  # fmt: skip
    reload = request.query_params.get("reload", "")
    return render(request, "channels.html", session=session, rows=rows, reload=reload)


@router.post("/channels/{name}/{action}")
async def channel_action(request: Request, name: str, action: str) -> Response:
    await require_post(request, "channels.control")
    engine = _engine(request)
    if action not in ("pause", "resume"):
        raise ConsoleRefusal(404, f"channel action {action!r}: expected pause or resume")
    channel = engine.channels.get(name)
    switch = control.pause_switch(channel) if channel is not None else None
    if switch is None:
        raise ConsoleRefusal(
            404, f"channel {name!r}: not running, or its type cannot pause (mllp, sftp_csv, file_drop can)"
        )
    switch.pause() if action == "pause" else switch.resume()
    record_access(request, action, "Channel", [f"Channel/{name}"])
    return RedirectResponse("/console/channels", status_code=303)


@router.post("/reload")
async def reload_mappings(request: Request) -> Response:
    await require_post(request, "channels.control")
    engine = _engine(request)
    ok = await engine.reload_mappings_off_loop()  # compiled in a thread, swapped on the loop
    record_access(request, "reload", "Mappings", [], 1 if ok else 0)
    return RedirectResponse(f"/console/channels?reload={'ok' if ok else 'failed'}", status_code=303)


# ---------------------------------------------------------------------- audit
@router.get("/audit")
async def audit_page(request: Request) -> Response:
    session = require(request, "audit.read")
    entity = request.query_params.get("entity", "").strip()
    user = request.query_params.get("user", "").strip()
    verify = request.query_params.get("verify") == "1"
    store = _store(request)

    def read() -> tuple[list[dict[str, Any]], list[dict[str, Any]], q.ChainCheck | None]:
        changes, _ = search_trail(store, AuditQuery(entity=entity or None, agent=user or None, limit=100))
        accesses, _ = search_records(
            store, AccessQuery(entity=entity or None, agent=user or None, since=_recent(), limit=100)
        )
        check = None
        if verify:
            with store.read() as conn:
                check = q.verify_trails(conn)
        return changes, accesses, check

    changes, accesses, check = await asyncio.to_thread(read)
    return render(request, "audit.html", session=session, entity=entity, who=user, changes=changes,
                  accesses=accesses, check=check)  # fmt: skip


def _recent() -> str:
    return instant(datetime.now(UTC) - timedelta(days=30))


def install_console(app: FastAPI) -> None:
    """Mount the console on ``app`` (its store is ``app.state.store``): the pages, the static files,
    the session store and the answer to a refused console request."""
    app.state.console_sessions = SessionStore()
    app.state.console_logins = oidc.LoginFlows()
    app.include_router(signin.router)
    app.include_router(router)
    app.mount("/console/static", StaticFiles(directory=STATIC_DIR), name="console-static")

    async def refused(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ConsoleRefusal)
        return refusal_response(request, exc)

    app.add_exception_handler(ConsoleRefusal, refused)
