"""The HTTP application: the FHIR R4 API at ``/fhir``, ``/api/v1`` and the health answers.

``create_app(store)`` builds a FastAPI app over one :class:`~hms_ach.store.db.Store`. Error
responses are OperationOutcomes, and RFC 9457 problems under ``/api/v1``. Every route's request
body is limited to ``http.max_body_bytes`` (:mod:`hms_ach.app.body_limit`), and each request is
one ``http.request`` event of the access log (:mod:`hms_ach.app.access_log`). ``app.state.health`` is a plain dict served as the
health document; other components may add their own keys to it.

The middleware, outermost first (docs/security.md, "HTTP hardening"):

1. the access log (it sees every answer, the refusals below included);
2. the security headers (:mod:`hms_ach.app.hardening`), on every answer;
3. the Host allow-list (400), then CORS when ``http.cors_origins`` is set (preflights answered
   here, before authentication: they carry no token);
4. the body limit (413);
5. authentication (401), which sets the caller;
6. the rate limit (429, :mod:`hms_ach.app.rate_limit`), per caller: so inside authentication;
7. the routes. ``/docs`` and ``/redoc`` load their assets from ``/docs/assets/`` (the
   fastapi-offline package), never from a CDN.

Health:

* ``GET /health/live``: 200 while the process serves HTTP (liveness; restart it when this fails);
* ``GET /health/ready``: 200 when every check of ``app.state.readiness`` passes (the engine's:
  the writer thread runs, a trivial transaction commits through it within a short deadline, the
  mappings are loaded), else 503 with a JSON body naming each failed check;
* ``GET /health``: the health document, always 200, whose ``status`` says ``ok``, ``degraded``
  (only the last reload failed: the previous mappings still serve) or ``unavailable``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from starlette.responses import Response

from hms_ach.app.access_log import AccessLogMiddleware
from hms_ach.app.authentication import AuthenticationMiddleware, install_openapi_security, well_known_router
from hms_ach.app.body_limit import BodyLimitMiddleware
from hms_ach.app.config import HttpSettings, RateLimitSettings
from hms_ach.app.hardening import install_hardening
from hms_ach.app.metrics import install_metrics_route
from hms_ach.app.rate_limit import RateLimitMiddleware
from hms_ach.auth.authenticate import Authenticator
from hms_ach.cases.api import cases_router
from hms_ach.console import install_console
from hms_ach.fhir.outcomes import install_handlers
from hms_ach.fhir.routes import fhir_router
from hms_ach.fhir.write_requests import WriteChannel
from hms_ach.store.db import Store
from hms_ach.workforce.api import PipelineSource, workforce_router

#: Where /docs and /redoc load the Swagger UI and ReDoc assets from (served by the engine; public).
DOCUMENTATION_ASSETS = "/docs/assets"

#: The readiness checks: each failed check's name -> why (no field values); empty when ready.
Readiness = Callable[[], Awaitable[dict[str, str]]]


def create_app(
    store: Store,
    pipeline_of: PipelineSource | None = None,
    write_channel: WriteChannel | None = None,
    settings: HttpSettings | None = None,
    *,
    authenticator: Authenticator,
) -> FastAPI:
    """A FastAPI app serving ``store``. Writes need the running engine's parts, found per request
    (a reload replaces them): ``pipeline_of`` for /api/v1, ``write_channel`` (the ``fhir_rest``
    channel) for /fhir; without them the write routes answer 503 and 405. ``settings`` (the
    ``http:`` section) sets the body limit of every route and the access log.

    ``authenticator`` checks the bearer token of every request but ``/health*``, ``/.well-known/*``
    and the API description (:mod:`hms_ach.app.authentication`); its ``off`` mode lets every request
    in as an anonymous caller."""
    settings = settings or HttpSettings()
    app = FastAPIOffline(
        title="hms-ach",
        description="HL7 v2 / FHIR R4 integration engine API",
        static_url=DOCUMENTATION_ASSETS,
        # no call to the public swagger.io validator: /docs makes no request off this server
        swagger_ui_parameters={"validatorUrl": None},
    )
    app.state.store = store
    app.state.health = {"status": "ok"}
    app.state.readiness = None  # a Readiness, set by the engine
    app.state.authenticator = authenticator
    install_handlers(app)
    _install_rate_limit(app, settings.rate_limit)  # added first: the innermost, it sees the caller
    _install_authentication(app, authenticator)
    # The FHIR API first (after /fhir/.well-known, included with authentication): the busiest routes
    # are matched without trying every /api/v1 route before them; its router refuses other paths
    # with one prefix comparison (hms_ach.fhir.routes.PrefixRouter). The prefixes do not overlap,
    # so the order changes no answer.
    app.include_router(fhir_router(store, write_channel))
    app.include_router(workforce_router(store, pipeline_of))
    app.include_router(cases_router(store, pipeline_of))  # review cases (docs/review-cases.md)
    install_console(app)  # the web console at /console (hms_ach/console, docs/console.md)

    async def failed_checks() -> dict[str, str]:
        readiness: Readiness | None = app.state.readiness
        return await readiness() if readiness is not None else {}

    @app.get("/health")
    async def health() -> Response:
        failed = await failed_checks()
        body: dict[str, Any] = dict(app.state.health)
        if failed:
            body["status"] = "degraded" if set(failed) == {"mappings"} else "unavailable"
            body["failed"] = failed
        elif app.state.readiness is not None:
            body["status"] = "ok"
        return Response(orjson.dumps(body), media_type="application/json")

    @app.get("/health/live")
    def live() -> Response:
        return Response(orjson.dumps({"status": "live"}), media_type="application/json")

    @app.get("/health/ready")
    async def ready() -> Response:
        failed = await failed_checks()
        body: dict[str, Any] = {"status": "unavailable", "failed": failed} if failed else {"status": "ready"}
        return Response(orjson.dumps(body), status_code=503 if failed else 200, media_type="application/json")

    # The last added runs first: the access log sees the 400s, 413s, 401s and 429s too.
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    install_hardening(app, settings)
    app.add_middleware(AccessLogMiddleware, log_requests=settings.access_log)  # and the latency metric
    install_metrics_route(app)
    return app


def _install_rate_limit(app: FastAPI, settings: RateLimitSettings) -> None:
    """The per-client token bucket (:mod:`hms_ach.app.rate_limit`), unless ``enabled: false``."""
    if settings.enabled:
        app.add_middleware(RateLimitMiddleware, settings=settings)


def _install_authentication(app: FastAPI, authenticator: Authenticator) -> None:
    """Bearer authentication on every route but the public ones, ``/.well-known`` and the OpenAPI
    security schemes (see :mod:`hms_ach.app.authentication`)."""
    app.add_middleware(AuthenticationMiddleware, authenticator=authenticator)
    app.include_router(well_known_router(authenticator))
    install_openapi_security(app, authenticator)
