"""The contracts of the extension points, as types: channels, sinks and scheduled jobs.

Each kind has a registry of ``name -> "module:attr"`` (:class:`hms_ach.core.registry.Registry`):
``CHANNEL_TYPES`` in :mod:`hms_ach.channels`, ``SINK_TYPES`` in :mod:`hms_ach.outbound`,
``JOB_TYPES`` in :mod:`hms_ach.app.jobs`. What an entry must provide is said here, once, as a
:class:`typing.Protocol`: a class matches by its shape, it does not inherit anything.

* **Channel** (inbound): a class with a ``Config`` pydantic model (its ``channels.yaml`` entry),
  built as ``cls(config, pipeline)``; :class:`Channel` is the running object.
* **Polling channel**: a channel that also matches :class:`PollingChannel`: an ``async poll()``
  whose result has ``error`` and ``summary()``, and a ``config`` with ``poll_cron`` and
  ``poll_interval_seconds``. The scheduler gives each one a ``poll:<channel>`` job.
* **Sink** (outbound): a class with a ``Config`` (extending
  :class:`hms_ach.outbound.sinks.SinkSettings`), built as ``cls(config, store)``; :class:`Sink` is
  the running object the outbox dispatcher hands each due row to.
* **Job** (scheduled): a class with a ``Settings`` model (extending :class:`JobSchedule`: its
  ``jobs: <name>:`` section) and ``run(tx, settings) -> summary``, run by the scheduler in one write
  transaction of the store; see :class:`Job`.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol, TypeVar, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, model_validator


# ---------------------------------------------------------------------------- channels
class ChannelSettings(BaseModel):
    """Settings every channel has; each channel type's ``Config`` extends this (its ``channels:``
    entry in channels.yaml, picked by ``type:`` from ``CHANNEL_TYPES``)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Unique channel name, stored with every message it receives")
    type: str = Field(description="Channel type: a name of the channel registry (hms_ach/channels)")
    enabled: bool = Field(True, description="false: declared but not started")


class ChannelConfig(Protocol):
    """What every channel's settings say (:class:`ChannelSettings` has it)."""

    @property
    def name(self) -> str: ...

    @property
    def enabled(self) -> bool: ...


class Channel(Protocol):
    """A running inbound channel."""

    @property
    def config(self) -> ChannelConfig: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class PollSchedule(ChannelConfig, Protocol):
    """The settings of a polling channel: when to poll (``poll_cron`` wins over the interval)."""

    @property
    def poll_cron(self) -> str | None: ...

    @property
    def poll_interval_seconds(self) -> float | None: ...


class PollOutcome(Protocol):
    """What one poll did: ``error`` (None when it worked) and a one-line ``summary()``."""

    @property
    def error(self) -> str | None: ...

    def summary(self) -> str: ...


@runtime_checkable
class PollingChannel(Channel, Protocol):
    """A channel that fetches its input itself, on the scheduler's ``poll:<channel>`` job.

    ``isinstance(channel, PollingChannel)`` is how the engine tells one (it checks the members are
    there: ``config``, ``start``, ``stop``, ``poll``).
    """

    @property
    def config(self) -> PollSchedule: ...

    async def poll(self) -> PollOutcome: ...


# ---------------------------------------------------------------------------- sinks
SettingsT_co = TypeVar("SettingsT_co", covariant=True)
DeliveryT_contra = TypeVar("DeliveryT_contra", contravariant=True)
ResultT_co = TypeVar("ResultT_co", covariant=True)


class Sink(Protocol[SettingsT_co, DeliveryT_contra, ResultT_co]):
    """A running outbound sink. ``settings`` is its validated ``Config``; ``deliver`` is handed one
    due outbox row at a time and raises to fail the attempt; ``close`` frees its connections.

    :data:`hms_ach.outbound.sinks.OutboxSink` names it with the outbox's own types.
    """

    @property
    def settings(self) -> SettingsT_co: ...

    async def deliver(self, delivery: DeliveryT_contra) -> ResultT_co: ...

    async def close(self) -> None: ...


# ---------------------------------------------------------------------------- jobs
class JobSchedule(BaseModel):
    """When a job runs: the settings every job has; each job's ``Settings`` extends it."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(
        True, description="false: the job is not scheduled (hms-ach jobs run still runs it)"
    )
    cron: str | None = Field(None, description="Crontab schedule (minute hour day month weekday)")
    interval_seconds: float | None = Field(
        None, gt=0, description="Run every this many seconds instead of cron"
    )
    misfire_grace_seconds: int = Field(
        3600,
        ge=1,
        description="A run missed (engine down, busy) by up to this long still runs once when possible",
    )

    @model_validator(mode="after")
    def _one_schedule(self) -> JobSchedule:
        if self.cron and self.interval_seconds:
            raise ValueError("give cron or interval_seconds, not both")
        if self.cron:
            from apscheduler.triggers.cron import CronTrigger

            try:
                CronTrigger.from_crontab(self.cron)
            except ValueError as exc:
                raise ValueError(f"cron {self.cron!r}: {exc}") from exc
        return self


SettingsT_contra = TypeVar("SettingsT_contra", bound=JobSchedule, contravariant=True)


class Job(Protocol[SettingsT_contra]):
    """A scheduled job: ``Settings`` (its ``jobs:`` section, a :class:`JobSchedule` with defaults
    for every field) and ``run``.

    ``run(tx, settings)`` does the work in one write transaction of the store (``tx`` is a
    :data:`hms_ach.store.port.Tx`; core does not depend on the store, so it is not named here) and
    returns a one-line summary, which ``hms-ach jobs`` shows. Raising fails the run (and rolls back
    what it wrote); the scheduler records either outcome.
    """

    Settings: ClassVar[type[JobSchedule]]

    def run(self, tx: Any, settings: SettingsT_contra) -> str: ...
