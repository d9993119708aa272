"""HL7 v2 source paths, 1-based as in the standard, compiled once and resolved per message.

Grammar (message or segment context)::

    PID-5            field 5 of the first PID (all of it, first repetition)
    PID-5.1          component 1;   PV1-7.1.2  sub-component 2 of component 1
    PID-3[2].1       repetition 2;  PID-3[*].1 every repetition
    PID-3[CX.5=MR].1 the repetitions whose component 5 is MR
    NK1[2]-2         the second NK1 segment;  NK1[*]-2 every NK1
    ZPI-1            Z-segments work like any other
    NK1              (for_each only) every NK1 segment, as a segment context

Datatype context (inside a datatype mapping, or a resource mapping whose context is a datatype)::

    XCN.1            component 1 of the current value;  XCN.9.1 sub-component 1 of component 9
    XCN              the current value itself

Inside a ``for_each`` over segments (``for_each: MFE``), ``MFE-1`` reads the current segment, and
other segments (``STF-2``, ``PRA-6``) are read from its group: the segments after it and before the
next segment of the same name (the next MFE). When the group has none, the segments before the
first loop segment are used (PID read inside a ``for_each: FT1``), never another group's.

Nested ``rules:`` under a ``for_each`` or ``source`` read the current value with any datatype name
(``XTN.1``, ``CX.4.1``).

Datatype-exact reading: where a rule needs a primitive (a function, a table, a leaf element), the
source is narrowed by :func:`primitive_source` to the first component of the field's v2.5 datatype,
to the depth the datatype defines: ``PID-7`` reads TS.1 (so ``19750314^D`` gives ``19750314``),
``FT1-11`` reads CP.1.1 = MO.1 (``100&USD`` gives ``100``), ``XCN.9`` reads HD.1. Whole values still
go to ``use:``, ``record:`` and ``rules:`` (a datatype mapping needs every component).

A compiled path's ``resolve(ctx)`` returns a list of :class:`Value` (string plus concrete location,
for lineage and error locations such as ``PID-3[2].1``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from dataclasses import field as _computed  # MessagePath has an attribute named `field`
from decimal import Decimal
from functools import lru_cache
from typing import Any, NamedTuple

from hms_ach.core.hl7message import Hl7Message, Segment

INPUTS = ("hl7v2", "csv", "fhir")

_REP_INDEX = re.compile(r"\[\d+\]")
_SEG = r"(?P<seg>[A-Z][A-Z0-9]{2})(?:\[(?P<segsel>\d+|\*)\])?"
_REP = r"(?:\[(?P<rep>\d+|\*|(?P<ftype>[A-Z][A-Z0-9]{1,3})\.(?P<fcomp>\d+)=(?P<fval>[^\]]*))\])?"
_MSG_PATH = re.compile(rf"^{_SEG}(?:-(?P<field>\d+){_REP}(?:\.(?P<comp>\d+)(?:\.(?P<sub>\d+))?)?)?$")
_TYPE_PATH = re.compile(r"^(?P<dtype>[A-Z][A-Z0-9]{1,3})(?:\.(?P<comp>\d+)(?:\.(?P<sub>\d+))?)?$")


class PathSyntaxError(ValueError):
    """A path that does not follow the grammar; the message says what was expected."""


class Value(NamedTuple):
    """One resolved value with the concrete place it came from.

    ``text`` has escapes decoded (for use as a leaf); ``raw`` keeps the undecoded field repetition
    so that a datatype mapping can still split it into components. (A named tuple: one is made for
    every value a mapping reads, so it must be cheap to build.)
    """

    text: str
    location: str
    raw: str | None = None
    segment: Segment | None = None
    data: Any = None  # FHIR input: the JSON value itself (number, boolean, object)


class Scope:
    """Where paths are read from: the message, the segment of a ``for_each`` loop, and the current
    datatype value (one field repetition such as an XCN) when a datatype mapping runs."""

    __slots__ = ("message", "segment", "value", "location", "kind", "seen", "_components")

    def __init__(
        self,
        message: Any,
        segment: Segment | None = None,
        value: Any = None,
        location: str = "",
        kind: str = "hl7v2",
        seen: set[str] | None = None,
    ):
        self.message = message  # Hl7Message (hl7v2), CsvRecord (csv) or a FHIR resource dict (fhir)
        self.segment = segment
        self.value = value
        self.location = location
        self.kind = kind
        #: when set, every HL7 position read is added here (``PID-5.1``, ``PV1-3``): mapping coverage
        self.seen = seen
        self._components: list[str] | None = None

    def with_segment(self, segment: Segment, location: str) -> Scope:
        return Scope(self.message, segment, None, location, self.kind, self.seen)

    def with_value(self, value: Value) -> Scope:
        if value.data is not None:
            return Scope(self.message, None, value.data, value.location, self.kind, self.seen)
        raw = value.raw if value.raw is not None else value.text
        return Scope(self.message, value.segment or self.segment, raw, value.location, self.kind, self.seen)

    def components(self, separator: str) -> list[str]:
        """The current value split into components, once per scope (datatype mappings read many)."""
        comps = self._components
        if comps is None:
            comps = self._components = str(self.value).split(separator)
        return comps

    def note(self, location: str) -> None:
        if self.seen is not None:
            self.seen.add(_REP_INDEX.sub("", location))


@dataclass(frozen=True)
class MessagePath:
    text: str
    segment: str
    segment_sel: str | None  # None = first (or the context segment), "*" = all, "n" = nth
    field: int | None
    rep: str | None  # None = first, "*" = all, "n" = nth
    filter_comp: int | None
    filter_value: str | None
    comp: int | None
    sub: int | None

    #: precomputed at compile time: "-5" and ".1.2" for locations, and whether one value is read per segment
    _field_suffix: str = _computed(init=False, repr=False, compare=False, default="")
    _comp_suffix: str = _computed(init=False, repr=False, compare=False, default="")
    _first_only: bool = _computed(init=False, repr=False, compare=False, default=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_field_suffix", f"-{self.field}")
        comp = "" if self.comp is None else f".{self.comp}" + (f".{self.sub}" if self.sub is not None else "")
        object.__setattr__(self, "_comp_suffix", comp)
        object.__setattr__(self, "_first_only", self.rep is None and self.filter_comp is None)

    @property
    def is_segment(self) -> bool:
        return self.field is None

    def segments(self, scope: Scope) -> list[Segment]:
        segs: list[Segment] = scope.message.all(self.segment)
        loop = scope.segment
        if loop is not None:
            if loop.name == self.segment and self.segment_sel is None:
                return [loop]
            # Inside a segment loop, other segments are read from the loop segment's group first:
            # the segments after it and before the next segment with the loop segment's name.
            # When the group has none, only segments before the first loop segment (the message's
            # header part, e.g. PID before the FT1s) are used, never another group's.
            loop_segs: list[Segment] = scope.message.all(loop.name)
            end = next((s.index for s in loop_segs if s.index > loop.index), 1 << 30)
            group = [s for s in segs if loop.index < s.index < end]
            segs = group or [s for s in segs if s.index < loop_segs[0].index]
        if self.segment_sel is None:
            return segs[:1]
        if self.segment_sel == "*":
            return segs
        n = int(self.segment_sel)
        return segs[n - 1 : n]

    def resolve(self, scope: Scope) -> list[Value]:
        out: list[Value] = []
        message = scope.message
        for seg in self.segments(scope):
            seg_loc = (
                self.segment if message.first(seg.name) is seg else f"{self.segment}[{_seq(message, seg)}]"
            )
            if self.field is None:
                out.append(Value(seg.name, seg_loc, seg.name, seg))
                continue
            reps = seg.repetitions(self.field)
            if not reps:
                continue
            if self._first_only:  # the common case: the first repetition only
                loc = seg_loc + self._field_suffix + ("[1]" if len(reps) > 1 else "") + self._comp_suffix
                raw = _component_raw(reps[0], seg, self.comp, self.sub)
                out.append(Value(seg.unescape(raw), loc, raw, seg))
                if scope.seen is not None:
                    scope.note(loc)
                continue
            for r_i, rep in enumerate(reps, start=1):
                if self.rep not in (None, "*") and self.rep != str(r_i):
                    continue
                if (
                    self.filter_comp is not None
                    and _component(rep, seg, self.filter_comp, None) != self.filter_value
                ):
                    continue
                loc = seg_loc + self._field_suffix + (f"[{r_i}]" if len(reps) > 1 else "") + self._comp_suffix
                raw = _component_raw(rep, seg, self.comp, self.sub)
                out.append(Value(seg.unescape(raw), loc, raw, seg))
                scope.note(loc)
                if self.rep is None and self.filter_comp is None:
                    break
        return out


def _seq(message: Hl7Message, seg: Segment) -> int:
    return [s.index for s in message.all(seg.name)].index(seg.index) + 1


def _component_raw(rep: str, seg: Segment, comp: int | None, sub: int | None) -> str:
    if comp is None:
        return rep
    comps = rep.split(seg.seps.component)
    value = comps[comp - 1] if comp <= len(comps) else ""
    if sub is not None:
        subs = value.split(seg.seps.subcomponent)
        value = subs[sub - 1] if sub <= len(subs) else ""
    return value


def _component(rep: str, seg: Segment, comp: int | None, sub: int | None) -> str:
    return seg.unescape(_component_raw(rep, seg, comp, sub))


@dataclass(frozen=True)
class TypePath:
    """A path into the current datatype value: ``XCN.1``, ``CX.4.1``, or ``XCN`` itself."""

    text: str
    dtype: str
    comp: int | None
    sub: int | None
    _suffix: str = field(init=False, repr=False, compare=False, default="")

    def __post_init__(self) -> None:
        suffix = (f".{self.comp}" if self.comp is not None else "") + (
            f".{self.sub}" if self.sub is not None else ""
        )
        object.__setattr__(self, "_suffix", suffix)

    def resolve(self, scope: Scope) -> list[Value]:
        if scope.value is None or scope.segment is None:
            raise PathSyntaxError(f"{self.text}: a {self.dtype} path needs a {self.dtype} value as context")
        seg = scope.segment
        loc = scope.location + self._suffix
        if self.comp is None:
            raw = scope.value
        else:
            comps = scope.components(seg.seps.component)
            raw = comps[self.comp - 1] if self.comp <= len(comps) else ""
            if self.sub is not None:
                subs = raw.split(seg.seps.subcomponent)
                raw = subs[self.sub - 1] if self.sub <= len(subs) else ""
        if scope.seen is not None:
            scope.note(loc)
        return [Value(seg.unescape(raw), loc, raw, seg)]

    def first(self, scope: Scope) -> Value | None:
        """``resolve`` when its one value is not empty, else None (without building the Value)."""
        if self.comp is None or scope.value is None or scope.segment is None or scope.seen is not None:
            for v in self.resolve(scope):
                return v if v.raw != "" and v.raw != '""' else None
            return None
        seg = scope.segment
        comps = scope.components(seg.seps.component)
        raw = comps[self.comp - 1] if self.comp <= len(comps) else ""
        if self.sub is not None and raw:
            subs = raw.split(seg.seps.subcomponent)
            raw = subs[self.sub - 1] if self.sub <= len(subs) else ""
        if raw == "" or raw == '""':
            return None
        return Value(seg.unescape(raw), scope.location + self._suffix, raw, seg)


Path = MessagePath | TypePath


# ---------------------------------------------------------------- v2.5 datatypes (hl7apy's tables)
@lru_cache(maxsize=1)
def _v25_elements() -> dict[str, Any]:
    """hl7apy's v2.5 structure tables ({} when hl7apy cannot load them: no narrowing then)."""
    try:
        from hl7apy import load_library

        elements: dict[str, Any] = load_library("2.5").ELEMENTS
    except Exception:  # noqa: BLE001 - a missing or broken hl7apy only turns narrowing off
        return {}
    return elements


