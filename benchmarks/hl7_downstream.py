"""The downstream receiver of the routing benchmark: hms-ach's own MLLP listener answering each frame
AA, MSA-2 = the frame's MSH-10, after ``--delay-ms`` (a slow downstream system). No parsing beyond
MSH-10, nothing stored (the listener of :mod:`benchmarks.echo_server` with another handler).

Run in its own process: ``python -m benchmarks.hl7_downstream --port P [--delay-ms D]``.
"""

from __future__ import annotations

import argparse
import asyncio

from benchmarks import echo_server
from hms_ach.app import eventloop


def ack_for(payload: bytes) -> bytes:
    msh = payload.split(b"\r", 1)[0].split(b"|")
    control_id = msh[9] if len(msh) > 9 else b""
    return (
        b"MSH|^~\\&|DOWNSTREAM|DOWNFAC|HMS-ACH||20261206120000||ACK|D" + control_id + b"|P|2.5.1\r"
        b"MSA|AA|" + control_id + b"\r"
    )


async def serve(host: str, port: int, delay_seconds: float) -> None:
    async def handler(payload: bytes, peer: str) -> bytes:
        if delay_seconds:
            await asyncio.sleep(delay_seconds)
        return ack_for(payload)

    await echo_server.serve(host, port, handler)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--delay-ms", type=float, default=0.0)
    args = p.parse_args()
    eventloop.run(serve(args.host, args.port, args.delay_ms / 1000.0))


if __name__ == "__main__":
    main()
