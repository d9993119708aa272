"""The compiled message mappings give exactly what the interpreted engine gives."""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hms_ach.core.errors import MessageError
from hms_ach.core.hl7message import Hl7Message
from hms_ach.core.records import MappingResult
from hms_ach.hl7v2.parse import parse
from hms_ach.mapping import goldens
from hms_ach.mapping.compiler import Unsupported, generate
from hms_ach.mapping.compiler_check import compiled_difference, first_difference, outcome
from hms_ach.mapping.engine import INTERPRETED_ENV, MappingEngine
from hms_ach.mapping.loader import LoadedFile, MappingSet, load_mappings

ROOT = Path(__file__).resolve().parents[3]
MAPPINGS = ROOT / "mappings"


@pytest.fixture(scope="module")
def mset() -> MappingSet:
    return load_mappings(MAPPINGS)


def _golden_messages() -> list[bytes]:
    found = []
    for path in goldens.discover(MAPPINGS):
        for case in goldens.load_golden_file(path).model.cases:
            if case.csv is None and case.fhir is None and case.event is None and case.transform is None:
                if case.generated is None:
                    found.append(goldens.message_bytes(case, ROOT))
    return found


def _inputs() -> list[bytes]:
    samples = [p.read_bytes() for p in sorted((ROOT / "samples" / "hl7").rglob("*.hl7"))]
    return samples + _golden_messages()


def test_every_sample_and_golden_message_maps_alike_on_both_paths(mset: MappingSet) -> None:
    engine = MappingEngine(mset, "America/New_York")
    compared = 0
    for raw in _inputs():
        try:
            msg = parse(raw)
            mapping = engine.mapping_for(msg)
        except MessageError:
            continue  # refused before any mapping runs: there is nothing to compare
        assert compiled_difference(engine, msg, mapping) is None, raw[:120]
        compared += 1
    assert compared > 50


#: what a mutation puts into a component: empties, HL7 nulls, escapes, separators, unknown codes
_PIECES = [
    "",
    '""',
    "X",
    "\\T\\",
    "\\E\\",
    "\\H\\",
    "ISO",
    "MR",
    "I",
    "O",
    "19750314",
    "bad&date",
    "F",
    "1&2&3",
    "^^^",
]


def _mutate(raw: bytes, rnd: random.Random) -> bytes:
    """``raw`` with a few segments duplicated or dropped and components replaced or repeated."""
    segs = raw.decode("latin-1").replace("\n", "\r").split("\r")
    for _ in range(rnd.randint(1, 6)):
        i = rnd.randrange(1, len(segs))
        if not segs[i]:
            continue
        op = rnd.random()
        if op < 0.15:
            segs.insert(rnd.randrange(1, len(segs)), segs[i])
            continue
        if op < 0.2 and len(segs) > 2:
            del segs[i]
            continue
        fields = segs[i].split("|")
        j = rnd.randrange(1, len(fields) + 2)
        fields += [""] * (j + 1 - len(fields))
        comps = fields[j].split("^")
        c = rnd.randrange(0, len(comps) + 1)
        comps += [""] * (c + 1 - len(comps))
        comps[c] = rnd.choice(_PIECES)
        fields[j] = "^".join(comps) if rnd.random() < 0.8 else fields[j] + "~" + "^".join(comps)
        segs[i] = "|".join(fields)
    return "\r".join(segs).encode("latin-1")


def test_mutated_messages_map_alike_on_both_paths(mset: MappingSet) -> None:
    """Missing, empty, repeated and badly coded fields (errors and warnings included): no difference."""
    engine = MappingEngine(mset)
    rnd = random.Random(20)
    samples = [p.read_bytes() for p in sorted((ROOT / "samples" / "hl7").glob("*.hl7"))]
    compared = errors = 0
    for _ in range(600):
        raw = _mutate(rnd.choice(samples), rnd)
        try:
            msg = parse(raw)
            mapping = engine.mapping_for(msg)
        except MessageError:
            continue
        assert compiled_difference(engine, msg, mapping) is None, raw
        compared += 1
        errors += "error" in outcome(lambda msg=msg: engine.map_message(msg, lineage=False))  # type: ignore[misc]
    assert compared > 400 and errors > 10


def test_the_shipped_adt_mappings_compile(mset: MappingSet) -> None:
    engine = MappingEngine(mset)
    fallbacks = engine.compile_all()
    for name in ("adt_a01", "adt_a03", "adt_a08", "dft_p03"):
        assert name not in fallbacks
        assert engine.compiled(mset.messages[name]) is not None


