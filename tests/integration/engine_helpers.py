"""A running engine with the fhir_rest channel on a loopback port, for the FHIR write, audit and
workforce API tests."""

from __future__ import annotations

import shutil
from pathlib import Path

from hms_ach.app.config import load_config
from hms_ach.app.runtime import Engine
from hms_ach.channels.mllp import MllpChannel
from hms_ach.store.db import Store

ROOT = Path(__file__).resolve().parents[2]
FHIR_JSON = {"content-type": "application/fhir+json"}


async def start_fhir_engine(tmp_path: Path, store: Store) -> Engine:
    """Copy the repository's mappings beside a minimal channels.yaml and start the engine on ``store``."""
    shutil.copytree(ROOT / "mappings", tmp_path / "mappings")
    (tmp_path / "channels.yaml").write_text(
        "engine:\n  mappings: mappings\n  watch: false\n"
        "http:\n  host: 127.0.0.1\n  port: 0\n"
        "channels:\n  - name: fhir_in\n    type: fhir_rest\n    max_body_bytes: 65536\n"
    )
    eng = Engine(load_config(tmp_path / "channels.yaml"), database=store.url)
    await eng.start()
    return eng


def mllp_channel(engine: Engine, name: str = "adt_in") -> MllpChannel:
    """The running MLLP channel ``name`` of ``engine`` (its port, its server)."""
    channel = engine.channels[name]
    assert isinstance(channel, MllpChannel), f"channel {name} is a {type(channel).__name__}"
    return channel
