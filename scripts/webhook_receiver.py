"""A tiny webhook receiver for trying the outbound events: prints each event and whether its signature is valid.

HMS_ACH_WEBHOOK_SECRET=dev-secret-change-me python scripts/webhook_receiver.py [PORT]

It listens on 127.0.0.1 only: the example secret is accepted by the engine for a loopback url
only (docs/webhooks.md). Each event is handled once: a repeat of an event ``id`` already seen (the
``id`` inside the signed body, never an unsigned header) is answered 200 and ignored.
"""

from __future__ import annotations

import json
import os
import sys
from collections import OrderedDict
from http.server import BaseHTTPRequestHandler, HTTPServer

from hms_ach.outbound.webhook import verify

SECRET = os.environ.get("HMS_ACH_WEBHOOK_SECRET", "dev-secret-change-me")
#: The largest body read; a larger one is refused with 413.
MAX_BODY_BYTES = 1_000_000
#: How many event ids are remembered for deduplication (the oldest forgotten first).
REMEMBERED_EVENTS = 100_000
seen: OrderedDict[str, None] = OrderedDict()


class Handler(BaseHTTPRequestHandler):
    timeout = 10  # seconds a connection may stay silent

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        length_text = self.headers.get("Content-Length", "")
        if not length_text.isdigit() or int(length_text) > MAX_BODY_BYTES:
            self.send_response(411 if not length_text.isdigit() else 413)
            self.end_headers()
            return
        body = self.rfile.read(int(length_text))
        ok = verify(
            SECRET,
            self.headers.get("X-HMS-ACH-Timestamp"),
            body,
            self.headers.get("X-HMS-ACH-Signature"),
        )
        if not ok:
            print("BAD SIGNATURE: ignored", flush=True)
            self.send_response(401)
            self.end_headers()
            return
        try:
            event = json.loads(body)
            event_id = str(event["id"])
        except (ValueError, KeyError, TypeError):
            print("signed, but not an event (no id): ignored", flush=True)
            self.send_response(400)
            self.end_headers()
            return
        if event_id in seen:  # a redelivery (at least once): already handled
            print(f"repeat of {event_id}: ignored", flush=True)
        else:
            seen[event_id] = None
            if len(seen) > REMEMBERED_EVENTS:
                seen.popitem(last=False)
            print(f"valid {event_id} {event.get('event')} {json.dumps(event.get('data'))}", flush=True)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        return None


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 9000
    print(f"listening on http://127.0.0.1:{port}/events", flush=True)
    HTTPServer(("127.0.0.1", port), Handler).serve_forever()
