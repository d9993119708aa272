"""A real SFTP server for the tests: asyncssh's server on 127.0.0.1, chrooted to a temporary folder."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncssh

USER = "feed"
PASSWORD = "s3cret-pw"


class _Ssh(asyncssh.SSHServer):
    def begin_auth(self, username: str) -> bool:
        return True

    def password_auth_supported(self) -> bool:
        return True

    def validate_password(self, username: str, password: str) -> bool:
        return username == USER and password == PASSWORD


class HostileSftp(asyncssh.SFTPServer):
    """Lists, besides the real files, names a hostile server could send (traversal, newline)."""

    extra_names: list[bytes] = []

    async def scandir(self, path: bytes) -> AsyncIterator[asyncssh.SFTPName]:
        async for entry in super().scandir(path):
            yield entry
        for name in self.extra_names:
            attrs = asyncssh.SFTPAttrs(type=asyncssh.FILEXFER_TYPE_REGULAR, size=4, permissions=0o100644,
                                       mtime=int(time.time()) - 3600)
            yield asyncssh.SFTPName(name, attrs=attrs)


class SftpServer:
    def __init__(self, root: Path, host_key: asyncssh.SSHKey, hostile: bool = False):
        self.root = root
        self.host_key = host_key
        self.hostile = hostile
        self.server: Any = None
        self.port = 0

    async def start(self) -> SftpServer:
        cls = HostileSftp if self.hostile else asyncssh.SFTPServer
        root = str(self.root)
        self.server = await asyncssh.create_server(
            _Ssh, "127.0.0.1", 0, server_host_keys=[self.host_key],
            sftp_factory=lambda chan: cls(chan, chroot=root))
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def known_hosts(self, path: Path, key: asyncssh.SSHKey | None = None) -> Path:
        public = (key or self.host_key).export_public_key("openssh").decode().split()
        path.write_text(f"[127.0.0.1]:{self.port} {public[0]} {public[1]}\n")
        return path

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
