"""The job registry and the contracts of core/types: every job meets the Job Protocol, the jobs:
section is built from the registry, and the poll capability is told by PollingChannel."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hms_ach.app.job_settings import JobsSettings
from hms_ach.app.jobs import JOB_TYPES, job_names, load_job
from hms_ach.channels import CHANNEL_TYPES
from hms_ach.core.types import JobSchedule, PollingChannel
from hms_ach.ingest.pipeline import Pipeline
from hms_ach.mapping.engine import MappingEngine
from hms_ach.mapping.loader import load_mappings
from hms_ach.store.db import Store
from hms_ach.store.writer import StoreWriter

ROOT = Path(__file__).resolve().parents[3]


def test_the_jobs_are_listed_in_registry_order() -> None:
    assert job_names() == [
        "credential_expiry",
        "housekeeping",
        "claim_creation",
        "audit_checkpoint",
        "alerts",
        "case_timers",
    ]


@pytest.mark.parametrize("name", list(JOB_TYPES.entries))
def test_every_job_has_defaulted_settings_and_a_run(name: str) -> None:
    job = load_job(name)
    assert issubclass(job.Settings, JobSchedule)
    settings = JobsSettings.model_validate({}).job(name)
    assert isinstance(settings, job.Settings) and settings == job.Settings.model_validate({})
    assert callable(job.run)


def test_the_jobs_section_has_one_entry_per_job() -> None:
    assert set(JobsSettings.model_fields) >= set(job_names())
    with pytest.raises(KeyError, match="no job 'nightly'"):
        JobsSettings.model_validate({}).job("nightly")


@pytest.fixture
def pipeline(tmp_path: Path) -> Iterator[Pipeline]:
    store = Store(f"sqlite:///{tmp_path}/store.db")
    yield Pipeline(StoreWriter(store), MappingEngine(load_mappings(ROOT / "mappings")))
    store.dispose()


def _channel(kind: str, pipeline: Pipeline, **settings: Any) -> object:
    cls = CHANNEL_TYPES.load(kind)
    return cls(cls.Config.model_validate({"name": "c", "type": kind, **settings}), pipeline)


def test_only_polling_channels_are_polling_channels(pipeline: Pipeline, tmp_path: Path) -> None:
    sftp = _channel(
        "sftp_csv",
        pipeline,
        host="h",
        username="u",
        password="p",
        accept_any_host_key=True,
        dataset="staff_roster",
    )
    assert isinstance(sftp, PollingChannel)
    assert isinstance(_channel("file_drop", pipeline, directory=str(tmp_path)), PollingChannel)
    assert not isinstance(_channel("mllp", pipeline, port=0), PollingChannel)
    assert not isinstance(_channel("fhir_rest", pipeline), PollingChannel)
