"""The SFTP server of figure D: asyncssh, chrooted to ``--root``, on 127.0.0.1, password login.

Run in its own process: ``python -m benchmarks.sftp_server --root DIR --port P``. Before it listens it
writes ``DIR/host_key`` (a new ed25519 key), ``DIR/known_hosts`` (that key pinned for 127.0.0.1:P) and
``DIR/password``, and makes ``DIR/inbox``; the benchmark reads the last two to configure the channel.
Stops on SIGINT or SIGTERM. Benchmark use only; scripts/sftp_demo_server.py is the one for trying the
channels by hand (it also copies the sample CSVs in, which the benchmark does not want).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
from pathlib import Path

import asyncssh

USER = "bench"


class _Login(asyncssh.SSHServer):
    def __init__(self, password: str):
        self.password = password

    def begin_auth(self, username: str) -> bool:
        return True

    def password_auth_supported(self) -> bool:
        return True

    def validate_password(self, username: str, password: str) -> bool:
        return username == USER and secrets.compare_digest(password, self.password)


async def serve(root: Path, port: int) -> None:
    (root / "inbox").mkdir(parents=True, exist_ok=True)
    key = asyncssh.generate_private_key("ssh-ed25519")
    (root / "host_key").write_bytes(key.export_private_key())
    (root / "host_key").chmod(0o600)
    kind, blob = key.export_public_key("openssh").decode().split()[:2]
    (root / "known_hosts").write_text(f"[127.0.0.1]:{port} {kind} {blob}\n", encoding="ascii")
    password = secrets.token_urlsafe(12)
    (root / "password").write_text(password + "\n", encoding="ascii")
    (root / "password").chmod(0o600)
    server = await asyncssh.create_server(
        lambda: _Login(password), "127.0.0.1", port, server_host_keys=[key],
        sftp_factory=lambda chan: asyncssh.SFTPServer(chan, chroot=os.fsencode(root)))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"listening {port}", flush=True)
    await stop.wait()
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
