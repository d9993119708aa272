"""What the console needs of the running engine, as a Protocol (the console may not import ``app/``).

The engine sets itself as ``app.state.console_engine`` when it starts its HTTP API; a bare app (no
engine) serves the store's pages and says the engine parts are not available.
"""

from __future__ import annotations

from typing import Any, Protocol

from hms_ach.channels.pausing import PauseSwitch
from hms_ach.core.types import Channel
from hms_ach.hl7v2.policy import Hl7Policy
from hms_ach.ingest.pipeline import Pipeline


class ConsoleEngine(Protocol):
    """The parts of :class:`hms_ach.app.runtime.Engine` the console reads and drives."""

    channels: dict[str, Channel]
    pipeline: Pipeline
    mappings: Any  # the loaded MappingSet (golden tests run against it)
    config: Any  # the loaded channels.yaml (sinks, mappings_dir)
    scheduler: Any  # the Scheduler (jobs, next_run), or None when jobs are off

    async def reload_mappings_off_loop(self) -> bool: ...


def pause_switch(channel: Channel) -> PauseSwitch | None:
    """The channel's pause switch, if its type can pause (mllp, sftp_csv, file_drop)."""
    switch = getattr(channel, "pause_switch", None)
    return switch if isinstance(switch, PauseSwitch) else None


def channel_type(channel: Channel) -> str:
    return str(getattr(getattr(channel, "config", None), "type", type(channel).__name__))


def connection_count(channel: Channel) -> int | None:
    count = getattr(getattr(channel, "server", None), "connection_count", None)
    return count if isinstance(count, int) else None


def hl7_policies(engine: ConsoleEngine) -> dict[str, Hl7Policy]:
    """The HL7 v2 policy of each running channel that has one (replay uses the channel's policy)."""
    out: dict[str, Hl7Policy] = {}
    for name, channel in engine.channels.items():
        policy = getattr(channel, "policy", None)
        if isinstance(policy, Hl7Policy):
            out[name] = policy
    return out


def bundle_limit(engine: ConsoleEngine) -> int:
    """The largest ``max_bundle_entries`` of the fhir_rest channels (1000 without one)."""
    limits = [
        int(getattr(ch.config, "max_bundle_entries", 0) or 0)
        for ch in engine.channels.values()
        if channel_type(ch) == "fhir_rest"
    ]
    return max([n for n in limits if n] or [1000])
