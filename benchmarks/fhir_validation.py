"""The cost of validating FHIR writes against R4 (issue 15), in-process, one thread.

    .venv/bin/python -m benchmarks.fhir_validation [--count 2000] [--repeat 5]

Prints medians over ``--repeat`` runs of:

* per resource: the R4 check of the write path (:func:`hms_ach.mapping.fhir_instance.problems`, the
  element walk), the same followed by the R4B model as a second opinion, and the R4B model of
  ``fhir.resources`` alone (what the write path ran before issue 15);
* prepares/s: validate (or not) and map with the shipped mapping, the CPU of a create before the
  store;
* creates/s of distinct Practitioners through the FHIR write path (validate, map with the shipped
  mapping, one commit each through the group-commit writer on a fresh SQLite store), with the
  validator, and with it replaced by a function that only returns the resource type.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def practitioner(i: int) -> dict[str, Any]:
    return {
        "resourceType": "Practitioner",
        "identifier": [{"system": "urn:hms-ach:id:staff", "value": f"B{i:07d}"}],
        "active": True,
        "name": [{"use": "official", "family": f"Osei{i}", "given": ["Amara", "K"]}],
        "telecom": [{"system": "email", "value": f"n{i}@example.org", "use": "work"}],
        "gender": "female",
        "birthDate": "1980-04-02",
        "qualification": [
            {
                "identifier": [{"system": "urn:lic", "value": f"RN{i}"}],
                "code": {
                    "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0360", "code": "RN"}]
                },
                "period": {"start": "2020-01-01", "end": "2030-01-01"},
            }
        ],
    }


def per_resource_us(fn: Callable[[dict[str, Any]], Any], bodies: list[dict[str, Any]]) -> float:
    started = time.perf_counter()
    for body in bodies:
        fn(body)
    return (time.perf_counter() - started) / len(bodies) * 1e6


def creates_per_second(count: int, validating: bool) -> float:
    from hms_ach.fhir import write
    from hms_ach.mapping.engine import MappingEngine
    from hms_ach.mapping.loader import load_mappings
    from hms_ach.store import messages
    from hms_ach.store.db import Store
    from hms_ach.store.writer import StoreWriter

    engine = MappingEngine(load_mappings(ROOT / "mappings"))
    original = write.validate
    if not validating:
        write.validate = lambda resource, where="": str(resource["resourceType"])
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(f"sqlite:///{tmp}/bench.db")
        writer = StoreWriter(store)
        try:
            started = time.perf_counter()
            for i in range(count):
                op = write.Operation("POST", "Practitioner", resource=practitioner(i))
                write.prepare(op, engine)
                meta = messages.MessageMeta(
                    channel="fhir_in", raw=b"{}", content_type="fhir+json", control_id=f"r{i}"
                )
                outcome = writer.run_sync(write.request_job(meta, [op], "single"))
                if outcome.error is not None or outcome.results[0].status != 201:
                    raise RuntimeError(f"create {i} failed: {outcome.error or outcome.results[0].status}")
            elapsed = time.perf_counter() - started
        finally:
            write.validate = original
            writer.stop()
            store.dispose()
    return count / elapsed


def prepares_per_second(count: int, validating: bool) -> float:
    """Validate (or not) and map ``count`` Practitioners: the CPU of a create before the store."""
    from hms_ach.fhir import write
    from hms_ach.mapping.engine import MappingEngine
    from hms_ach.mapping.loader import load_mappings

    engine = MappingEngine(load_mappings(ROOT / "mappings"))
    bodies = [practitioner(i) for i in range(count)]
    original = write.validate
    if not validating:
        write.validate = lambda resource, where="": str(resource["resourceType"])
    try:
        for body in bodies[:50]:  # warm up: the mapping's FHIRPath expressions compile on first use
            write.prepare(write.Operation("POST", "Practitioner", resource=body), engine)
        started = time.perf_counter()
        for body in bodies:
            write.prepare(write.Operation("POST", "Practitioner", resource=body), engine)
        return count / (time.perf_counter() - started)
    finally:
        write.validate = original


def run(count: int, repeat: int) -> dict[str, float]:
    import pydantic
    from fhir.resources.R4B import get_fhir_model_class

    from hms_ach.mapping import fhir_instance

    model = get_fhir_model_class("Practitioner")
    bodies = [practitioner(i) for i in range(count)]
    fhir_instance.problems(bodies[0])  # load the models once

    def model_only(body: dict[str, Any]) -> None:
        try:
            model.model_validate(body)
        except pydantic.ValidationError:
            pass

    samples: dict[str, list[float]] = {}
    for _ in range(repeat):
        for name, value in (
            ("r4_check_us", per_resource_us(fhir_instance.problems, bodies)),
            (
                "r4_check_plus_model_us",
                per_resource_us(lambda b: fhir_instance.problems(b, model_check=True), bodies),
            ),
            ("r4b_model_only_us", per_resource_us(model_only, bodies)),
            ("prepares_per_s_validating", prepares_per_second(count, True)),
            ("prepares_per_s_not_validating", prepares_per_second(count, False)),
            ("creates_per_s_validating", creates_per_second(count, True)),
            ("creates_per_s_not_validating", creates_per_second(count, False)),
        ):
            samples.setdefault(name, []).append(value)
    medians = {k: statistics.median(v) for k, v in samples.items()}
    medians["validation_share_of_create"] = (
        1 - medians["creates_per_s_validating"] / medians["creates_per_s_not_validating"]
    )
    medians["validation_share_of_prepare"] = (
        1 - medians["prepares_per_s_validating"] / medians["prepares_per_s_not_validating"]
    )
    return medians


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fhir_validation", description=__doc__)
    p.add_argument("--count", type=int, default=2000, help="Practitioners per run")
    p.add_argument("--repeat", type=int, default=5, help="runs; medians are printed")
    args = p.parse_args(argv)
    for name, value in run(args.count, args.repeat).items():
        print(f"{name:<30} {value:,.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
