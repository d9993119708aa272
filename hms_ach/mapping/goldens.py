"""Golden-file tests: ``*_test.yaml`` files beside the mappings say what a message must map to.

``hms-ach mapping test`` and the pytest suite (tests/unit/mapping/test_goldens.py) run them. A golden
file sits next to the mapping it tests (``mappings/messages/adt_a01_test.yaml``) and holds a list
of cases::

    cases:
      - name: admit Maria to 4W 412-A          # required; unique within the file
        sample: samples/hl7/adt_a01.hl7         # an HL7 v2 file, relative to the repository root
        expect:
          records:                              # the records the message must yield
            - resourceType: Encounter
              key: {system: "urn:hms-ach:id:GENHOSP", value: V5001}   # optional
              create: true                      # optional: false = update an existing record only
              content:                          # compared as a subset (see below)
                status: in-progress
                location:
                  - location: {reference: "Location?identifier=urn:hms-ach:location|GENHOSP/4W/412/A"}
              absent: [period.end]              # optional: elements that must NOT be set
          actions:                              # optional: store actions, compared as a subset
            - name: merge_patient
      - name: PID-3 missing is an AE
        message: |                              # instead of sample: inline ER7, one line per segment
          MSH|^~\\&|ADTSYS|GENHOSP|HMSACH|GENHOSP|20261126083000-0500||ADT^A01|X1|P|2.5.1
          PID|1||||Rivera^Maria
          PV1|1|I|||||||||||||||||V1
        expect:
          error: {code: "101", location: PID-3, ack: AE}   # each key optional; `message:` = substring

Instead of ``sample``/``message``, a case may give ``csv: {dataset: staff_roster, row: {...}}`` (one
CSV row, header -> value) or ``fhir: {resourceType: Practitioner, ...}`` (a FHIR resource).

An event payload mapping (``mappings/events/``) is tested with ``event:`` (the record change) and
``expect: payload:``, compared exactly (keys, values and nulls)::

      - name: admission
        event:
          event: encounter.admitted
          resource: Encounter/1
          versionId: 1
          action: create
          after: {resourceType: Encounter, status: in-progress, subject: {reference: Patient/2}}
        expect:
          payload: {resource: Encounter/1, versionId: 1, patient: Patient/2, status: in-progress,
                    class: null, location: null}

An event a job or a sink emits rather than a record change (``credential.expiring``,
``claim.file_written``...) gives ``resource`` (the record the event is about) and ``facts:``, the
facts its code hands the mapping (see ``hms_ach.outbound.events.payload_from``); the mapping's
context is then exactly those::

      - name: a patient without coverage
        event:
          event: claim.error
          resource: Claim/32
          facts: {claim: Claim/32, reason: the patient has no coverage (IN1) on file}
        expect:
          payload: {claim: Claim/32, reason: the patient has no coverage (IN1) on file}

Keys of a case: ``name``, ``sample``, ``message``, ``csv`` or ``fhir``, ``expect``, and optionally ``match``
(``subset``, the default, or ``exact``), ``timezone`` (the zone assumed for times sent without a
UTC offset, default UTC) and ``description``.

How records are compared:

* Each expected record is matched to a produced record of the same ``resourceType`` (and ``key``,
  when given; without a key, the first not yet matched record of that type whose content fits).
* **subset** (default): every key and value given must be present with that value; lists are
  compared element by element, by position, each element again as a subset (the produced list may
  be longer). Other records and elements may exist.
* **exact** (``match: exact``): the produced records, in order, are exactly the expected ones, and
  each ``content`` is exactly the record's content.
* References between the records of one message are shown in FHIR's conditional-reference form,
  ``Type?identifier=system|value`` (the referenced record's business key), so that golden files do
  not depend on internal aliases. Action arguments are shown the same way.
* A case with ``error:`` passes only if mapping the message fails with that error: table 0357
  ``code``, HL7 ``location`` (ERR-2), ``ack`` code (AE or AR) and a ``message`` substring.

A failing case says where it is (``file:line``) and shows a unified diff of the expected JSON
against the produced JSON (sorted keys; in subset mode only the parts the expectation names).
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.constructor import RoundTripConstructor
from ruamel.yaml.error import MarkedYAMLError

from hms_ach.core.errors import ConfigError, ConfigErrors, MessageError, SourcePosition
from hms_ach.core.hl7message import Hl7Message
from hms_ach.core.records import MappingResult, RecordWrite
from hms_ach.mapping.compiler_check import compiled_difference
from hms_ach.mapping.engine import MappingEngine
from hms_ach.mapping.loader import MappingSet, Positions, _plain, position_of
from hms_ach.mapping.paths import CsvRecord

# ------------------------------------------------------------------ the golden file schema


class _Strict(BaseModel):
    # `code: 101` and `value: 100001` mean the text; content values are compared as written
    model_config = ConfigDict(extra="forbid", populate_by_name=True, coerce_numbers_to_str=True)


class RecordKey(_Strict):
    system: str | None = Field(None, description="The business key's identifier system")
    value: str = Field(description="The business key's value")


class ExpectedRecord(_Strict):
    resource_type: str = Field(alias="resourceType", description="The record type: Patient, Encounter, ...")
    key: RecordKey | None = Field(None, description="The record's business key; omit to match by type only")
    create: bool | None = Field(None, description="false: the record must be an update-only write")
    content: dict[str, Any] = Field(
        default_factory=dict, description="Expected FHIR content (subset or exact)"
    )
    absent: list[str] = Field(
        default_factory=list, description="Element paths that must not be set, e.g. period.end, location[1]"
    )


class ExpectedAction(_Strict):
    name: str = Field(description="The store action, e.g. merge_patient")
    args: dict[str, Any] = Field(
        default_factory=dict, description="Its arguments (records as conditional references)"
    )


class ExpectedError(_Strict):
    code: str | None = Field(None, description="HL7 table 0357 code (ERR-3), e.g. 101")
    location: str | None = Field(None, description="HL7 location (ERR-2), e.g. PID-3")
    ack: Literal["AE", "AR"] | None = Field(None, description="The acknowledgment code the error gives")
    message: str | None = Field(None, description="Text the error message must contain")


class Expectation(_Strict):
    payload: dict[str, Any] | None = Field(None, description="An event case: the exact payload")
    hl7: str | None = Field(
        None, description="A transform case: the message after the edits, one segment per line (exact)"
    )
    records: list[ExpectedRecord] = Field(default_factory=list, description="Records the message must yield")
    actions: list[ExpectedAction] | None = Field(None, description="Store actions the message must yield")
    error: ExpectedError | None = Field(None, description="The error mapping must fail with")
    warnings: list[ExpectedError] | None = Field(
        None,
        description="The warnings the message must be stored with (rules and records marked "
        "`critical: false` that failed), in order; [] for none",
    )
    no_records: list[str] = Field(
        default_factory=list, description="Record types the message must not yield, e.g. [Encounter]"
    )


class CsvInput(_Strict):
    dataset: str = Field(description="The dataset name the CSV channel gives its rows, e.g. staff_roster")
    row: dict[str, str] = Field(description="Column header -> value")
    line: int = Field(2, description="The row's line number in the file (for error locations)")


class EventInput(BaseModel):
    """A record change, as an event payload mapping sees it."""

    # numbers stay numbers here: versionId and payload values are compared as JSON
    model_config = ConfigDict(extra="forbid")

    event: str = Field(description="The event whose mapping runs, e.g. encounter.admitted")
    resource: str = Field(description="The changed record's reference, e.g. Encounter/1")
    versionId: int = Field(1, description="The record's new version")
    action: Literal["create", "update", "delete"] = Field("update", description="create, update or delete")
    before: dict[str, Any] | None = Field(None, description="The previous content (none on a create)")
    after: dict[str, Any] | None = Field(None, description="The new content (none on a delete)")
    facts: dict[str, Any] | None = Field(
        None,
        description="An event a job or a sink emits (credential.expiring, claim.file_written...): the "
        "facts its code hands the mapping; the context is then `resource` and these facts only",
    )

    def context(self) -> dict[str, Any]:
        if self.facts is not None:
            return {"resource": self.resource, **self.facts}
        out: dict[str, Any] = {"resource": self.resource, "versionId": self.versionId, "action": self.action}
        if self.after is not None:
            out["after"] = self.after
        if self.before is not None:
            out["before"] = self.before
        return out


class GoldenCase(_Strict):
    name: str = Field(description="Name of the case, unique within the file")
    description: str = Field("", description="What the case shows")
    sample: str | None = Field(None, description="HL7 v2 file, relative to the repository root")
    message: str | None = Field(None, description="Inline ER7 message; each line is a segment")
    csv: CsvInput | None = Field(None, description="A CSV row: the dataset name and the row (header: value)")
    fhir: dict[str, Any] | None = Field(
        None, description="A FHIR resource (JSON as YAML) sent to the FHIR channel"
    )
    event: EventInput | None = Field(None, description="A record change an event payload mapping is run on")
    transform: str | None = Field(
        None, description="A kind: hl7 transform (mappings/hl7/) run on `message`/`sample`; expect `hl7:`"
    )
    generated: dict[str, Any] | None = Field(
        None,
        description="A generate file's input (with `transform:`): {event, eventId, now, sender, facility, "
        "records: {record: {...}, patient: {...}}}; expect `hl7:`",
    )
    match: Literal["subset", "exact"] = Field("subset", description="How records are compared")
    timezone: str = Field("UTC", description="Zone assumed for times sent without a UTC offset")
    expect: Expectation = Field(description="What the message must map to")


class GoldenFile(_Strict):
    cases: list[GoldenCase] = Field(description="The test cases")


@dataclass
class LoadedGolden:
    """A checked golden file and the line of each case."""

    path: Path
    model: GoldenFile
    lines: list[int]
    positions: Positions

    def line_of(self, *loc: Any) -> int:
        """The line of a node of the file, e.g. ``line_of("cases", 0, "expect", "records", 2)``."""
        return position_of(self.path, self.positions, loc).line


@dataclass
class CaseResult:
    """The outcome of one case; ``diff`` or ``message`` say what is wrong when it failed."""

    name: str
    passed: bool
    diff: str = ""
    message: str = ""
    file: str = ""
    line: int = 0

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}" if self.line else self.file

    def report(self) -> str:
        """A readable failure report: where, what, and the diff."""
        parts = [f"{self.where}: {self.name}"]
        if self.message:
            parts.append(self.message)
        if self.diff:
            parts.append(self.diff)
        return "\n".join(parts)


# ------------------------------------------------------------------ loading


class _TextTimestamps(RoundTripConstructor):
    """Keep YAML timestamps (2026-11-26) as text: FHIR dates are compared as strings."""


_TextTimestamps.add_constructor("tag:yaml.org,2002:timestamp", RoundTripConstructor.construct_yaml_str)


def discover(mappings_root: Path | str) -> list[Path]:
    """Every ``*_test.yaml`` under ``mappings_root`` (or the file itself), sorted; the workflow
    goldens excepted (:func:`is_workflow_golden`)."""
    root = Path(mappings_root)
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*_test.yaml") if not is_workflow_golden(p))


# ------------------------------------------------------------------ workflow goldens (run elsewhere)

#: The folder of the case workflows: its ``*_test.yaml`` replay cases through a workflow's
#: transitions and are run by :mod:`hms_ach.cases.workflow_goldens`, not by this module.
WORKFLOW_FOLDER = "workflows"


def is_workflow_golden(path: Path) -> bool:
    """Whether ``path`` is a workflow golden file (``mappings/workflows/*_test.yaml``)."""
    return path.parent.name == WORKFLOW_FOLDER and path.name.endswith("_test.yaml")


def load_golden_file(path: Path) -> LoadedGolden:
    """Read and check one golden file; problems raise ConfigErrors naming ``file:line:col``."""
    yaml = YAML(typ="rt")
    yaml.Constructor = _TextTimestamps
    try:
        node = yaml.load(path.read_text(encoding="utf-8"))
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        pos = SourcePosition(str(path), mark.line + 1, mark.column + 1) if mark else SourcePosition(str(path))
        raise ConfigErrors(
            [
                ConfigError(
                    f"YAML syntax error: {exc.problem or exc.context}",
                    pos,
                    "valid YAML (check indentation, colons and quotes)",
                )
            ]
        ) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigErrors(
            [ConfigError(f"cannot read golden file: {exc}", SourcePosition(str(path)))]
        ) from exc
    positions: Positions = {}
    data = _plain(node, (), positions)
    try:
        model = GoldenFile.model_validate(data)
    except ValidationError as exc:
        raise ConfigErrors([_config_error(path, positions, err) for err in exc.errors()]) from exc
    errors: list[ConfigError] = []
    seen: set[str] = set()
    for i, case in enumerate(model.cases):
        given = (case.sample, case.message, case.csv, case.fhir, case.event, case.generated)
        if sum(x is not None for x in given) != 1:
            errors.append(
                ConfigError(
                    f"case {case.name!r} needs exactly one of `sample`, `message`, `csv`, `fhir` or `event` "
                    "(or `generated` with `transform`)",
                    position_of(path, positions, ("cases", i)),
                    "sample: PATH or message: ER7 text",
                )
            )
        if case.name in seen:
            errors.append(
                ConfigError(
                    f"case name {case.name!r} is used twice",
                    position_of(path, positions, ("cases", i, "name")),
                    "unique case names",
                )
            )
        seen.add(case.name)
        if case.generated is not None and case.transform is None:
            errors.append(
                ConfigError(
                    f"case {case.name!r} gives `generated:` records without `transform:`",
                    position_of(path, positions, ("cases", i, "generated")),
                    "transform: the generate file's name",
                )
            )
        if (
            not case.expect.records
            and case.expect.error is None
            and case.expect.actions is None
            and case.expect.payload is None
            and case.expect.hl7 is None
            and case.expect.warnings is None
            and not case.expect.no_records
        ):
            errors.append(
                ConfigError(
                    f"case {case.name!r} expects nothing",
                    position_of(path, positions, ("cases", i, "expect")),
                    "expect: records, actions, error or payload",
                )
            )
        if (case.event is None) != (case.expect.payload is None):
            errors.append(
                ConfigError(
                    f"case {case.name!r}: `event:` goes with `expect: payload:` and only with it",
                    position_of(path, positions, ("cases", i, "expect")),
                    "event: {...} and expect: {payload: {...}}",
                )
            )
    if errors:
        raise ConfigErrors(errors)
    lines = [positions.get(("cases", i), (0, 0))[0] for i in range(len(model.cases))]
    return LoadedGolden(path, model, lines, positions)


def _config_error(path: Path, positions: Positions, err: Any) -> ConfigError:
    loc = tuple(err["loc"])
    pos = position_of(path, positions, loc)
    where = ".".join(str(p) for p in loc)
    if err["type"] == "extra_forbidden":
        owner = _owner_model(loc[:-1])
        choices = [f.alias or n for n, f in owner.model_fields.items()] if owner else []
        hint = difflib.get_close_matches(str(loc[-1]), choices, n=1)
        return ConfigError(
            f"unknown key {loc[-1]!r}" + (f"; did you mean {hint[0]!r}?" if hint else ""),
            pos,
            f"one of {', '.join(choices)}" if choices else None,
        )
    if err["type"] == "missing":
        return ConfigError(f"missing required key {where!r}", pos)
    return ConfigError(f"{where}: {err['msg']}", pos)


def _owner_model(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] = GoldenFile
    nested: dict[str, type[BaseModel]] = {
        "cases": GoldenCase,
        "expect": Expectation,
        "records": ExpectedRecord,
        "event": EventInput,
        "actions": ExpectedAction,
        "error": ExpectedError,
        "key": RecordKey,
    }
    for part in loc:
        if isinstance(part, int):
            continue
        nxt = nested.get(str(part))
        if nxt is None:
            return None
        model = nxt
    return model


# ------------------------------------------------------------------ running


#: Reads the bytes of an HL7 v2 sample into a message (:func:`hms_ach.hl7v2.parse.parse`, given by the caller).
Hl7Parser = Callable[[bytes], Hl7Message]


def run_golden_file(path: Path, mset: MappingSet, repo_root: Path, parse: Hl7Parser) -> list[CaseResult]:
    """Run every case of one golden file; a broken file gives one failed result saying why.

    ``parse`` reads the cases' HL7 v2 samples (the mapping layer does not parse messages itself)."""
    try:
        golden = load_golden_file(path)
    except ConfigErrors as exc:
        return [CaseResult(path.name, False, message=str(exc), file=str(path))]
    return [run_case(golden, i, mset, repo_root, parse) for i in range(len(golden.model.cases))]


def run_case(
    golden: LoadedGolden, index: int, mset: MappingSet, repo_root: Path, parse: Hl7Parser
) -> CaseResult:
    """Run case ``index`` of a loaded golden file."""
    case = golden.model.cases[index]
    result = CaseResult(case.name, False, file=str(golden.path), line=golden.lines[index])
    engine = MappingEngine(mset, case.timezone)
    if case.event is not None:
        return _run_event_case(result, case, case.event, engine)
    if case.transform is not None:
        return _run_transform_case(result, case, case.transform, mset, repo_root)
    try:
        try:
            mapped = produce(case, golden.path, engine, repo_root, parse)
        except OSError as exc:
            result.message = (
                f"cannot read sample {case.sample!r} (relative to {repo_root}): {exc.strerror or exc}"
            )
            return result
    except MessageError as exc:
        return _check_error(result, case, exc)
    except PathsDiffer as exc:
        result.message = str(exc)
        return result
    except Exception as exc:  # a bug in the engine or a mapping: report it as this case's failure
        result.message = f"mapping crashed: {type(exc).__name__}: {exc}"
        return result
    if case.expect.error is not None:
        result.message = (
            f"expected an error ({_describe_expected_error(case.expect.error)}) but the message "
            f"mapped to {len(mapped.records)} records: {_inventory(mapped)}"
        )
        return result
    problems, diffs = _check_records(
        case, mapped, lambda j: golden.line_of("cases", index, "expect", "records", j)
    )
    if case.expect.actions is not None:
        _check_actions(case, mapped, problems, diffs)
    if case.expect.warnings is not None:
        _check_warnings(case.expect.warnings, mapped, problems)
    for rtype in case.expect.no_records:
        if any(r.resource_type == rtype for r in mapped.records):
            problems.append(f"a {rtype} record was produced; expected none")
    result.passed = not problems
    result.message = "\n".join(problems)
    result.diff = "\n".join(diffs)
    return result


def produce(
    case: GoldenCase, path: Path, engine: MappingEngine, repo_root: Path, parse: Hl7Parser
) -> MappingResult:
    """What the case's input (a CSV row, a FHIR resource, an HL7 v2 sample or inline message) maps
    to; raises MessageError as the mapping does, OSError for an unreadable sample."""
    if case.csv is not None:
        record = CsvRecord(dict(case.csv.row), case.csv.line, f"{path.name}", list(case.csv.row))
        return engine.map_input("csv", case.csv.dataset, record)
    if case.fhir is not None:
        return engine.map_input("fhir", str(case.fhir.get("resourceType", "")), case.fhir)
    message = parse(message_bytes(case, repo_root))
    mapping = engine.mapping_for(message)
    differs = compiled_difference(engine, message, mapping)
    if differs is not None:
        raise PathsDiffer(f"the compiled and the interpreted mapping differ at {differs}")
    return engine.map_message(message, mapping)


class PathsDiffer(Exception):
    """The compiled mapping of a case's message did not give what the interpreted one gives."""


def _run_event_case(
    result: CaseResult, case: GoldenCase, given: EventInput, engine: MappingEngine
) -> CaseResult:
    """Run an event payload mapping on the case's change; the payload must be exactly the expected one."""
    try:
        payload = engine.map_event(given.event, given.context())
    except Exception as exc:  # a bug in the engine or a mapping: report it as this case's failure
        result.message = f"event mapping crashed: {type(exc).__name__}: {exc}"
        return result
    if payload is None:
        result.message = (
            f"no event mapping declares {given.event!r} (expected a kind: event file in mappings/events)"
        )
        return result
    want = case.expect.payload
    if _canon(payload) != _canon(want):
        result.message = f"{given.event} payload differs"
        result.diff = _diff(want, payload, "payload")
    elif list(payload) != list(want or {}):
        result.message = (
            f"{given.event} payload elements are in another order: expected {list(want or {})}, "
            f"got {list(payload)} (receivers see the JSON as written)"
        )
    else:
        result.passed = True
    return result


def _run_transform_case(
    result: CaseResult, case: GoldenCase, name: str, mset: MappingSet, repo_root: Path
) -> CaseResult:
    """Run a kind: hl7 transform on the case's message (a generate file: on its ``generated:``
    records); the result must be exactly ``expect: hl7``."""
    from hms_ach.mapping.hl7_transform import TransformError, run

    loaded = mset.transforms.get(name)
    if loaded is None:
        result.message = f"no kind: hl7 mapping is named {name!r} (expected a file in mappings/hl7)"
        return result
    tables = {n: f.model for n, f in mset.tables.items()}
    try:
        got = run(loaded.model, message_bytes(case, repo_root), tables).message.decode("utf-8", "replace")
    except (TransformError, OSError) as exc:
        result.message = f"transform {name} failed: {exc}"
        return result
    want = message_bytes(case, repo_root).decode() if case.expect.hl7 is None else ""
    if case.expect.hl7 is not None:
        want = "".join(ln.strip() + "\r" for ln in case.expect.hl7.splitlines() if ln.strip())
    if got != want:
        result.message = f"transform {name}: the message differs"
        result.diff = "\n".join(
            difflib.unified_diff(want.split("\r"), got.split("\r"), "expected", "transformed", lineterm="")
        )
    else:
        result.passed = True
    return result


def message_bytes(case: GoldenCase, repo_root: Path) -> bytes:
    """The bytes a case maps: its generated input, its sample file, or its inline message."""
    if case.generated is not None:
        return orjson.dumps(case.generated)
    if case.sample is not None:
        return (repo_root / case.sample).read_bytes()
    lines = [ln.strip() for ln in (case.message or "").splitlines()]
    return ("\r".join(ln for ln in lines if ln) + "\r").encode("utf-8")


def _check_error(result: CaseResult, case: GoldenCase, exc: MessageError) -> CaseResult:
    got = {"code": exc.code, "location": exc.location, "ack": exc.ack_code, "message": exc.message}
    want = case.expect.error
    if want is None:
        result.message = f"mapping failed: {exc.ack_code} {exc.code} at {exc.location or '-'}: {exc.message}"
        return result
    wrong = []
    for key in ("code", "location", "ack"):
        expected = getattr(want, key)
        if expected is not None and str(expected) != str(got[key]):
            wrong.append(f"{key}: expected {expected!r}, got {got[key]!r}")
    if want.message is not None and want.message not in exc.message:
        wrong.append(f"message: expected it to contain {want.message!r}, got {exc.message!r}")
    result.passed = not wrong
    if wrong:
        result.message = "wrong error: " + "; ".join(wrong)
    return result


def _check_warnings(want: list[ExpectedError], mapped: MappingResult, problems: list[str]) -> None:
    got = mapped.warnings
    if len(got) != len(want):
        problems.append(
            f"expected {len(want)} warning(s), got {len(got)}: "
            + ("; ".join(f"{w.code} at {w.location or '-'}: {w.message}" for w in got) or "none")
        )
        return
    for i, (w, exc) in enumerate(zip(want, got, strict=True), start=1):
        for key, value in (("code", exc.code), ("location", exc.location)):
            expected = getattr(w, key)
            if expected is not None and str(expected) != str(value):
                problems.append(f"warning {i}: {key}: expected {expected!r}, got {value!r}")
        if w.message is not None and w.message not in exc.message:
            problems.append(
                f"warning {i}: message: expected it to contain {w.message!r}, got {exc.message!r}"
            )


def _describe_expected_error(err: ExpectedError) -> str:
    return ", ".join(f"{k} {v}" for k, v in err.model_dump().items() if v is not None) or "any"


# ------------------------------------------------------------------ comparing records


def normalised_records(result: MappingResult) -> list[dict[str, Any]]:
    """The records of ``result`` as golden files show them (references as ``Type?identifier=...``)."""
    refs = _reference_names(result)
    return [
        {
            "resourceType": rec.resource_type,
            "key": {"system": rec.key_system, "value": rec.key_value} if rec.key_value else None,
            "create": rec.create,
            "content": _rewrite_refs(rec.content, refs),
        }
        for rec in result.records
    ]


def _reference_names(result: MappingResult) -> dict[str, str]:
    return {rec.alias: _conditional_ref(rec) for rec in result.records}


def _conditional_ref(rec: RecordWrite) -> str:
    if not rec.key_value:
        return f"{rec.resource_type}?alias={rec.alias}"
    return f"{rec.resource_type}?identifier={rec.key_system or ''}|{rec.key_value}"


def _rewrite_refs(value: Any, refs: dict[str, str]) -> Any:
    if isinstance(value, dict):
        out = {k: _rewrite_refs(v, refs) for k, v in value.items()}
        ref = out.get("reference")
        if isinstance(ref, str) and ref.startswith("@"):
            out["reference"] = refs.get(ref[1:], ref)
        return out
    if isinstance(value, list):
        return [_rewrite_refs(v, refs) for v in value]
    return value


def _check_records(
    case: GoldenCase, mapped: MappingResult, line_of: Callable[[int], int]
) -> tuple[list[str], list[str]]:
    actual = normalised_records(mapped)
    problems: list[str] = []
    diffs: list[str] = []
    expected = case.expect.records
    if case.match == "exact":
        if len(expected) != len(actual):
            problems.append(
                f"expected exactly {len(expected)} records, the message yields {len(actual)}: "
                f"{_inventory(mapped)}"
            )
        want_all = [_expected_view(e) for e in expected]
        got_all = [_actual_view(a, e, exact=True) for a, e in zip(actual, expected, strict=False)] + actual[
            len(expected) :
        ]
        if _canon(want_all) != _canon(got_all):
            problems.append("records differ (match: exact)")
            diffs.append(_diff(want_all, got_all, "records"))
        for e, a in zip(expected, actual, strict=False):
            _check_absent(e, a, problems)
        return problems, diffs
    claimed: set[int] = set()
    for j, e in enumerate(expected):
        candidates = [
            i
            for i, a in enumerate(actual)
            if i not in claimed
            and a["resourceType"] == e.resource_type
            and (e.key is None or (a["key"] or {}) == e.key.model_dump())
        ]
        label = e.resource_type + (f" {e.key.system}|{e.key.value}" if e.key else "")
        if not candidates:
            problems.append(
                f"no {label} record was produced (expected at line {line_of(j)}); "
                f"the message yields: {_inventory(mapped)}"
            )
            continue
        label += f" (line {line_of(j)})"
        want = _expected_view(e)
        fitting = [i for i in candidates if _canon(_actual_view(actual[i], e, exact=False)) == _canon(want)]
        chosen = fitting[0] if fitting else candidates[0]
        claimed.add(chosen)
        if not fitting:
            problems.append(f"{label} differs")
            diffs.append(_diff(want, _actual_view(actual[chosen], e, exact=False), label))
        _check_absent(e, actual[chosen], problems)
    return problems, diffs


def _expected_view(e: ExpectedRecord) -> dict[str, Any]:
    view: dict[str, Any] = {"resourceType": e.resource_type}
    if e.key is not None:
        view["key"] = e.key.model_dump()
    if e.create is not None:
        view["create"] = e.create
    view["content"] = e.content
    return view


def _actual_view(a: dict[str, Any], e: ExpectedRecord, exact: bool) -> dict[str, Any]:
    view: dict[str, Any] = {"resourceType": a["resourceType"]}
    if e.key is not None:
        view["key"] = a["key"]
    if e.create is not None:
        view["create"] = a["create"]
    view["content"] = a["content"] if exact else project(a["content"], e.content)
    return view


def project(actual: Any, expected: Any) -> Any:
    """The part of ``actual`` that ``expected`` talks about: keys it names, list items by position.

    ``expected`` is a subset of ``actual`` exactly when ``project(actual, expected) == expected``.
    """
    if isinstance(expected, dict) and isinstance(actual, dict):
        return {k: project(actual[k], v) for k, v in expected.items() if k in actual}
    if isinstance(expected, list) and isinstance(actual, list):
        return [project(a, e) for a, e in zip(actual, expected, strict=False)]
    return actual


_STEP = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(?:\[(\d+)\])?$")


def _check_absent(e: ExpectedRecord, actual: dict[str, Any], problems: list[str]) -> None:
    for path in e.absent:
        node: Any = actual["content"]
        present = True
        for step in path.split("."):
            m = _STEP.match(step)
            if not m or not isinstance(node, dict) or m.group(1) not in node:
                present = False
                break
            node = node[m.group(1)]
            if m.group(2) is not None:
                idx = int(m.group(2))
                if not isinstance(node, list) or idx >= len(node):
                    present = False
                    break
                node = node[idx]
        if present:
            problems.append(
                f"{e.resource_type}.{path} must not be set, but is {json.dumps(node, sort_keys=True)}"
            )


def _check_actions(case: GoldenCase, mapped: MappingResult, problems: list[str], diffs: list[str]) -> None:
    refs = _reference_names(mapped)
    got = [
        {"name": a.name, "args": {k: refs.get(str(v).lstrip("@"), v) for k, v in a.args.items()}}
        for a in mapped.actions
    ]
    want = [a.model_dump() for a in case.expect.actions or []]
    shown = got if case.match == "exact" else project(got, want)
    if _canon(shown) != _canon(want) or (case.match == "exact" and len(got) != len(want)):
        problems.append("store actions differ")
        diffs.append(_diff(want, shown, "actions"))


def _inventory(mapped: MappingResult) -> str:
    return ", ".join(f"{r.resource_type} {r.key}" for r in mapped.records) or "none"


def _canon(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)


def _diff(expected: Any, actual: Any, label: str) -> str:
    want = json.dumps(expected, indent=2, sort_keys=True, ensure_ascii=False, default=str).splitlines()
    got = json.dumps(actual, indent=2, sort_keys=True, ensure_ascii=False, default=str).splitlines()
    return "\n".join(difflib.unified_diff(want, got, f"expected {label}", f"actual {label}", lineterm=""))
