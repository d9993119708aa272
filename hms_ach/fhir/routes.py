"""The FHIR R4 REST API at ``/fhir``: the one route table.

Every FHIR route is declared here, in matching order; the handlers live in their modules:

=====================================  ==========================================================
``GET /fhir/metadata``                 :mod:`hms_ach.fhir.capability`
``GET /fhir/AuditEvent[/id]``          :mod:`hms_ach.fhir.audit_events` (before the record types)
``$everything``, ``$export``, status,  :mod:`hms_ach.fhir.operations` (before the record types)
files
``POST /fhir``, ``POST|PUT /fhir/T``,  :mod:`hms_ach.fhir.write_requests` (with a ``fhir_rest``
``PUT|PATCH|DELETE /fhir/T/id``        channel; 405 without one)
``GET /fhir``, ``/fhir/_history``      :mod:`hms_ach.fhir.read` (system search ``_type``, history)
``GET /fhir/T/_history``               :mod:`hms_ach.fhir.read` (type history)
``GET /fhir/T``, ``POST T/_search``    :mod:`hms_ach.fhir.read` (search)
``GET /fhir/T/id``, ``_history[/v]``   :mod:`hms_ach.fhir.read` (read, history, vread)
=====================================  ==========================================================

Every GET route but the operations' answers HEAD too (:func:`head_only`: the GET's headers, no body). Every route
negotiates the format (JSON only, 406 otherwise), the writes included. Database work runs in FastAPI's
threadpool on short reader connections. Every error is an OperationOutcome (see
:mod:`hms_ach.fhir.outcomes`).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import os
import re
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import orjson
from fastapi import APIRouter, Depends, Request
from starlette.convertors import Convertor, register_url_convertor
from starlette.responses import Response
from starlette.routing import Match, Route
from starlette.types import Scope

from hms_ach.core import metrics
from hms_ach.core.records import FHIR_SERVED
from hms_ach.fhir import access, audit_events, operations
from hms_ach.fhir import read as reads
from hms_ach.fhir import write_requests as writes
from hms_ach.fhir.capability import capability_statement, security_of
from hms_ach.fhir.outcomes import FhirError
from hms_ach.mapping.fhir_instance import FORMATS
from hms_ach.store.db import Store, read_budget
from hms_ach.store.search import Access

JSON_TYPES = {"application/fhir+json", "application/json", "application/json+fhir", "text/json", "json"}
ACCEPT_ANY = {"*/*", "application/*"}


# ---------------------------------------------------------------------------- negotiation
async def negotiate(request: Request) -> None:
    """Refuse (406) a ``_format`` or ``Accept`` that asks for anything but JSON (the dependency of
    most routes).

    ``async`` because it only reads headers: FastAPI runs a plain ``def`` dependency in its thread
    pool, which would cost every request a thread hand-off."""
    check_format(request)


def check_format(request: Request) -> None:
    """:func:`negotiate` as a plain call. The busiest routes (read, search) call it first thing
    instead of declaring the dependency, which spares FastAPI a second dependency to solve on
    every request; the answer is the same 406, before anything is read or recorded."""
    fmt = request.query_params.get("_format")
    if fmt is not None and fmt.split(";")[0].strip().lower() not in JSON_TYPES:
        raise FhirError(
            406, "not-supported", f"_format={fmt[:64]!r} is not supported; this server speaks JSON only"
        )
    accept = request.headers.get("accept", "").strip()
    if not accept:
        return
    for media_range in accept.split(","):
        mtype, *params = [p.strip() for p in media_range.split(";")]
        q = next((p[2:] for p in params if p.startswith("q=")), "1")
        try:
            weight = float(q)
        except ValueError:
            weight = 0.0
        if weight > 0 and (mtype.lower() in JSON_TYPES or mtype in ACCEPT_ANY):
            return
    raise FhirError(406, "not-supported", "none of the Accept types is served; use application/fhir+json")


def head_only(request: Request, response: Response) -> Response:
    """For a HEAD request, ``response`` without its body (its headers, Content-Length included)."""
    if request.method != "HEAD":
        return response
    headers = {k: v for k, v in response.headers.items() if k.lower() != "content-type"}
    return Response(None, response.status_code, headers=headers, media_type=response.media_type)


def _strict(request: Request) -> bool:
    prefer = request.headers.get("prefer", "")
    return any(p.strip().replace(" ", "") == "handling=strict" for p in re.split(r"[,;]", prefer))


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/") + "/fhir"


def _search_access(request: Request, resource_type: str) -> Access:
    """403 unless the caller may search ``resource_type``; then what the search may return."""
    policy = access.policy_of(request)
    access.decide(policy, resource_type, "search")
    return access.search_access(policy)


def _history_types(request: Request, wanted: tuple[str, ...]) -> dict[str, str | None]:
    """The types of a type-level (one, 403 unless granted) or system-level history (those the caller
    may see; none is a 403), each mapped to the patient whose compartment limits it, or None."""
    policy = access.policy_of(request)
    if len(wanted) == 1:
        return {wanted[0]: access.decide(policy, wanted[0], "history-type").patient}
    types = {}
    for rtype in wanted:
        decision = policy.decide(rtype, "history-type")
        if decision.allowed:
            types[rtype] = decision.patient
    if not types:
        raise access.refusal(policy, "*", "history-type")
    return types


@contextmanager
def _audited(
    request: Request, subtype: str, resource_type: str, seen: reads.Seen, rid: str | None = None
) -> Iterator[Callable[[Response], Response]]:
    """Record one access for the read inside the block: ``done(response)`` records its status and
    what ``seen`` collected; a :class:`FhirError` (403, 404, 410...) is recorded with its status and
    the record asked for, then raised on. Queues only: never waits for a commit."""

    def done(response: Response) -> Response:
        audit_events.record_access(
            request, subtype, resource_type, response.status_code, seen.refs, seen.count
        )
        return head_only(request, response)

    try:
        yield done
    except FhirError as exc:
        asked = [f"{resource_type}/{rid}"] if rid is not None else []
        audit_events.record_access(request, subtype, resource_type, exc.status, seen.refs or asked)
        raise


PREFIX = "/fhir"

#: How long a search waits for a slot (:func:`search_slots`) before it is answered 503 with Retry-After.
SEARCH_SLOT_WAIT_SECONDS = 30.0


def search_slots(store: Store) -> asyncio.Semaphore | None:
    """On SQLite, at most one search per core and one more runs at once; the others wait for a slot
    on the event loop. SQLite's reads give up the GIL for every row they step through, and with
    eight searches at once (FastAPI's pool takes 40) the threads queued for the GIL more than they
    ran: over 100,000 Practitioners a family search went from 870 to 956 req/s and its p99 from
    17.5 to 11.2 ms with 3 slots on 2 cores (8 clients). On PostgreSQL a search waits on the
    network, not the GIL: None, no limit but the pool's."""
    if store.dialect != "sqlite":
        return None
    return asyncio.Semaphore((os.cpu_count() or 1) + 1)


#: The threads the searches (and on PostgreSQL the reads by id) run on: one pool for the process
#: (its idle threads are kept, so one per app would leave them behind every app a test makes), at
#: most as many threads as FastAPI's pool.
READ_THREADS = 40
_read_pool: ThreadPoolExecutor | None = None
_read_pool_lock = threading.Lock()


async def _in_read_thread(call: Callable[..., Any], *args: Any) -> Any:
    """``call(*args)`` on a read thread, in the caller's context (its context variables, as
    FastAPI's ``run_in_threadpool`` gives them). The hand-off through anyio (cancel scopes, a
    capacity limiter, each asking for the current task) cost about a tenth of a family search's
    work on the event loop; an executor of our own costs a future and a wake-up."""
    global _read_pool
    pool = _read_pool
    if pool is None:
        with _read_pool_lock:
            if _read_pool is None:
                _read_pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="hms-ach-read")
            pool = _read_pool
    context = contextvars.copy_context()
    running = pool.submit(functools.partial(context.run, call, *args))
    try:
        return await asyncio.wrap_future(running)
    except asyncio.CancelledError:
        if not running.done():  # a thread cannot be stopped: the caller (its slot) waits for it, as before,
            # but not for ever: past the slot's own deadline the slot is given back regardless
            await asyncio.wait([asyncio.wrap_future(running)], timeout=SEARCH_SLOT_WAIT_SECONDS)
        raise


