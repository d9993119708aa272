"""A loopback SFTP server for development: password login for one user, chrooted to a folder.

One implementation behind ``scripts/sftp_demo_server.py`` (trying the sftp_csv channels by hand),
``tests/integration/sftp_server.py`` (the SFTP tests) and ``benchmarks/sftp_server.py`` (figure D).
It listens on 127.0.0.1 only, and uses asyncssh, which the engine already depends on for its SFTP
client. Not for production: one fixed user, password login only, no rate limits.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import asyncssh

HOST = "127.0.0.1"


class PasswordLogin(asyncssh.SSHServer):
    """Accepts ``user`` with ``password`` (compared in constant time) and no other login."""

    def __init__(self, user: str, password: str):
        self.user = user
        self.password = password

    def begin_auth(self, username: str) -> bool:
        return True  # every login must authenticate

    def password_auth_supported(self) -> bool:
        return True

    def validate_password(self, username: str, password: str) -> bool:
        return username == self.user and secrets.compare_digest(password.encode(), self.password.encode())


def write_host_key(path: Path) -> asyncssh.SSHKey:
    """A new ed25519 host key, written to ``path`` (mode 0600) in OpenSSH format."""
    key = asyncssh.generate_private_key("ssh-ed25519")
    path.write_bytes(key.export_private_key())
    path.chmod(0o600)
    return key


def write_password(path: Path) -> str:
    """A new random password, written to ``path`` (mode 0600) with a final newline."""
    password = secrets.token_urlsafe(12)
    path.write_text(password + "\n", encoding="ascii")
    path.chmod(0o600)
    return password


def write_known_hosts(path: Path, key: asyncssh.SSHKey, port: int) -> Path:
    """Write a known_hosts file that pins ``key`` for 127.0.0.1:``port``; returns ``path``."""
    kind, blob = key.export_public_key("openssh").decode().split()[:2]
    path.write_text(f"[{HOST}]:{port} {kind} {blob}\n", encoding="ascii")
    return path


async def start_sftp_server(
    root: Path,
    host_key: asyncssh.SSHKey | str,
    user: str,
    password: str,
    port: int = 0,
    sftp_class: type[asyncssh.SFTPServer] = asyncssh.SFTPServer,
) -> tuple[asyncssh.SSHAcceptor, int]:
    """Serve ``root`` over SFTP (chrooted: clients see it as ``/``) on 127.0.0.1:``port``.

    ``host_key`` is a key or the name of a file holding one; ``sftp_class`` lets a test serve a
    subclass that misbehaves on purpose. Returns the server and the port it bound (``port`` 0
    picks a free one). Stop it with ``server.close()`` and ``await server.wait_closed()``.
    """
    chroot = os.fsencode(root)
    server = await asyncssh.create_server(
        lambda: PasswordLogin(user, password),
        HOST,
        port,
        server_host_keys=[host_key],
        sftp_factory=lambda chan: sftp_class(chan, chroot=chroot),
    )
    return server, int(server.sockets[0].getsockname()[1])
