"""A steady MLLP feed in a process of its own, for measuring another channel's effect on its ACKs.

``python -m tests.integration.mllp_feed PORT RATE`` sends ``samples/hl7/adt_a01.hl7`` with a new
MSH-10 (``FEED000001``, ...) RATE times a second on one connection, waiting for each ACK, until
its standard input closes; then it prints one JSON object: per message the latency from the time
it was *due* (so a stall also counts against the messages it delayed; no coordinated omission),
the latency from the time it was sent, and every answer that was not an AA for its own control id.
Only the standard library: it shares no interpreter lock with the engine it measures.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from pathlib import Path

SAMPLE = Path(__file__).resolve().parents[2] / "samples" / "hl7" / "adt_a01.hl7"
ACK_TIMEOUT_SECONDS = 10.0
MAX_ACK_BYTES = 1 << 20


def _message(template: str, control_id: str) -> bytes:
    return b"\x0b" + template.replace("S-A01-0001", control_id, 1).encode("latin-1") + b"\x1c\r"


def _msa(ack: bytes) -> list[str]:
    text = ack.decode("latin-1").replace("\n", "\r")
    line = next((s for s in text.split("\r") if s.startswith("MSA")), "MSA")
    return line.split("|")


def feed(port: int, rate: float, stop: threading.Event) -> dict[str, list[float] | list[str]]:
    template = SAMPLE.read_bytes().decode("latin-1").replace("\r\n", "\r").replace("\n", "\r")
    due_ms: list[float] = []
    sent_ms: list[float] = []
    bad: list[str] = []
    with socket.create_connection(("127.0.0.1", port), timeout=ACK_TIMEOUT_SECONDS) as sock:
        buffer = b""
        start = time.monotonic()
        i = 0
        while not stop.is_set():
            due = start + i / rate
            pause = due - time.monotonic()
            if pause > 0:
                stop.wait(pause)
                if stop.is_set():
                    break
            control_id = f"FEED{i:06d}"
            sent = time.monotonic()
            sock.sendall(_message(template, control_id))
            while b"\x1c\r" not in buffer:
                chunk = sock.recv(65536)
                if not chunk or len(buffer) > MAX_ACK_BYTES:
                    raise ConnectionError(f"the connection ended before the ACK of {control_id}")
                buffer += chunk
            ack, _, buffer = buffer.partition(b"\x1c\r")
            done = time.monotonic()
            due_ms.append((done - due) * 1000)
            sent_ms.append((done - sent) * 1000)
            msa = _msa(ack)
            if msa[1:3] != ["AA", control_id]:
                bad.append(f"{control_id}: {'|'.join(msa)[:80]}")
            i += 1
    # the first message warms the connection and the mapping up: it is answered but not timed
    return {"due_ms": due_ms[1:], "sent_ms": sent_ms[1:], "bad": bad}


def main() -> None:
    port, rate = int(sys.argv[1]), float(sys.argv[2])
    stop = threading.Event()

    def until_stdin_closes() -> None:
        sys.stdin.read()
        stop.set()

    threading.Thread(target=until_stdin_closes, daemon=True).start()
    print(json.dumps(feed(port, rate, stop)), flush=True)


if __name__ == "__main__":
    main()
