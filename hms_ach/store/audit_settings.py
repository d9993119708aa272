"""The ``audit:`` section of channels.yaml: where the audit chain's key and checkpoints live, and
which values the audit diffs mask (see docs/audit.md)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

US_SSN = "http://hl7.org/fhir/sid/us-ssn"


class AuditSettings(BaseModel):
    """``audit:`` in channels.yaml."""

    model_config = ConfigDict(extra="forbid")

    key_file: str | None = Field(
        None,
        description="The HMAC-SHA256 key that chains the audit entries and signs the checkpoints: a file "
        "holding 64 hex digits (a mounted secret, shared by every instance on one database); "
        "HMS_ACH_AUDIT_KEY_FILE wins over it; default audit.key in the data directory, created on "
        "first start (mode 0600)",
    )
    checkpoint_file: str | None = Field(
        None,
        description="Append-only file of signed checkpoints (entry count, head hash, time) outside the "
        "database; relative paths are in the data directory; default audit-checkpoints.jsonl there",
    )
    mask_identifier_systems: list[str] = Field(
        default_factory=lambda: [US_SSN],
        description="Identifier systems whose values the audit diffs never show in clear "
        "(any {system, value} object with one of these systems); default the US SSN",
    )
    mask_fields: list[str] = Field(
        default_factory=lambda: ["ssn"],
        description="Record fields whose values the audit diffs never show in clear: a key name "
        "(`ssn`, at any depth) or a dotted path from the record root (`contact.ssn`; list "
        "positions are skipped)",
    )
    access_records: bool = Field(
        True,
        description="Write an access record (a BALP AuditEvent) for every read, search, history and "
        "refusal of patient or staff data; off only to measure its cost (benchmarks) or in development",
    )
    access_queue_entries: int = Field(
        10000,
        ge=100,
        le=1_000_000,
        description="Access records waiting to be written at most; past it a read waits up to "
        "access_overflow_wait_seconds for room, then its record is dropped, counted and logged, and "
        "readiness fails for a minute",
    )
    access_batch_entries: int = Field(
        500, ge=1, le=10_000, description="Access records written in one transaction at most"
    )
    access_flush_interval_seconds: float = Field(
        0.2, gt=0, le=60, description="Longest time an access record waits in the queue before it is written"
    )
    access_overflow_wait_seconds: float = Field(
        0.05,
        ge=0,
        le=5,
        description="How long a read waits for room in a full access queue before its record is dropped",
    )