def test_errors_carry_the_same_text_location_and_code(mset: MappingSet) -> None:
    engine = MappingEngine(mset)
    raw = (
        b"MSH|^~\\&|ADT|GENHOSP|HMS|GENHOSP|20261126083000-0500||ADT^A01|X1|P|2.5.1\rPID|1||||Rivera^Maria\r"
    )
    msg = parse(raw)
    interpreted = outcome(lambda: engine.map_interpreted(msg))
    compiled = outcome(lambda: engine.map_message(msg, lineage=False))
    assert "error" in compiled
    assert compiled == interpreted
    assert compiled["error"]["location"] == "PID-3" and compiled["error"]["code"] == "101"


def test_a_difference_is_reported_with_its_first_path() -> None:
    a = {"records": [{"content": {"name": [{"family": "Rivera"}]}}]}
    b = {"records": [{"content": {"name": [{"family": "Riviera"}]}}]}
    assert (
        first_difference(a, b)
        == "records[0].content.name[0].family: interpreted 'Rivera', compiled 'Riviera'"
    )
    assert first_difference(a, a) is None


def test_lineage_and_coverage_stay_interpreted(mset: MappingSet) -> None:
    engine = MappingEngine(mset)
    msg = parse((ROOT / "samples" / "hl7" / "adt_a01.hl7").read_bytes())
    traced = engine.map_message(msg)
    assert any(rec.lineage for rec in traced.records)
    fast = engine.map_message(msg, lineage=False)
    assert not any(rec.lineage for rec in fast.records)


