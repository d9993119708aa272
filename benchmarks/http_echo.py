"""The HTTP ceiling of figure C: the same ASGI server the engine uses (uvicorn, same settings),
serving a bare ASGI app that answers every request with one fixed FHIR JSON body: no routing, no
FastAPI, no database.

Run in its own process: ``python -m benchmarks.http_echo --port P``; stops on SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
from typing import Any

import orjson
import uvicorn

#: A Practitioner about the size of the ones the API serves.
BODY = orjson.dumps(
    {
        "resourceType": "Practitioner",
        "id": "00000000-0000-4000-8000-000000000000",
        "meta": {"versionId": "1", "lastUpdated": "2026-11-01T00:00:00Z"},
        "identifier": [{"system": "http://hl7.org/fhir/sid/us-npi", "value": "1234567893"}],
        "active": True,
        "name": [{"family": "Chen", "given": ["Lisa"], "prefix": ["Dr"], "use": "official"}],
        "telecom": [{"system": "phone", "value": "(614)555-0150", "use": "work"}],
        "address": [{"line": ["300 Hospital Way"], "city": "Columbus", "state": "OH", "postalCode": "43210"}],
        "note": [{"text": "x" * 700}],
    }
)
HEADERS = [(b"content-type", b"application/fhir+json"), (b"content-length", str(len(BODY)).encode())]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", lifespan="off", access_log=False)


if __name__ == "__main__":
    main()
