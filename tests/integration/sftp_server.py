"""A real SFTP server for the tests: hms_ach.devtools' asyncssh server on 127.0.0.1, chrooted to a temporary folder."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncssh

from hms_ach.devtools.sftp_server import start_sftp_server, write_known_hosts

USER = "feed"
PASSWORD = "s3cret-pw"


class HostileSftp(asyncssh.SFTPServer):
    """Lists, besides the real files, names a hostile server could send (traversal, newline)."""

    extra_names: list[bytes] = []

    async def scandir(self, path: bytes) -> AsyncIterator[asyncssh.SFTPName]:
        async for entry in super().scandir(path):
            yield entry
        for name in self.extra_names:
            attrs = asyncssh.SFTPAttrs(
                type=asyncssh.FILEXFER_TYPE_REGULAR,
                size=4,
                permissions=0o100644,
                mtime=int(time.time()) - 3600,
            )
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
        self.server, self.port = await start_sftp_server(self.root, self.host_key, USER, PASSWORD, 0, cls)
        return self

    def known_hosts(self, path: Path, key: asyncssh.SSHKey | None = None) -> Path:
        return write_known_hosts(path, key or self.host_key, self.port)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
