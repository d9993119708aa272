"""The ``jobs:`` section of channels.yaml. SFTP polls take their schedule from their channel."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class JobSchedule(_Strict):
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


class CredentialExpirySettings(JobSchedule):
    cron: str | None = Field("0 2 * * *", description="Crontab schedule; daily at 02:00 by default")
    days_ahead: int = Field(
        30, ge=0, le=3650, description="Alert on credentials expiring within this many days"
    )


class HousekeepingSettings(JobSchedule):
    cron: str | None = Field("30 3 * * *", description="Crontab schedule; daily at 03:30 by default")
    message_retention_days: int = Field(
        90, ge=1, description="Processed and duplicate messages older than this are deleted (errors are kept)"
    )


class ClaimCreationSettings(JobSchedule):
    cron: str | None = Field("0 1 * * *", description="Crontab schedule; daily at 01:00 by default")
    settle_hours: float = Field(
        12.0,
        ge=0,
        description="Charges of a discharged encounter are complete when none "
        "has changed for this many hours",
    )
    max_claims_per_run: int = Field(
        1000, ge=1, description="At most this many claims per run (the rest next run)"
    )


class JobsSettings(_Strict):
    enabled: bool = Field(
        True,
        description="Run the scheduler in this engine (one per deployment: on PostgreSQL "
        "an advisory lock makes the other instances stand by)",
    )
    timezone: str = Field("UTC", description="IANA time zone of the cron schedules")
    lock_retry_seconds: float = Field(30, gt=0, description="How often a standby instance tries to take over")
    stop_timeout_seconds: float = Field(
        30, gt=0, description="On shutdown, how long runs in progress may finish"
    )
    credential_expiry: CredentialExpirySettings = Field(default_factory=CredentialExpirySettings)
    housekeeping: HousekeepingSettings = Field(default_factory=HousekeepingSettings)
    claim_creation: ClaimCreationSettings = Field(default_factory=ClaimCreationSettings)