#: How long a search may run on the event loop (SQLite). Most searches of an indexed parameter
#: take well under a millisecond of SQLite's time, and handing one to a read thread cost more than the
#: search itself: the thread's wake-up and the interpreter lock passed back and forth (a family search
#: over 100,000 Practitioners used 1.4-1.5 ms of the engine's CPU through a thread, 0.8-0.9 ms
#: on the loop). One that runs longer is interrupted and run again on a read thread, so that no
#: search holds the loop (the MLLP channels, every other request) longer than this.
INLINE_SEARCH_SECONDS = 0.005
#: ``hms_ach_fhir_searches_total``'s children, looked up once (``labels()`` takes a lock each call).
_RAN = {
    ran: metrics.FHIR_SEARCHES.labels(ran)
    for ran in ("event_loop", "read_thread", "read_thread_after_deadline")
}


def _search_inline(search: Callable[[], Response], seen: reads.Seen) -> Response | None:
    """``search`` (:func:`reads.search_type` with its arguments, ``seen`` among them) on this
    thread, its SQLite statements bounded by :data:`INLINE_SEARCH_SECONDS`
    (:func:`~hms_ach.store.db.read_budget`); None when it ran past that (what it found is dropped,
    ``seen`` emptied: the search runs again elsewhere). A search the store refuses (400, 403)
    within the budget is raised as it would be on a thread."""
    with read_budget(INLINE_SEARCH_SECONDS) as budget:
        try:
            response = search()
        except Exception:
            if not budget.spent:
                raise
        else:
            if not budget.spent:
                return response
    seen.clear()
    return None


