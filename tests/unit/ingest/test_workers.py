"""What a map worker is sent and sends back (hms_ach/ingest/workers.py), without processes."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from hms_ach.hl7v2.policy import Hl7Policy
from hms_ach.ingest.pipeline import evaluate
from hms_ach.ingest.workers import MapWorkers, compact, compiled_engine, lost, portable, restore
from hms_ach.mapping.loader import load_mappings

ROOT = Path(__file__).resolve().parents[3]
SAMPLES = ROOT / "samples" / "hl7"


def _raw(name: str) -> bytes:
    return (SAMPLES / name).read_bytes().replace(b"\r\n", b"\r").replace(b"\n", b"\r")


def test_a_compiled_mapping_set_is_sent_without_its_compiled_code_and_maps_alike() -> None:
    mset = load_mappings(ROOT / "mappings")
    here = compiled_engine(mset, "UTC")  # caches exec'd functions on mset: those cannot be pickled
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        pickle.dumps(mset)
    there = compiled_engine(pickle.loads(pickle.dumps(portable(mset))), "UTC")
    policy = Hl7Policy("adt_in")
    for name in ("adt_a01.hl7", "adt_a08.hl7", "adt_a03.hl7", "mfn_m02.hl7", "bad/bad_sex_code.hl7"):
        raw = _raw(name)
        assert repr(evaluate(raw, policy, there)) == repr(evaluate(raw, policy, here)), name


def test_an_evaluation_travels_without_its_raw_bytes_and_comes_back_whole() -> None:
    engine = compiled_engine(load_mappings(ROOT / "mappings"), "UTC")
    policy = Hl7Policy("adt_in")
    for name in ("adt_a01.hl7", "bad/bad_sex_code.hl7"):
        raw = _raw(name)
        ev = evaluate(raw, policy, engine)
        sent = pickle.dumps(compact(ev))
        assert raw not in sent
        back = restore(pickle.loads(sent), raw)
        assert repr(back) == repr(ev)
        if ev.error is not None:  # the error keeps its class, text, location and code
            assert back.error is not None
            assert (type(back.error), back.error.message, back.error.location, back.error.code) == (
                type(ev.error),
                ev.error.message,
                ev.error.location,
                ev.error.code,
            )


def test_a_message_whose_workers_were_lost_keeps_its_key_and_gets_an_internal_error() -> None:
    raw = _raw("adt_a01.hl7")
    ev = lost(raw, Hl7Policy("adt_in"))
    assert ev.header is not None and ev.meta.idempotency_key == "ADTSYS|GENHOSP|S-A01-0001"
    assert ev.error is not None and ev.error.code == "207" and ev.error.ack_code == "AE"
    assert ev.result is None and ev.crashed
    unreadable = lost(b"not hl7", Hl7Policy("adt_in"))
    assert unreadable.header is None and unreadable.error is not None and unreadable.error.ack_code == "AR"


def test_a_pool_needs_a_worker() -> None:
    with pytest.raises(ValueError, match="at least one worker"):
        MapWorkers(0, load_mappings(ROOT / "mappings"), "UTC", 1.0)
