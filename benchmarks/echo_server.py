"""The socket ceiling of figure B: hms-ach's own MLLP listener (:class:`hms_ach.hl7v2.mllp.MllpServer`)
with a handler that parses nothing, stores nothing and answers every frame with one fixed ACK.

Run in its own process: ``python -m benchmarks.echo_server --port P``; stops on SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse

from benchmarks.driver import listen_until_signalled
from hms_ach.app import eventloop
from hms_ach.hl7v2.mllp import FrameHandler, MllpConfig, MllpServer

#: An AA of the size the engine sends (about 150 bytes), built once.
FIXED_ACK = (
    b"MSH|^~\\&|HMSACH|GENHOSP|ADTSYS|GENHOSP|20261126083000||ACK^A01^ACK|ECHO-0000001|P|2.5.1\r"
    b"MSA|AA|ECHO-0000001\r"
)


async def _handler(payload: bytes, peer: str) -> bytes:
    return FIXED_ACK


async def serve(host: str, port: int, handler: FrameHandler = _handler) -> None:
    """Listen on ``host:port`` with ``handler`` (the fixed ACK by default) until signalled."""
    config = MllpConfig.model_validate(
        {"host": host, "port": port, "idle_timeout_seconds": 60, "max_connections": 100}
    )
    server = MllpServer(config, handler)
    await server.start()
    await listen_until_signalled(server.port)
    await server.close(grace_seconds=2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    eventloop.run(serve(args.host, args.port))  # the engine's loop, so that the ceiling compares


if __name__ == "__main__":
    main()
