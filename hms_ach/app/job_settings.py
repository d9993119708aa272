"""The ``jobs:`` section of channels.yaml: the scheduler's own settings, then one section per job
in :data:`hms_ach.app.jobs.JOB_TYPES` (its ``Settings`` model, every field defaulted). SFTP polls
take their schedule from their channel."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, create_model

from hms_ach.app.jobs import JOB_TYPES, job_names
from hms_ach.core.timezones import IanaTimeZone
from hms_ach.core.types import JobSchedule


class _JobsBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(
        True,
        description="Run the scheduler in this engine (one per deployment: on PostgreSQL "
        "an advisory lock makes the other instances stand by)",
    )
    timezone: IanaTimeZone = Field("UTC", description="IANA time zone of the cron schedules")
    lock_retry_seconds: float = Field(30, gt=0, description="How often a standby instance tries to take over")
    stop_timeout_seconds: float = Field(
        30, gt=0, description="On shutdown, how long runs in progress may finish"
    )

    def job(self, name: str) -> JobSchedule:
        """The settings of the job ``name`` (a name of JOB_TYPES)."""
        settings = getattr(self, name, None)
        if not isinstance(settings, JobSchedule):
            raise KeyError(f"no job {name!r} (known: {', '.join(job_names())})")
        return settings


def _job_fields() -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for name in job_names():
        settings_model = JOB_TYPES.load(name).Settings
        fields[name] = (settings_model, Field(default_factory=settings_model))
    return fields


if TYPE_CHECKING:
    JobsSettings = _JobsBase
else:
    JobsSettings = create_model("JobsSettings", __base__=_JobsBase, __module__=__name__, **_job_fields())
