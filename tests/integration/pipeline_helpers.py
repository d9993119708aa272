"""Synchronous drivers of the ingest pipeline for tests that run outside an event loop."""

from __future__ import annotations

from hms_ach.hl7v2.policy import Hl7Policy
from hms_ach.ingest.csv_rows import replay_stored_row
from hms_ach.ingest.pipeline import Outcome, Pipeline, commit_hl7, evaluate


def process_sync(pipeline: Pipeline, raw: bytes, policy: Hl7Policy) -> Outcome:
    """One HL7 v2 message through evaluate -> commit, as the MLLP channel runs it; after the commit."""
    return pipeline.writer.run_sync(commit_hl7(evaluate(raw, policy, pipeline.engine), policy))


def replay_row(pipeline: Pipeline, message_id: int) -> str:
    """Re-run one stored bad CSV row through the current mappings and commit; its new status."""
    return str(pipeline.writer.run_sync(lambda tx: replay_stored_row(tx, pipeline.engine, message_id).status))
