"""A tiny webhook receiver for trying the outbound events: prints each event and whether its signature is valid.

HMS_ACH_WEBHOOK_SECRET=dev-secret-change-me python scripts/webhook_receiver.py [PORT]
"""

from __future__ import annotations

import json
import os
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

from hms_ach.outbound.webhook import verify

SECRET = os.environ.get("HMS_ACH_WEBHOOK_SECRET", "dev-secret-change-me")
seen: set[str] = set()


class Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(min(int(self.headers.get("Content-Length", "0")), 1_000_000))
        ok = verify(
            SECRET,
            self.headers.get("X-HMS-ACH-Timestamp", ""),
            body,
            self.headers.get("X-HMS-ACH-Signature", ""),
        )
        key = self.headers.get("Idempotency-Key", "")
        event = json.loads(body) if ok else {}
        print(
            f"{'valid' if ok else 'BAD SIGNATURE'} {'(repeat) ' if key in seen else ''}"
            f"{event.get('event')} {json.dumps(event.get('data'))}",
            flush=True,
        )
        seen.add(key)
        self.send_response(200 if ok else 401)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        return None


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 9000
    print(f"listening on http://127.0.0.1:{port}/events", flush=True)
    HTTPServer(("127.0.0.1", port), Handler).serve_forever()
