"""The HTTP application: the FHIR R4 API at ``/fhir`` and ``GET /health``.

``create_app(store)`` builds a FastAPI app over one :class:`~hms_ach.store.db.Store`. Error
responses are OperationOutcomes everywhere. ``app.state.health`` is a plain dict served as the
health document; other components may add their own keys to it.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import FastAPI
from starlette.responses import Response

from hms_ach.fhir.outcomes import install_handlers
from hms_ach.fhir.routes import fhir_router
from hms_ach.fhir.write_requests import WriteChannel
from hms_ach.store.db import Store
from hms_ach.workforce.api import PipelineSource, workforce_router


def create_app(
    store: Store,
    pipeline_of: PipelineSource | None = None,
    write_channel: WriteChannel | None = None,
) -> FastAPI:
    """A FastAPI app serving ``store``. Writes need the running engine's parts, found per request
    (a reload replaces them): ``pipeline_of`` for /api/v1, ``write_channel`` (the ``fhir_rest``
    channel) for /fhir; without them the write routes answer 503 and 405."""
    app = FastAPI(title="hms-ach", description="HL7 v2 / FHIR R4 integration engine API")
    app.state.store = store
    app.state.health = {"status": "ok"}
    install_handlers(app)
    app.include_router(workforce_router(store, pipeline_of))
    app.include_router(fhir_router(store, write_channel))

    @app.get("/health")
    def health() -> Response:
        body: dict[str, Any] = app.state.health
        return Response(orjson.dumps(body), media_type="application/json")

    return app
