"""Pause and resume of an inbound channel (the console's channel control, docs/console.md).

A paused ``mllp`` channel still accepts TCP connections and reads frames, but answers none until it
is resumed: the sender waits for its ACK (no message is refused or lost), and the waiting frames are
processed in order on resume. A paused ``sftp_csv`` or ``file_drop`` channel skips its polls. The
state lives in the running channel (a restart or a reload starts it unpaused).
"""

from __future__ import annotations

import asyncio


class PauseSwitch:
    """One channel's paused flag, with a wait for the resume."""

    def __init__(self) -> None:
        self._running = asyncio.Event()
        self._running.set()

    @property
    def paused(self) -> bool:
        return not self._running.is_set()

    def pause(self) -> None:
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    async def wait_until_running(self) -> None:
        """Return at once when running, else when :meth:`resume` is called."""
        await self._running.wait()