@asynccontextmanager
async def _slot(slots: asyncio.Semaphore | None) -> AsyncIterator[None]:
    """One of ``slots`` for the block (none to take when None); after :data:`SEARCH_SLOT_WAIT_SECONDS`
    without one, a 503 ``transient`` with Retry-After."""
    if slots is None:
        yield
        return
    try:
        async with asyncio.timeout(SEARCH_SLOT_WAIT_SECONDS):
            await slots.acquire()
    except TimeoutError:
        raise FhirError(
            503,
            "transient",
            f"every search slot was busy for {SEARCH_SLOT_WAIT_SECONDS:g} s; retry later",
            headers={"Retry-After": "1"},
        ) from None
    try:
        yield
    finally:
        slots.release()


class _FhirType(Convertor[str]):
    """A resource type in a path of the busiest routes (:func:`_busiest_first`): a capitalised name,
    never ``AuditEvent`` (whose routes are its own)."""

    regex = r"(?!AuditEvent(?:/|$))[A-Z][A-Za-z]{0,63}"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


class _FhirId(_FhirType):
    """A logical id in a path of the busiest routes: FHIR's id characters only, so ``_history``,
    ``_search`` and ``$export`` never match it."""

    regex = FORMATS["id"].pattern  # R4's id, as the validator checks it


register_url_convertor("fhir_type", _FhirType())
register_url_convertor("fhir_id", _FhirId())


def _busiest_first(router: APIRouter, search: Callable[..., Any], read: Callable[..., Any]) -> None:
    """Put a copy of the search (``GET /{type}``) and read (``GET /{type}/{id}``) routes in front of
    every other ``/fhir`` route. FastAPI tries a router's routes in order, twice a request (once to
    choose the router, once to choose the route), with bookkeeping for each: a search was tried
    against 26 routes before its own, about a tenth of the engine's CPU under a search load. The
    copies' type and id are constrained (:class:`_FhirType`, :class:`_FhirId`) so that they match
    no path a route before them answers (``/fhir/metadata``, ``/fhir/AuditEvent``,
    ``/fhir/Patient/$export``, ``/fhir/Patient/_history``); any other path goes on to the routes in
    their declared order, as before. The copies stay out of the OpenAPI document; the access log
    and the latency metric name them by the plain template (:func:`hms_ach.app.access_log.route_template`).

    The copies are Starlette routes (:func:`_plain`), not FastAPI's: the two endpoints take nothing
    but the request and its path, which FastAPI still got through its dependency machinery (its
    request handler, the parameters solved and checked one by one) on every request, about a fifth
    of the engine's CPU for a read by id or a search. The same middleware, exception handlers and
    ``scope["route"]`` apply; the declared routes (and the OpenAPI document) are unchanged."""
    copies = []
    for template, endpoint, names in (
        ("/{resource_type:fhir_type}", search, ("resource_type",)),
        ("/{resource_type:fhir_type}/{rid:fhir_id}", read, ("resource_type", "rid")),
    ):
        copies.append(_plain(router.prefix + template, endpoint, names))
    router.routes[:] = copies + list(router.routes)