def test_the_environment_switch_forces_the_interpreted_path(
    mset: MappingSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(INTERPRETED_ENV, "1")
    engine = MappingEngine(mset)

    def no_compiling(*_: object) -> None:
        raise AssertionError("the compiled path was used")

    monkeypatch.setattr(MappingEngine, "compiled", no_compiling)
    msg = parse((ROOT / "samples" / "hl7" / "adt_a01.hl7").read_bytes())
    assert engine.map_message(msg, lineage=False).records


def test_what_does_not_compile_says_why(mset: MappingSet) -> None:
    csv = next(f for f in mset.messages.values() if f.model.match.input == "csv")
    with pytest.raises(Unsupported, match="only HL7 v2"):
        generate(mset, csv, "UTC")
    assert "def _M1_adt_a01(msg):" in generate(mset, mset.messages["adt_a01"], "UTC")


def test_engines_of_one_mapping_set_share_the_compiled_code(mset: MappingSet) -> None:
    adt = mset.messages["adt_a01"]
    first, second = MappingEngine(mset, "Europe/Paris"), MappingEngine(mset, "Europe/Paris")
    assert first.compiled(adt) is second.compiled(adt) is not None
    assert MappingEngine(mset, "UTC").compiled(adt) is not first.compiled(adt)  # times read differ


def test_a_golden_case_fails_where_the_compiled_path_differs(
    mset: MappingSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    golden = goldens.load_golden_file(MAPPINGS / "messages" / "adt_a01_test.yaml")
    index = next(i for i, c in enumerate(golden.model.cases) if c.sample and c.expect.error is None)
    assert goldens.run_case(golden, index, mset, ROOT, parse).passed
    real = MappingEngine.compiled

    def drifted(self: MappingEngine, f: LoadedFile) -> Callable[[Hl7Message], MappingResult]:
        fn = real(self, f)
        assert fn is not None

        def run(msg: Hl7Message) -> MappingResult:
            result = fn(msg)
            result.records[0].content["gender"] = "unknown-drift"
            return result

        return run

    monkeypatch.setattr(MappingEngine, "compiled", drifted)
    failed = goldens.run_case(golden, index, mset, ROOT, parse)
    assert not failed.passed
    assert "compiled and the interpreted mapping differ at records[0].content.gender" in failed.message


@pytest.mark.parametrize(
    "value",
    [
        {"system": "urn:x", "code": "MR", "display": "Medical record number"},
        {"coding": [{"system": "urn:x", "code": "I"}], "text": "inpatient"},
        {"reference": "@as:patient"},
        {"a": [None, {}, {"reference": "@as:x"}], "b": {"c": ["d", 1, True]}},
        [{"x": 1}, [], "", None],
        ["a", "b"],
    ],
)
def test_runtime_fresh_and_empty_list_match_the_interpreter(value: Any) -> None:
    """The generated code's copy and emptiness test of lists give what the interpreter's do."""
    from collections import OrderedDict

    from hms_ach.core.records import MappingResult
    from hms_ach.mapping import compiler_runtime
    from hms_ach.mapping.engine import _empty, _fresh, _Run

    for given in (value, OrderedDict(value) if isinstance(value, dict) else value):
        a, b = _Run(MappingResult(mapping="x"), False), _Run(MappingResult(mapping="x"), False)
        copied = compiler_runtime.fresh(given, a)
        assert copied == _fresh(given, b) and a.dirty == b.dirty
        assert copied is not given
    lists: list[list[Any]] = [[], [""], ['""', None], [[], {}], [[""], "x"], [{"a": 1}]]
    for items in lists:
        assert compiler_runtime.empty_list(items) == _empty(items)


def test_the_generated_code_splits_a_text_only_when_the_message_has_not_split_it(mset: MappingSet) -> None:
    """Every split in the compiled ADT^A01 is the miss of a per-message cache (``reps_of``,
    ``comps_of``, ``subs_of``): a field read by ten rules is split once per message."""
    source = generate(mset, mset.messages["adt_a01"], "UTC")
    splits = [line.strip() for line in source.splitlines() if ".split(" in line]
    assert len(splits) > 50
    for line in splits:
        assert re.fullmatch(
            r"(_\w+) = (reps|comps|subs)_of\[(_\w+(?:\[0\])?)\] = \3\.split\((RS|CS|SS)\)", line
        ), line
    assert "unesc(" not in source  # escapes are decoded through the message's cache too


def test_a_field_split_once_serves_every_read_of_it(mset: MappingSet) -> None:
    """Repetitions, filters, components and escapes read from the same fields by several rules:
    the shared split and decoding give what the interpreter gives, message after message."""
    engine = MappingEngine(mset, "UTC")
    base = (ROOT / "samples" / "hl7" / "adt_a01.hl7").read_bytes().decode("latin-1").replace("\n", "\r")
    pid3 = "A\\T\\1^^^HOSP^MR~B2^^^SSA&2.16&ISO^SS~A\\T\\1^^^HOSP^MR"
    segs = [
        ("PID|1||" + pid3 + "|" + s.split("|", 4)[4]) if s.startswith("PID|") else s for s in base.split("\r")
    ]
    for raw in ("\r".join(segs).encode("latin-1"), base.encode("latin-1")):
        msg = parse(raw)
        assert compiled_difference(engine, msg) is None
    fast = engine.map_message(parse("\r".join(segs).encode("latin-1")), lineage=False)
    patient = next(r for r in fast.records if r.resource_type == "Patient")
    assert patient.key_value == "A&1"


@pytest.mark.parametrize(
    "value",
    [
        "text",
        {"system": "urn:x", "code": "MR", "display": None},
        {"reference": "@as:patient"},
        {"coding": [{"system": "urn:x"}]},
        ["a", 1, True],
        ["a", None],
        [{}],
    ],
)
def test_a_constant_is_copied_as_fresh_copies_it(mset: MappingSet, value: Any) -> None:
    """The copy the generated code makes of a constant (``dict()`` when flat) equals ``_fresh``'s,
    leaves the run as dirty as ``_fresh`` does, and shares no container with the mapping file."""
    from hms_ach.mapping.compiler import _GLOBALS, MappingCompiler
    from hms_ach.mapping.engine import _fresh, _Run

    gen = MappingCompiler(mset, "UTC").gen
    expr = gen.copy_of(value)
    a, b = _Run(MappingResult(mapping="x"), False), _Run(MappingResult(mapping="x"), False)
    copied = eval(expr, {**_GLOBALS, **gen.consts, "run": a})  # noqa: S307 - the generated expression
    assert copied == _fresh(value, b) and a.dirty == b.dirty
    assert copied is not value or not isinstance(value, (dict, list))


@pytest.mark.parametrize(
    ("unmapped", "default"),
    [
        ("keep", None),
        ("default", "urn:id:{code}"),
        ("default", {"code": "UNK"}),
        ("default", None),
        ("error", None),
    ],
)
@pytest.mark.parametrize("code", ["ZZ", " zz ", "  "])
def test_an_unmapped_code_is_answered_as_lookup_answers_it(
    mset: MappingSet, unmapped: str, default: Any, code: str
) -> None:
    """The inlined answer for a code not in a table is ``lookup``'s (the same object for a default,
    the same error text and location for ``unmapped: error``)."""
    from hms_ach.core.errors import MappingError
    from hms_ach.mapping.compiler import _GLOBALS, MappingCompiler
    from hms_ach.mapping.spec import CodeTable
    from hms_ach.mapping.terminology import lookup

    table = CodeTable(kind="table", map={"A": "x"}, unmapped=unmapped, default=default)
    gen = MappingCompiler(mset, "UTC").gen
    expr = gen.unmapped(table, "T_", "'codes'", "_v", "'PID-8'")
    scope = {**_GLOBALS, **gen.consts, "T_": table, "_v": code, "_tk": code.strip()}
    try:
        expected: Any = lookup(table, "codes", code, "PID-8")
    except MappingError as exc:
        with pytest.raises(MappingError) as got:
            eval(expr, scope)  # noqa: S307 - the generated expression
        assert (got.value.message, got.value.location, got.value.code) == (
            exc.message,
            exc.location,
            exc.code,
        )
        return
    answer = eval(expr, scope)  # noqa: S307 - the generated expression
    assert answer == expected and (answer is expected or not isinstance(expected, dict))