@lru_cache(maxsize=2048)
def field_datatype(segment: str, field_no: int) -> str | None:
    """The v2.5 datatype of ``SEG-n`` (``PID-7`` -> TS); None for Z-segments and unknown fields."""
    found = _v25_elements().get("Field", {}).get(f"{segment}_{field_no}")
    return str(found[2]) if found else None


@lru_cache(maxsize=2048)
def component_datatype(datatype: str, comp: int) -> str | None:
    """The v2.5 datatype of component ``comp`` of ``datatype`` (``CP``, 1 -> MO); None if unknown."""
    found = _v25_elements().get("Component", {}).get(f"{datatype}_{comp}")
    return str(found[2]) if found else None


def is_composite(datatype: str | None) -> bool:
    """Whether ``datatype`` has components (TS, CWE, MO...), not a primitive (DTM, ST, NM...)."""
    return datatype is not None and component_datatype(datatype, 1) is not None


def primitive_source(path: Source) -> Source:
    """``path`` narrowed to the primitive a leaf needs: the first component of its datatype, to the
    depth the datatype defines (``PID-7`` -> ``PID-7.1``, ``FT1-11`` -> ``FT1-11.1.1``,
    ``CX.4`` -> ``CX.4.1``). Unknown datatypes (Z-segments, ``varies``) and paths that already name
    a primitive are returned as they are."""
    if isinstance(path, MessagePath):
        if path.field is None or path.sub is not None:
            return path
        dtype = field_datatype(path.segment, path.field)
    elif isinstance(path, TypePath):
        if path.sub is not None:
            return path
        dtype = path.dtype
    else:
        return path
    comp, sub = path.comp, None
    if comp is None:
        if not is_composite(dtype):
            return path
        comp = 1
        dtype = component_datatype(dtype or "", 1)
    else:
        dtype = component_datatype(dtype, comp) if dtype else None
    if is_composite(dtype):
        sub = 1
    if comp == path.comp and sub is None:
        return path
    narrowed = replace(path, comp=comp, sub=sub)
    # lineage and error locations keep naming the place the mapping wrote (PID-7, not PID-7.1)
    if isinstance(narrowed, MessagePath):
        object.__setattr__(narrowed, "_comp_suffix", path._comp_suffix)  # type: ignore[union-attr]
    else:
        object.__setattr__(narrowed, "_suffix", path._suffix)  # type: ignore[union-attr]
    return narrowed