def _plain(path: str, endpoint: Callable[..., Any], names: tuple[str, ...]) -> Route:
    """A Starlette route of ``path`` (GET and HEAD) answered by ``endpoint`` (its path parameters
    ``names``, then the request); its endpoint's ``declared`` is ``endpoint``. It names itself in
    ``scope["route"]`` as Starlette's router does for every route (FastAPI's does only for its
    own), for the access log and the latency metric."""

    async def plain(request: Request) -> Response:
        request.scope["route"] = route
        params = request.path_params
        response: Response = await endpoint(*(params[n] for n in names), request)
        return response

    plain.declared = endpoint  # type: ignore[attr-defined]
    plain.__name__ = endpoint.__name__
    route = Route(path, plain, methods=["GET", "HEAD"], include_in_schema=False)
    return route


class PrefixRouter(APIRouter):
    """An :class:`APIRouter` whose routes all start with its ``prefix``: a request for another path
    is refused with one string comparison instead of a match against each of its routes. The app
    includes the FHIR router ahead of the other APIs (:func:`hms_ach.app.http.create_app`), so a
    FHIR request is not matched against their routes first, and theirs pay one comparison here."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        path: str = scope.get("path", "")
        root: str = scope.get("root_path", "")
        if root and path.startswith(root + "/"):  # the path the routes see, as Starlette computes it
            path = path[len(root) :]
        if path != self.prefix and not path.startswith(self.prefix + "/"):
            return Match.NONE, {}
        return super().matches(scope)


def fhir_router(store: Store, write_channel: writes.WriteChannel | None = None) -> APIRouter:
    """Every ``/fhir`` route over ``store`` (reads use ``store.reader``; writes the pipeline of the
    ``fhir_rest`` channel that ``write_channel`` finds, and answer 405 when it finds none)."""
    router = PrefixRouter(prefix=PREFIX, tags=["fhir"])
    find: writes.WriteChannel = write_channel or (lambda: None)
    negotiated = [Depends(negotiate)]

    # ------------------------------------------------------------------ AuditEvent (not a record type)
    @router.get("/AuditEvent")
    @router.head("/AuditEvent", include_in_schema=False)
    def search_audit_events(request: Request) -> Response:
        try:
            decision = access.require(request, "AuditEvent", "search")
        except FhirError as exc:  # a refused read of the trail is recorded too
            audit_events.record_access(request, "search-type", "AuditEvent", exc.status)
            raise
        # The trail is not in the Patient compartment: a patient/ grant sees no entry.
        return head_only(
            request,
            audit_events.search_audit_events(
                store, request, visible=decision.patient is None, strict=_strict(request)
            ),
        )

    @router.get("/AuditEvent/{rid}", dependencies=negotiated)
    @router.head("/AuditEvent/{rid}", dependencies=negotiated, include_in_schema=False)
    def read_audit_event(rid: str, request: Request) -> Response:
        ref = f"AuditEvent/{rid[:64]}"
        try:
            decision = access.require(request, "AuditEvent", "read")
            answer = audit_events.read_audit_event(store, rid, visible=decision.patient is None)
        except FhirError as exc:  # a refused or unknown read of the trail is recorded too
            audit_events.record_access(request, "read", "AuditEvent", exc.status, [ref])
            raise
        audit_events.record_access(request, "read", "AuditEvent", 200, [ref])
        return head_only(request, answer)

    # ------------------------------------------------------------------ operations ($everything, $export)
    operations.install(router, store, negotiated)

    # ------------------------------------------------------------------ reads
    @router.get("/metadata", dependencies=negotiated)
    @router.head("/metadata", dependencies=negotiated, include_in_schema=False)
    def metadata(request: Request) -> Response:
        security = security_of(getattr(request.app.state, "authenticator", None))
        return head_only(
            request,
            reads.fhir_response(
                orjson.dumps(capability_statement(_base(request), find() is not None, security))
            ),
        )

    @router.get("", dependencies=negotiated)
    @router.head("", dependencies=negotiated, include_in_schema=False)
    @router.get("/", dependencies=negotiated, include_in_schema=False)
    @router.head("/", dependencies=negotiated, include_in_schema=False)
    def search_system(request: Request) -> Response:
        seen = reads.Seen()
        with _audited(request, "search-system", "", seen) as done:
            policy = access.policy_of(request)
            named = [
                t.strip() for v in request.query_params.getlist("_type") for t in v.split(",") if t.strip()
            ]
            for rtype in named:
                reads.check_served(rtype)
                access.decide(policy, rtype, "search")
            types = list(dict.fromkeys(named)) or [
                t for t in FHIR_SERVED if policy.decide(t, "search").allowed
            ]
            if not types:
                raise access.refusal(policy, "*", "search")
            scope = access.search_access(policy)
            params = list(request.query_params.multi_items())
            return done(
                reads.search_system(store, _base(request), types, params, _strict(request), scope, seen)
            )

    @router.get("/_history", dependencies=negotiated)
    @router.head("/_history", dependencies=negotiated, include_in_schema=False)
    def history_system(request: Request) -> Response:
        seen = reads.Seen()
        with _audited(request, "history", "", seen) as done:
            types = _history_types(request, FHIR_SERVED)
            params = dict(request.query_params)
            return done(reads.history_versions(store, _base(request), "_history", types, None, params, seen))

    @router.get("/{resource_type}/_history", dependencies=negotiated)
    @router.head("/{resource_type}/_history", dependencies=negotiated, include_in_schema=False)
    def history_type(resource_type: str, request: Request) -> Response:
        seen = reads.Seen()
        with _audited(request, "history", resource_type, seen) as done:
            reads.check_served(resource_type)
            types = _history_types(request, (resource_type,))
            params = dict(request.query_params)
            path = f"{resource_type}/_history"
            return done(reads.history_versions(store, _base(request), path, types, None, params, seen))

    slots = search_slots(store)
    bounded = store.bounded_reads

    async def searching(
        base: str,
        resource_type: str,
        params: list[tuple[str, str]],
        strict: bool,
        scope: Access,
        seen: reads.Seen,
    ) -> Response:
        """:func:`reads.search_type`: on SQLite first on the event loop, within
        :data:`INLINE_SEARCH_SECONDS` (:func:`_search_inline`); else, or past that, on the thread
        pool, in one of the ``slots`` when there are."""
        search = functools.partial(reads.search_type, store, base, resource_type, params, strict, scope, seen)
        ran = "read_thread"
        if bounded:
            response = _search_inline(search, seen)
            if response is not None:
                _RAN["event_loop"].inc()
                return response
            ran = "read_thread_after_deadline"
        async with _slot(slots):
            answer: Response = await _in_read_thread(search)
        _RAN[ran].inc()
        return answer

    @router.get("/{resource_type}")
    @router.head("/{resource_type}", include_in_schema=False)
    async def search_get(resource_type: str, request: Request) -> Response:
        check_format(request)  # as the negotiated dependency would (see check_format)
        seen = reads.Seen()
        with _audited(request, "search-type", resource_type, seen) as done:
            reads.check_served(resource_type)
            scope = _search_access(request, resource_type)
            params = list(request.query_params.multi_items())
            return done(await searching(_base(request), resource_type, params, _strict(request), scope, seen))

    @router.post("/{resource_type}/_search", dependencies=negotiated)
    async def search_post(resource_type: str, request: Request) -> Response:
        seen = reads.Seen()
        with _audited(request, "search-type", resource_type, seen) as done:
            reads.check_served(resource_type)
            scope = _search_access(request, resource_type)
            params = list(request.query_params.multi_items()) + await reads.form_params(request)
            return done(await searching(_base(request), resource_type, params, _strict(request), scope, seen))

    inline = store.dialect == "sqlite"

    @router.get("/{resource_type}/{rid}")
    @router.head("/{resource_type}/{rid}", include_in_schema=False)
    async def read(resource_type: str, rid: str, request: Request) -> Response:
        check_format(request)  # as the negotiated dependency would (see check_format)
        seen = reads.Seen()
        with _audited(request, "read", resource_type, seen, rid) as done:
            reads.check_served(resource_type)
            decision = access.require(request, resource_type, "read")
            inm = request.headers.get("if-none-match")
            ims = request.headers.get("if-modified-since")
            subset = reads.read_subset(list(request.query_params.multi_items()))
            # A read by id is one primary-key look-up. On SQLite (a local file, no pool to wait for) it
            # runs on the event loop: a thread hand-off would cost more than the read. On PostgreSQL
            # it waits on the network and the pool, so it goes to the thread pool like the searches.
            if inline:
                return done(reads.read(store, resource_type, rid, inm, decision, seen, ims, subset))
            return done(
                await _in_read_thread(reads.read, store, resource_type, rid, inm, decision, seen, ims, subset)
            )

    _busiest_first(router, search_get, read)

    @router.get("/{resource_type}/{rid}/_history", dependencies=negotiated)
    @router.head("/{resource_type}/{rid}/_history", dependencies=negotiated, include_in_schema=False)
    def history(resource_type: str, rid: str, request: Request) -> Response:
        seen = reads.Seen()
        with _audited(request, "history", resource_type, seen, rid) as done:
            reads.check_served(resource_type)
            decision = access.require(request, resource_type, "history")
            params = dict(request.query_params)
            return done(reads.history(store, _base(request), resource_type, rid, params, decision, seen))

    @router.get("/{resource_type}/{rid}/_history/{vid}", dependencies=negotiated)
    @router.head("/{resource_type}/{rid}/_history/{vid}", dependencies=negotiated, include_in_schema=False)
    async def vread(resource_type: str, rid: str, vid: str, request: Request) -> Response:
        seen = reads.Seen()
        with _audited(request, "vread", resource_type, seen, rid) as done:
            reads.check_served(resource_type)
            decision = access.require(request, resource_type, "vread")
            if inline:  # one primary-key look-up, as read
                return done(reads.vread(store, resource_type, rid, vid, decision, seen))
            return done(await _in_read_thread(reads.vread, store, resource_type, rid, vid, decision, seen))

    # ------------------------------------------------------------------ writes
    # After the reads: no write route answers a GET or HEAD, and no read route (the POST of _search
    # included) has the path and method of a write, so the order decides no answer; the busiest
    # routes, read and search, are then matched without trying the write routes first.
    def guard(request: Request) -> access.WriteGuard:
        return access.WriteGuard(store, access.policy_of(request))

    @router.post("", dependencies=negotiated)
    @router.post("/", include_in_schema=False, dependencies=negotiated)
    async def bundle(request: Request) -> Response:
        return await writes.transaction_or_batch(request, find, guard(request))

    @router.post("/{resource_type}", dependencies=negotiated)
    async def create(resource_type: str, request: Request) -> Response:
        return await writes.create(request, find, resource_type, guard(request))

    @router.put("/{resource_type}", dependencies=negotiated)
    async def conditional_update(resource_type: str, request: Request) -> Response:
        return await writes.conditional_update(request, find, resource_type, guard(request))

    @router.put("/{resource_type}/{rid}", dependencies=negotiated)
    async def update(resource_type: str, rid: str, request: Request) -> Response:
        return await writes.update(request, find, resource_type, rid, guard(request))

    @router.patch("/{resource_type}/{rid}", dependencies=negotiated)
    async def patch(resource_type: str, rid: str, request: Request) -> Response:
        return await writes.patch(request, find, resource_type, rid, guard(request))

    @router.delete("/{resource_type}/{rid}", dependencies=negotiated)
    async def delete(resource_type: str, rid: str, request: Request) -> Response:
        return await writes.delete(request, find, resource_type, rid, guard(request))

    return router
