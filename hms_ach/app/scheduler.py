"""The job scheduler: APScheduler 3.x, exactly one per deployment.

Jobs: one ``poll:<channel>`` per polling channel (a :class:`hms_ach.core.types.PollingChannel`,
e.g. ``sftp_csv``; on the channel's ``poll_interval_seconds`` or ``poll_cron``), then the jobs of
:data:`hms_ach.app.jobs.JOB_TYPES` (credential-expiry scan, housekeeping, claim creation), each
scheduled by its ``jobs:`` section in channels.yaml and run in one write transaction.

* Every job has ``coalesce=True`` (missed runs are run once, not once per miss), ``max_instances=1``
  (a run never overlaps the previous one) and a misfire grace time.
* On PostgreSQL the scheduler first takes the leader lock (:class:`hms_ach.store.leader_lock.LeaderLock`:
  ``pg_try_advisory_lock`` on a dedicated connection kept open for as long as it runs; the lock is
  per schema, so separate deployments in one database do not block each other). An instance that does not get it schedules nothing and retries every
  ``lock_retry_seconds``: when the holder dies its session ends, the lock is freed and a standby
  takes over. Before each scheduled run the leader checks that its session still holds the lock
  (the session can end while the process lives: a network break, a restarted server); when it does
  not, the run is skipped, the scheduler stops and stands by (``scheduler.leadership_lost``), so
  two instances never run a job at once. SQLite is one process's store, so its scheduler needs no
  lock.
* Each run's start and outcome go to the ``job_run`` table (:mod:`hms_ach.store.job_runs`), which
  ``hms-ach jobs`` shows.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from hms_ach.app.job_settings import JobsSettings
from hms_ach.app.jobs import job_names, load_job
from hms_ach.core import metrics
from hms_ach.core.types import Channel, JobSchedule, PollingChannel
from hms_ach.store import audit, job_runs
from hms_ach.store.db import Store
from hms_ach.store.leader_lock import LeaderLock
from hms_ach.store.port import Tx
from hms_ach.store.writer import StoreWriter

log = logging.getLogger("hms_ach.app.scheduler")
#: The leader lock's key (the schema is appended: one scheduler per deployment, not per database).
LOCK_KEY = "hms_ach.app.scheduler:"


@dataclass
class JobDef:
    """One scheduled job: ``run`` returns a one-line summary of what it did."""

    name: str
    trigger: BaseTrigger
    run: Callable[[], Awaitable[str]]
    misfire_grace_seconds: int = 3600
    scheduled: bool = True


def trigger_for(cron: str | None, interval_seconds: float | None, timezone: str) -> BaseTrigger:
    if cron:
        return CronTrigger.from_crontab(cron, timezone=timezone)
    return IntervalTrigger(seconds=interval_seconds or 86400, timezone=timezone)


def _schedule_job(name: str, sched: JobSchedule, tz: str, run: Callable[[], Awaitable[str]]) -> JobDef:
    return JobDef(
        name,
        trigger_for(sched.cron, sched.interval_seconds, tz),
        run,
        sched.misfire_grace_seconds,
        sched.enabled,
    )


def _poll_job(name: str, channel: PollingChannel, timezone: str) -> JobDef:
    cfg = channel.config

    async def poll(channel: PollingChannel = channel) -> str:  # bound here: a reload makes a new job
        result = await channel.poll()
        if result.error:
            raise RuntimeError(result.error)
        return str(result.summary())

    return JobDef(
        f"poll:{name}",
        trigger_for(cfg.poll_cron, cfg.poll_interval_seconds, timezone),
        poll,
        max(60, int(cfg.poll_interval_seconds or 3600)),
    )


def _registered_job(name: str, settings: JobsSettings, writer: StoreWriter) -> JobDef:
    job = load_job(name)
    job_settings = settings.job(name)

    actor = audit.actor_json(kind="system", job=name)

    def run_in(tx: Tx) -> str:
        with audit.acting(tx, actor):  # the job is who changes records here, in the audit trail
            return job.run(tx, job_settings)

    async def run() -> str:
        return await writer.run(run_in)

    return _schedule_job(name, job_settings, settings.timezone, run)


def build_jobs(settings: JobsSettings, writer: StoreWriter, channels: Mapping[str, Channel]) -> list[JobDef]:
    """The jobs of a deployment: one poll per polling channel, then the jobs of JOB_TYPES."""
    jobs = [
        _poll_job(name, channel, settings.timezone)
        for name, channel in channels.items()
        if isinstance(channel, PollingChannel)
    ]
    jobs += [_registered_job(name, settings, writer) for name in job_names()]
    return jobs


class Scheduler:
    def __init__(self, store: Store, writer: StoreWriter, jobs: list[JobDef], settings: JobsSettings):
        self.store = store
        self.writer = writer
        self.jobs = {j.name: j for j in jobs}
        self.settings = settings
        self.aps: AsyncIOScheduler | None = None
        self.leader = False
        self._lock = LeaderLock(store, LOCK_KEY)
        self._standby: asyncio.Task[None] | None = None
        self._running: dict[asyncio.Task[Any], str] = {}  # runs in progress -> job name
        self._writes: set[asyncio.Future[Any]] = set()

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> bool:
        """Start scheduling if this instance gets the lock; else stand by. Returns whether it leads."""
        if await asyncio.to_thread(self._take_lock):
            self._start_aps()
            return True
        log.info("scheduler.standby", extra={"retry_seconds": self.settings.lock_retry_seconds})
        self._standby = asyncio.create_task(self._wait_for_lock())
        return False

    async def stop(self) -> None:
        if self._standby is not None:
            self._standby.cancel()
            try:
                await self._standby
            except asyncio.CancelledError:
                pass
            self._standby = None
        if self.aps is not None:
            self.aps.pause()
            if self._running:  # let runs in progress finish their commits (bounded)
                await asyncio.wait(set(self._running), timeout=self.settings.stop_timeout_seconds)
            self.aps.shutdown(wait=False)
            self.aps = None
        if self._writes:  # bookkeeping commits of cancelled runs: let them land
            await asyncio.wait(set(self._writes), timeout=self.settings.stop_timeout_seconds)
        await asyncio.to_thread(self._release_lock)
        self.leader = False

    @property
    def running_jobs(self) -> list[str]:
        """The names of the jobs running now (a stop waits for them)."""
        return sorted(self._running.values())

    def _take_lock(self) -> bool:
        got = self._lock.try_take()
        if got:
            self.leader = True
        return got

    def _release_lock(self) -> None:
        if not self._lock.release():
            log.warning("scheduler.unlock_failed")

    async def _wait_for_lock(self) -> None:
        while True:
            await asyncio.sleep(self.settings.lock_retry_seconds)
            try:
                if await asyncio.to_thread(self._take_lock):
                    log.info("scheduler.took_over")
                    self._start_aps()
                    return
            except Exception:  # noqa: BLE001 - the database may be down; try again later
                log.exception("scheduler.lock_failed")

    def _start_aps(self) -> None:
        self.aps = AsyncIOScheduler(timezone=self.settings.timezone)
        for job in self.jobs.values():
            if job.scheduled:
                self._add(job)
        self.aps.start()
        log.info("scheduler.started", extra={"jobs": sorted(self.jobs)})

    def _add(self, job: JobDef) -> None:
        assert self.aps is not None
        self.aps.add_job(
            self._scheduled_run,
            job.trigger,
            args=[job.name],
            id=job.name,
            name=job.name,
            coalesce=True,
            max_instances=1,
            misfire_grace_time=job.misfire_grace_seconds,
            replace_existing=True,
        )

    def replace_jobs(self, jobs: list[JobDef], settings: JobsSettings) -> None:
        """Take the jobs of a reloaded config (same time zone; see ``Engine.reload_config``).

        A run looks its job up by name when it starts, so every job runs the new definition (a
        restarted channel's poll polls the new channel). Only jobs whose schedule changed are
        rescheduled; the others keep their next run. Runs in progress finish.
        """
        old, self.jobs, self.settings = self.jobs, {j.name: j for j in jobs}, settings
        if self.aps is None:
            return  # standing by: _start_aps schedules self.jobs when this instance takes over
        for name, job in old.items():
            new = self.jobs.get(name)
            if (
                job.scheduled
                and (new is None or _when(new) != _when(job))
                and self.aps.get_job(name) is not None
            ):
                self.aps.remove_job(name)
        for name, job in self.jobs.items():
            prev = old.get(name)
            if job.scheduled and (prev is None or _when(prev) != _when(job)):
                self._add(job)
        log.info("scheduler.jobs_replaced", extra={"jobs": sorted(self.jobs)})

    # ------------------------------------------------------------------ runs
    async def _scheduled_run(self, name: str) -> None:
        """A run the schedule starts: only while this instance still holds the leader lock."""
        try:
            held = await asyncio.to_thread(self._lock.still_held)
        except Exception:  # noqa: BLE001 - cannot tell: do not act as the leader
            held = False
        if not held:
            await self._lose_leadership(name)
            return
        await self.run_job(name)

    async def _lose_leadership(self, name: str) -> None:
        """The lock's session ended: stop scheduling (runs in progress finish) and stand by."""
        if self.aps is None:
            return
        log.critical("scheduler.leadership_lost", extra={"job": name})
        aps, self.aps = self.aps, None
        aps.shutdown(wait=False)
        self.leader = False
        await asyncio.to_thread(self._release_lock)  # drops the dead session
        if self._standby is None or self._standby.done():
            self._standby = asyncio.create_task(self._wait_for_lock())

    async def run_job(self, name: str) -> tuple[str, str]:
        """Run one job now and record its outcome; never raises (the outcome says what failed)."""
        job = self.jobs.get(name)
        if job is None:
            raise KeyError(f"no job {name!r}; jobs: {', '.join(sorted(self.jobs))}")
        task = asyncio.current_task()
        if task is not None:
            self._running[task] = name
        try:
            await self._write(_record_start(name))
            try:
                detail, status = await job.run(), "ok"
            except Exception as exc:  # noqa: BLE001 - a failing job is recorded, the scheduler goes on
                log.exception("job.failed", extra={"job": name})
                detail, status = f"{type(exc).__name__}: {exc}"[:2000], "error"
            await self._write(_record_end(name, status, detail))
        finally:
            if task is not None:
                self._running.pop(task, None)
        log.info("job.finished", extra={"job": name, "status": status})
        metrics.JOB_RUNS.labels(name, status).inc()
        return status, detail

    async def _write(self, job: Callable[[Tx], None]) -> None:
        """A writer job that a cancelled run does not cancel (its commit still lands)."""
        fut = asyncio.ensure_future(self.writer.run(job))
        self._writes.add(fut)
        fut.add_done_callback(self._writes.discard)
        await asyncio.shield(fut)

    def next_run(self, name: str) -> datetime | None:
        if self.aps is not None:
            job = self.aps.get_job(name)
            if job is not None:
                return job.next_run_time  # type: ignore[no-any-return]
        jd = self.jobs[name]
        if not jd.scheduled:
            return None
        return jd.trigger.get_next_fire_time(None, datetime.now(UTC))  # type: ignore[no-any-return]


def _when(job: JobDef) -> tuple[bool, str, int]:
    """What decides when a job runs (a trigger's text names its type and settings)."""
    return job.scheduled, str(job.trigger), job.misfire_grace_seconds


def _record_start(name: str) -> Callable[[Tx], None]:
    return lambda tx: job_runs.record_start(tx, name)


def _record_end(name: str, status: str, detail: str) -> Callable[[Tx], None]:
    return lambda tx: job_runs.record_end(tx, name, status, detail)