def compile_path(text: str, datatype: str | None = None) -> Path:
    """Compile ``text``; raise PathSyntaxError saying what was wrong and what was expected.

    ``datatype`` is the context datatype of the mapping (``XCN``...): only then are ``XCN.1``
    paths allowed. ``"*"`` (nested rules under a ``for_each``/``source``) accepts any datatype name.
    """
    text = str(text).strip()
    m = _MSG_PATH.match(text)
    if m:
        for name in ("field", "comp", "sub"):
            if m[name] is not None and int(m[name]) == 0:
                raise PathSyntaxError(f"{text!r}: HL7 positions start at 1, not 0 (e.g. PID-5.1)")
        if m["segsel"] not in (None, "*") and int(m["segsel"]) == 0:
            raise PathSyntaxError(f"{text!r}: segment repetitions start at 1 (e.g. NK1[1]-2)")
        if m["rep"] not in (None, "*") and m["ftype"] is None and int(m["rep"]) == 0:
            raise PathSyntaxError(f"{text!r}: field repetitions start at 1 (e.g. PID-3[1])")
        return MessagePath(
            text,
            m["seg"],
            m["segsel"],
            int(m["field"]) if m["field"] else None,
            None if m["ftype"] else m["rep"],
            int(m["fcomp"]) if m["fcomp"] else None,
            m["fval"],
            int(m["comp"]) if m["comp"] else None,
            int(m["sub"]) if m["sub"] else None,
        )
    t = _TYPE_PATH.match(text)
    if t and datatype != "*" and t["dtype"] != datatype:
        seg_hint = (
            f"; did you mean {text.replace('.', '-', 1)!r}?" if len(t["dtype"]) == 3 and t["comp"] else ""
        )
        where = (
            f"this mapping's context is {datatype}" if datatype else "this mapping has no datatype context"
        )
        raise PathSyntaxError(
            f"{text!r} reads a {t['dtype']} value, but {where}: expected a message path "
            f"such as PID-5.1{seg_hint}"
        )
    if t:
        for name in ("comp", "sub"):
            if t[name] is not None and int(t[name]) == 0:
                raise PathSyntaxError(f"{text!r}: component numbers start at 1 (e.g. XCN.1)")
        return TypePath(
            text, t["dtype"], int(t["comp"]) if t["comp"] else None, int(t["sub"]) if t["sub"] else None
        )
    hint = ""
    if re.match(r"^[A-Z][A-Z0-9]{2}\.\d", text):
        hint = f"; did you mean {text.replace('.', '-', 1)!r}?"
    raise PathSyntaxError(
        f"{text!r} is not an HL7 path: expected SEG-FIELD[.COMPONENT[.SUB]] such as PID-5.1, PID-3[*].1, "
        f"PID-3[CX.5=MR].1, NK1[2]-2, or TYPE.COMPONENT such as XCN.1 inside a datatype mapping{hint}"
    )


