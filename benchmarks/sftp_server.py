"""The SFTP server of figure D: asyncssh, chrooted to ``--root``, on 127.0.0.1, password login.

Run in its own process: ``python -m benchmarks.sftp_server --root DIR --port P``. Before it listens it
writes ``DIR/host_key`` (a new ed25519 key), ``DIR/known_hosts`` (that key pinned for 127.0.0.1:P) and
``DIR/password``, and makes ``DIR/inbox``; the benchmark reads the last two to configure the channel.
Stops on SIGINT or SIGTERM. Benchmark use only; scripts/sftp_demo_server.py is the one for trying the
channels by hand (it also copies the sample CSVs in, which the benchmark does not want). Both run the
server of :mod:`hms_ach.devtools.sftp_server`.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from benchmarks.driver import listen_until_signalled
from hms_ach.devtools.sftp_server import start_sftp_server, write_host_key, write_known_hosts, write_password

USER = "bench"


async def serve(root: Path, port: int) -> None:
    (root / "inbox").mkdir(parents=True, exist_ok=True)
    key = write_host_key(root / "host_key")
    write_known_hosts(root / "known_hosts", key, port)
    password = write_password(root / "password")
    server, _port = await start_sftp_server(root, key, USER, password, port)
    await listen_until_signalled(port)
    server.close()
    await server.wait_closed()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--root", type=Path, required=True)
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    asyncio.run(serve(args.root.resolve(), args.port))


if __name__ == "__main__":
    main()
