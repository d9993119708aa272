"""The scheduled jobs: ``JOB_TYPES``, one line per job. A new job is one module plus one line here.

Each entry names a class that meets :class:`hms_ach.core.types.Job`: a ``Settings`` model (its
``jobs: <name>:`` section of channels.yaml, extending :class:`hms_ach.core.types.JobSchedule`) and
``run(tx, settings) -> summary``. The ``jobs:`` section (:mod:`hms_ach.app.job_settings`) and the
scheduler (:mod:`hms_ach.app.scheduler`) take the jobs from here, in the order listed; besides
them the scheduler polls every polling channel (``poll:<channel>``).
"""

from __future__ import annotations

from typing import Any

from hms_ach.core.registry import Registry
from hms_ach.core.types import Job

JOB_TYPES = Registry(
    "job",
    {
        "credential_expiry": "hms_ach.workforce.credentials:CredentialExpiryJob",
        "housekeeping": "hms_ach.ingest.housekeeping:HousekeepingJob",
        "claim_creation": "hms_ach.billing.claim_job:ClaimCreationJob",
        "audit_checkpoint": "hms_ach.store.audit_checkpoints:AuditCheckpointJob",
        "alerts": "hms_ach.outbound.alerts:AlertJob",
        "case_timers": "hms_ach.cases.sla:CaseTimerJob",
    },
)


def job_names() -> list[str]:
    """The jobs in the order listed (``hms-ach jobs`` shows them so, after the polls)."""
    return list(JOB_TYPES.entries)


def load_job(name: str) -> Job[Any]:
    """The job ``name``, ready to run."""
    job: Job[Any] = JOB_TYPES.load(name)()
    return job