@dataclass
class CsvRecord:
    """One CSV row: header -> value, and where it was (for error reports and lineage)."""

    values: dict[str, str]
    line: int = 0
    source: str = ""
    columns: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ColumnPath:
    """A CSV column, named by its header (case and surrounding spaces ignored)."""

    text: str
    is_segment: bool = False

    def resolve(self, scope: Scope) -> list[Value]:
        record = scope.message
        if not isinstance(record, CsvRecord):
            raise PathSyntaxError(f"column {self.text!r} can only be read from a CSV row")
        wanted = self.text.strip().lower()
        for name, value in record.values.items():
            if name.strip().lower() == wanted:
                text = (value or "").strip()
                return [Value(text, f"line {record.line} column {name.strip()!r}", text)]
        return []


@dataclass(frozen=True)
class FhirPathExpr:
    """A FHIRPath expression over a FHIR resource (or the current element in a ``for_each``)."""

    text: str
    fn: Any
    is_segment: bool = False

    def resolve(self, scope: Scope) -> list[Value]:
        base = scope.value if scope.value is not None else scope.message
        try:
            results = self.fn(base)
        except Exception as exc:  # noqa: BLE001 - fhirpathpy raises plain exceptions on bad data
            raise PathSyntaxError(f"FHIRPath {self.text!r} failed: {exc}") from exc
        where = f"{scope.location}.{self.text}" if scope.location else self.text
        out = []
        for i, item in enumerate(results):
            loc = where if len(results) == 1 else f"{where}[{i}]"
            if isinstance(item, bool):
                out.append(Value("true" if item else "false", loc, None, None, item))
            elif isinstance(item, Decimal):  # fhirpathpy reads JSON decimals as Decimal: keep the number
                out.append(Value(str(item), loc, None, None, float(item)))
            elif isinstance(item, (dict, list)):
                out.append(Value("", loc, None, None, _json_numbers(item)))
            elif isinstance(item, (int, float)):
                out.append(Value(str(item), loc, None, None, item))
            else:
                out.append(Value(str(item), loc, str(item)))
        return out


def _json_numbers(value: Any) -> Any:
    """``value`` with the Decimals fhirpathpy puts into the objects it returns turned back into JSON
    numbers (floats), so that records and event payloads serialise as they were sent."""
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, dict):
        return {k: _json_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_numbers(v) for v in value]
    return value


Source = MessagePath | TypePath | ColumnPath | FhirPathExpr


def compile_source(text: str, kind: str = "hl7v2", datatype: str | None = None) -> Source:
    """Compile a source for an input ``kind``: HL7 path, CSV column name, or FHIRPath expression."""
    if kind == "csv":
        if not str(text).strip():
            raise PathSyntaxError("an empty column name: expected a header of the CSV file, e.g. Employee ID")
        return ColumnPath(str(text))
    if kind == "fhir":
        import fhirpathpy

        try:
            fn = fhirpathpy.compile(str(text))
            fn({})  # type: ignore[call-arg]  # the parser is lenient: a trial run surfaces errors
            return FhirPathExpr(str(text), fn)
        except Exception as exc:  # noqa: BLE001 - fhirpathpy's parser raises plain exceptions
            raise PathSyntaxError(f"{text!r} is not a FHIRPath expression: {exc}") from exc
    return compile_path(text, datatype)
