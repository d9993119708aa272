"""A local SFTP server for trying the sftp_csv channels: serves ./sftp_demo on 127.0.0.1 with the sample CSVs.

    .venv/bin/python scripts/sftp_demo_server.py [PORT]        # default port 2222

On first start it makes ./sftp_demo/ with:
  inbox/        staff_roster.csv, shifts.csv, timecards.csv and clock_events.csv from samples/csv (dated an hour ago,
                so the channels' minimum file age is met)
  host_key      the server's key (kept, so the pinned key stays valid across restarts)
  known_hosts   that key pinned for 127.0.0.1:PORT: the channels' `known_hosts:`
  password      the demo user's password: the channels' `password_file:`
and prints the environment that points the channels of channels.yaml at it. The server is
chrooted to ./sftp_demo and listens on loopback only. Development use only.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import time
from pathlib import Path

import asyncssh

from hms_ach.devtools.sftp_server import start_sftp_server, write_host_key, write_known_hosts, write_password

SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "csv"
USER = "hms_ach"


def prepare(root: Path, port: int) -> str:
    """Create the served folder, key, known_hosts and password (once); return the password."""
    (root / "inbox").mkdir(parents=True, exist_ok=True)
    for sub in ("processed", "error"):
        (root / sub).mkdir(exist_ok=True)
    key_file = root / "host_key"
    first_start = not key_file.exists()
    if first_start:
        write_host_key(key_file)
    write_known_hosts(root / "known_hosts", asyncssh.read_private_key(str(key_file)), port)
    password_file = root / "password"
    if not password_file.exists():
        write_password(password_file)
    an_hour_ago = time.time() - 3600
    for sample in sorted(SAMPLES.glob("*.csv")) if first_start else []:
        target = root / "inbox" / sample.name
        shutil.copyfile(sample, target)
        os.utime(target, (an_hour_ago, an_hour_ago))
    return password_file.read_text().strip()


async def start(root: Path, port: int) -> tuple[asyncssh.SSHAcceptor, int]:
    """Prepare ``root`` and start serving it; returns the server and its port (``port`` 0 picks one)."""
    root.mkdir(parents=True, exist_ok=True)
    password = prepare(root, port)
    server, bound = await start_sftp_server(root, str(root / "host_key"), USER, password, port)
    if bound != port:
        prepare(root, bound)  # pin the key for the port really bound
    return server, bound


async def serve(port: int) -> None:
    root = Path("sftp_demo").resolve()
    _server, port = await start(root, port)
    print(
        f"SFTP on 127.0.0.1:{port}, serving {root} (user {USER}). Point the engine at it with:\n\n"
        f"  export HMS_ACH_SFTP_ENABLED=true HMS_ACH_SFTP_HOST=127.0.0.1 HMS_ACH_SFTP_PORT={port} \\\n"
        f"         HMS_ACH_SFTP_USER={USER} HMS_ACH_SFTP_PASSWORD_FILE={root / 'password'} \\\n"
        f"         HMS_ACH_SFTP_KNOWN_HOSTS={root / 'known_hosts'}\n",
        flush=True,
    )
    await asyncio.Event().wait()


if __name__ == "__main__":
    try:
        asyncio.run(serve(int(sys.argv[1]) if len(sys.argv) > 1 else 2222))
    except KeyboardInterrupt:
        pass
