"""A seeded mutation fuzzer over HL7 v2, through a real MLLP channel, on each database.

Every sample of ``samples/hl7`` (the good ones and ``bad/``) seeds mutated messages: byte flips,
inserted NUL / FS (0x1c) / VT (0x0b) bytes, a field repeated thousands of times, truncations,
overlong fields (MSH-3/MSH-10 included), ``\\X00\\`` and malformed escapes, bad encoding
characters, deleted segments, and combinations of them. They are sent over eight connections at
once, each frame answered before the next is sent. The acceptance: every message gets an ACK
(AA/AE/AR, or CA/CE/CR when a mutation made MSH-16 non-empty), nothing crashes (no connection closed, no ``pipeline.unexpected_error``), no log
record carries a traceback, and the channel still takes a good message afterwards.

``FUZZ_MESSAGES`` per database (2,500: 5,000 with both databases) and ``FUZZ_SEED`` can be set in
the environment to run it longer or differently; a failure prints the seed and the message number.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from hms_ach.app.runtime import Engine
from hms_ach.hl7v2.client import normalise_message
from hms_ach.hl7v2.parse import read_header
from hms_ach.store.db import Store
from tests.integration.engine_helpers import mllp_channel, mllp_yaml, running_engine

ROOT = Path(__file__).resolve().parents[2]
SEED = int(os.environ.get("FUZZ_SEED", "20261206"))
MESSAGES = int(os.environ.get("FUZZ_MESSAGES", "2500"))
CONNECTIONS = 8
ACK_TIMEOUT_SECONDS = 20.0
VT, FS, CR = b"\x0b", b"\x1c", b"\r"


def _seeds() -> list[bytes]:
    """The sample messages, in original ACK mode (MSH-15 and MSH-16 emptied)."""
    files = sorted((ROOT / "samples" / "hl7").glob("*.hl7")) + sorted(
        (ROOT / "samples" / "hl7" / "bad").glob("*.hl7")
    )
    seeds = []
    for path in files:
        raw = path.read_bytes()
        if raw.startswith(b"MSH|"):
            first, _, rest = normalise_message(raw).partition(CR)
            fields = first.split(b"|")
            for n in (15, 16):  # MSH-n is fields[n - 1]
                if len(fields) >= n:
                    fields[n - 1] = b""
            raw = b"|".join(fields) + CR + rest
        seeds.append(raw)
    assert len(seeds) >= 20
    return seeds


# ---------------------------------------------------------------------------- mutations
Mutation = Callable[[random.Random, bytes], bytes]


def _segments(msg: bytes) -> list[bytes]:
    return [s for s in msg.replace(b"\r\n", CR).replace(b"\n", CR).split(CR) if s]


def _join(segments: list[bytes]) -> bytes:
    return b"".join(s + CR for s in segments)


def _pick_field(rng: random.Random, msg: bytes) -> tuple[list[bytes], int, list[bytes], int]:
    segments = _segments(msg) or [b"MSH|^~\\&"]
    i = rng.randrange(len(segments))
    fields = segments[i].split(b"|")
    first = 2 if i == 0 and rng.random() < 0.9 else 1  # MSH-2 now and then (bad_encoding_chars has it)
    n = rng.randrange(first, len(fields)) if len(fields) > first else 0
    return segments, i, fields, n


def _set_field(segments: list[bytes], i: int, fields: list[bytes], n: int, value: bytes) -> bytes:
    fields[n] = value
    segments[i] = b"|".join(fields)
    return _join(segments)


def flip_bytes(rng: random.Random, msg: bytes) -> bytes:
    data = bytearray(msg)
    for _ in range(rng.randint(1, 6)):
        if data:
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    return bytes(data)


def insert_control(rng: random.Random, msg: bytes) -> bytes:
    at = rng.randrange(len(msg) + 1)
    return msg[:at] + rng.choice([b"\x00", b"\x00\x00", FS, VT, b"\x00" + CR]) + msg[at:]


def huge_repetitions(rng: random.Random, msg: bytes) -> bytes:
    segments, i, fields, n = _pick_field(rng, msg)
    value = fields[n] or b"X"
    return _set_field(segments, i, fields, n, b"~".join([value] * rng.choice([50, 999, 1001, 5000, 30000])))


def truncate(rng: random.Random, msg: bytes) -> bytes:
    return msg[: rng.randrange(len(msg) + 1)]


def overlong_field(rng: random.Random, msg: bytes) -> bytes:
    size = rng.choice([200, 256, 300, 3000, 70000])
    if rng.random() < 0.4:  # MSH-3, MSH-4 or MSH-10: the key
        segments = _segments(msg) or [b"MSH|^~\\&"]
        fields = segments[0].split(b"|")
        n = rng.choice([2, 3, 9])
        if len(fields) > n:
            return _set_field(segments, 0, fields, n, b"K" * size)
    segments, i, fields, n = _pick_field(rng, msg)
    return _set_field(segments, i, fields, n, bytes(rng.choice(b"0123456789ABC^&") for _ in range(size)))


ESCAPES = [b"\\X00\\", b"\\X4100\\", b"\\X0\\", b"\\Xzz\\", b"\\.sp99999999\\", b"\\.spx\\", b"\\H\\", b"\\"]
ESCAPES += [b"\\Z12\\", b"\\C2842\\", b"\\M244241\\", b"\\\\", b"\\E\\", b"\\X\\", b"\\.br\\"]


def escapes(rng: random.Random, msg: bytes) -> bytes:
    segments, i, fields, n = _pick_field(rng, msg)
    value = fields[n]
    at = rng.randrange(len(value) + 1)
    return _set_field(segments, i, fields, n, value[:at] + rng.choice(ESCAPES) + value[at:])


def bad_encoding_chars(rng: random.Random, msg: bytes) -> bytes:
    if len(msg) < 8:
        return msg
    at = rng.randrange(3, 8)
    return msg[:at] + bytes([rng.choice(b"A1 |^~\\&\x00\x1c#")]) + msg[at + 1 :]


def delete_segment(rng: random.Random, msg: bytes) -> bytes:
    segments = _segments(msg)
    if segments:
        keep_msh = len(segments) > 1 and rng.random() < 0.8
        del segments[rng.randrange(1 if keep_msh else 0, len(segments))]
    return _join(segments)


MUTATIONS: list[Mutation] = [
    flip_bytes,
    insert_control,
    huge_repetitions,
    truncate,
    overlong_field,
    escapes,
    bad_encoding_chars,
    delete_segment,
]


def _asks_for_no_ack(msg: bytes) -> bool:
    """The mutation made MSH-15/16 ask for something else than an ACK to every message."""
    try:
        header = read_header(msg)
    except Exception:  # noqa: BLE001 - an unreadable MSH gets the fallback AR
        return False
    return header.enhanced_mode and header.accept_ack_type.strip() not in ("", "AL")


def mutated(seed: int, count: int) -> list[bytes]:
    """``count`` mutated messages, the same for the same ``seed``; each with its own control id."""
    rng = random.Random(seed)
    seeds = _seeds()
    out: list[bytes] = []
    while len(out) < count:
        msg = rng.choice(seeds).replace(b"|S-", b"|F%05d-" % len(out), 1)  # most resends are new messages
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            msg = rng.choice(MUTATIONS)(rng, msg)
        if not _asks_for_no_ack(msg):
            out.append(msg)
    return out


# ---------------------------------------------------------------------------- the run
@pytest.fixture
async def engine(tmp_path: Path, store: Store) -> AsyncIterator[Engine]:
    async with running_engine(tmp_path, store, mllp_yaml("adt_in", "idle_timeout_seconds: 30")) as eng:
        yield eng


async def _read_ack(reader: asyncio.StreamReader) -> bytes:
    data = await asyncio.wait_for(reader.readuntil(FS), ACK_TIMEOUT_SECONDS)
    return data.lstrip(b"\r\n").removeprefix(VT).removesuffix(FS)


async def _sender(port: int, batch: list[tuple[int, bytes]], acks: dict[int, bytes]) -> None:
    # an ACK echoes MSH fields, which the fuzzer makes long: allow long ACKs
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, limit=4 * 1024 * 1024), 10
    )
    try:
        for number, msg in batch:
            writer.write(VT + msg + FS + CR)
            await writer.drain()
            try:
                acks[number] = await _read_ack(reader)
            except (TimeoutError, asyncio.IncompleteReadError, ConnectionError) as exc:
                raise AssertionError(
                    f"seed {SEED} message {number}: no ACK ({type(exc).__name__}); message starts "
                    f"{msg[:120]!r}"
                ) from None
    finally:
        writer.close()


def _msa_code(ack: bytes) -> str:
    for segment in ack.split(CR):
        if segment.startswith(b"MSA"):
            fs = segment[3:4]
            return segment.split(fs)[1].decode("latin-1") if fs else ""
    return ""


@pytest.mark.timeout(240)
async def test_every_mutated_message_gets_an_ack_and_nothing_crashes(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    batch = list(enumerate(mutated(SEED, MESSAGES)))
    port = int(mllp_channel(engine).port)
    acks: dict[int, bytes] = {}
    start = time.perf_counter()
    await asyncio.gather(*(_sender(port, batch[i::CONNECTIONS], acks) for i in range(CONNECTIONS)))
    elapsed = time.perf_counter() - start
    codes: dict[str, int] = {}
    for number, _msg in batch:
        code = _msa_code(acks[number])
        assert code in ("AA", "AE", "AR", "CA", "CE", "CR"), (
            f"seed {SEED} message {number}: ACK {acks[number][:200]!r}"
        )
        codes[code] = codes.get(code, 0) + 1
    print(f"\n{len(batch)} mutated messages ({engine.store.url.split(':')[0]}): {elapsed:.1f} s, {codes}")

    crashes = [r for r in caplog.records if r.getMessage() == "pipeline.unexpected_error"]
    assert not crashes, [(getattr(r, "error_kind", ""), getattr(r, "where", "")) for r in crashes[:10]]
    tracebacks = [r for r in caplog.records if r.exc_info is not None or "Traceback" in r.getMessage()]
    assert not tracebacks, [(r.name, r.getMessage()[:100]) for r in tracebacks[:10]]
    assert "Traceback" not in caplog.text

    # the channel still takes a good message, and answers it AA
    good = normalise_message((ROOT / "samples" / "hl7" / "adt_a04.hl7").read_bytes())
    after: dict[int, bytes] = {}
    await _sender(port, [(0, good.replace(b"|S-", b"|AFTER-", 1))], after)
    assert _msa_code(after[0]) == "AA"


def test_the_mutations_are_seeded_and_varied() -> None:
    first, again = mutated(7, 200), mutated(7, 200)
    assert first == again and len(set(first)) > 190
    assert any(b"\x00" in m for m in first) and any(b"\\X00\\" in m for m in first)
    assert any(m.count(b"~") > 1000 for m in first)
