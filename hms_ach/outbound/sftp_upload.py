"""SFTP as an outbound destination (the 837 files of the x12_837 sink), with asyncssh.

The server's host key is pinned: ``known_hosts`` is required and a key that does not match fails
the attempt (retried, never accepted). A file is written as ``NAME.part`` and then renamed to
``NAME``, so the receiver never picks up half a file; uploading the same file again overwrites it
with the same bytes, so a retried delivery is harmless.
"""

from __future__ import annotations

import asyncio
import posixpath
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from hms_ach.outbound.sinks import DeliveryError


class SftpDestination(BaseModel):
    """Where files are uploaded, and how to log in."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field(description="SFTP server host name or address")
    port: int = Field(22, ge=1, le=65535, description="SSH port")
    username: str = Field(description="SSH user name")
    password: SecretStr | None = Field(
        None, description="SSH password; use ${VAR} to take it from the environment"
    )
    password_file: str | None = Field(
        None, description="File whose first line is the SSH password (a mounted secret)"
    )
    private_key_file: str | None = Field(None, description="SSH private key file (OpenSSH or PEM)")
    known_hosts: str = Field(description="known_hosts file pinning the server's host key (required)")
    remote_directory: str = Field(".", description="Directory on the server the files go to")
    connect_timeout_seconds: float = Field(15.0, gt=0, description="Time limit to connect and log in")

    @model_validator(mode="after")
    def _credentials(self) -> SftpDestination:
        if self.password is None and self.password_file is None and self.private_key_file is None:
            raise ValueError("sftp: give password, password_file or private_key_file")
        return self

    def secret(self) -> str | None:
        if self.password is not None:
            return self.password.get_secret_value()
        if self.password_file:
            lines = Path(self.password_file).read_text(encoding="utf-8").splitlines()
            return lines[0] if lines else ""
        return None


async def upload(dest: SftpDestination, local: Path, timeout_seconds: float = 60.0) -> str:
    """Upload ``local`` as ``remote_directory/local.name``; returns the remote path. Raises DeliveryError."""
    import asyncssh

    remote = posixpath.join(dest.remote_directory, local.name)
    partial = remote + ".part"
    password = dest.secret()
    where = f"sftp://{dest.host}:{dest.port}"

    async def go() -> None:
        keys: Any = [dest.private_key_file] if dest.private_key_file else None
        conn = await asyncio.wait_for(
            asyncssh.connect(
                dest.host,
                port=dest.port,
                username=dest.username,
                password=password,
                client_keys=keys,
                known_hosts=dest.known_hosts,
                agent_path=None,
                config=[],
                login_timeout=dest.connect_timeout_seconds,
                preferred_auth="publickey,password" if keys else "password,keyboard-interactive",
            ),
            dest.connect_timeout_seconds,
        )
        async with conn, conn.start_sftp_client() as sftp:
            await sftp.put(str(local), partial)
            if await sftp.exists(remote):
                await sftp.remove(remote)
            await sftp.rename(partial, remote)

    try:
        await asyncio.wait_for(go(), timeout_seconds)
    except asyncssh.HostKeyNotVerifiable as exc:
        raise DeliveryError(
            f"{where}: the server's host key does not match known_hosts {dest.known_hosts}"
        ) from exc
    except asyncssh.PermissionDenied as exc:
        raise DeliveryError(f"{where}: login refused for {dest.username} (wrong password or key)") from exc
    except (asyncssh.Error, OSError, TimeoutError) as exc:
        text = str(exc)
        if password:
            text = text.replace(password, "***")
        raise DeliveryError(
            f"{where}: upload of {local.name} to {remote} failed: {type(exc).__name__}: {text[:200]}"
        ) from exc
    return remote
