"""Master-file acknowledgement over the real MLLP listener, python-hl7 as the foreign sender: an
MFN^M02 whose MFI-6 is AL is answered MFK^M02^MFK_M01 with one MFA per MFE, and its resend gets the
same stored MFK (SQLite, and PostgreSQL when set)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import hl7
import hl7.mllp
import pytest

from hms_ach.store.db import Store
from tests.integration.engine_helpers import mllp_channel, mllp_yaml, running_engine

ROOT = Path(__file__).resolve().parents[2]
MFN = (ROOT / "samples" / "hl7" / "mfn_m02.hl7").read_bytes().replace(b"\n", b"\r")


async def _send(port: int, raw: bytes) -> str:
    reader, writer = await hl7.mllp.open_hl7_connection("127.0.0.1", port, limit=1 << 20)
    try:
        writer.writemessage(hl7.parse(raw.decode("latin-1")))
        await writer.drain()
        return str(await asyncio.wait_for(reader.readmessage(), 20)).replace("\n", "\r")
    finally:
        writer.close()


@pytest.mark.timeout(120)
async def test_mfn_with_mfi6_al_is_answered_mfk_with_one_mfa_per_mfe(tmp_path: Path, store: Store) -> None:
    async with running_engine(tmp_path, store, mllp_yaml("adt_in", "idle_timeout_seconds: 30")) as eng:
        port = mllp_channel(eng).port
        answer = await _send(port, MFN)
        segments = [s.split("|") for s in answer.split("\r") if s]
        assert [s[0] for s in segments] == ["MSH", "MSA", "MFI", "MFA", "MFA"], answer
        assert segments[0][8] == "MFK^M02^MFK_M01"
        assert segments[1][1:3] == ["AA", "S-M02-0001"]
        mfas = segments[3:]
        assert [(m[1], m[2], m[4].split("^")[0], m[5]) for m in mfas] == [
            ("MAD", "MFN-0001", "S", "1356702989^^NPI"),
            ("MUP", "MFN-0002", "S", "1234567893^^NPI"),
        ]
        # a resend is answered from what was stored: the same MFK, nothing written twice
        again = await _send(port, MFN)
        assert again == answer
