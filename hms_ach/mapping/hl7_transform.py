"""``kind: hl7`` transforms: the edits an outbound HL7 v2 message gets before an ``mllp`` sink sends it.

A transform (mappings/hl7/, model :class:`hms_ach.mapping.spec.Hl7TransformMapping`) is a list of
edits applied in order to the ER7 text: ``set`` a field, component or subcomponent (from a constant
``value``, a ``copy`` of another path, and/or through a code ``table``), or ``drop`` a segment.
Every edit that changed something is reported as a :class:`Change` (the lineage ``mapping preview``
prints: which rule changed which field, from what to what).

The message is edited as text, so what no rule names goes out byte for byte as it came in
(separators, escapes, empty trailing fields). Bytes are read and written with ``surrogateescape``,
so a message in any single- or multi-byte charset survives unchanged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

import orjson
from antlr4 import CommonTokenStream, InputStream, Token  # type: ignore[import-untyped]
from antlr4.error.ErrorListener import ErrorListener  # type: ignore[import-untyped]
from fhirpathpy import compile as fhirpath_compile
from fhirpathpy.parser.generated.FHIRPathLexer import FHIRPathLexer
from fhirpathpy.parser.generated.FHIRPathParser import FHIRPathParser

from hms_ach.mapping import spec

#: SEG-n, SEG-n.c or SEG-n.c.s (1-based, as HL7 numbers them)
_PATH = re.compile(r"^([A-Z][A-Z0-9]{2})-([1-9][0-9]*)(?:\.([1-9][0-9]*))?(?:\.([1-9][0-9]*))?$")
_SEGMENT = re.compile(r"^[A-Z][A-Z0-9]{2}$")


class TransformError(ValueError):
    """A transform cannot be applied to a message (e.g. a code its table does not map)."""

    def __init__(self, message: str, location: str = ""):
        super().__init__(message)
        self.message = message
        self.location = location


@dataclass(frozen=True)
class Hl7Path:
    segment: str
    field: int
    component: int = 0
    subcomponent: int = 0

    def __str__(self) -> str:
        out = f"{self.segment}-{self.field}"
        if self.component:
            out += f".{self.component}"
        if self.subcomponent:
            out += f".{self.subcomponent}"
        return out


def parse_path(text: str) -> Hl7Path:
    """``PID-8`` / ``PV1-3.1`` / ``PID-5.1.1`` as a path; ValueError saying what is expected."""
    found = _PATH.match(text.strip())
    if found is None:
        raise ValueError(f"{text!r} is not an HL7 path; expected SEG-n, SEG-n.c or SEG-n.c.s (e.g. PV1-3.1)")
    seg, n, c, s = found.groups()
    if seg == "MSH" and int(n) <= 2 and c:
        raise ValueError(f"{text!r}: MSH-1 and MSH-2 are the separators and have no components")
    return Hl7Path(seg, int(n), int(c or 0), int(s or 0))


@dataclass
class Change:
    """What one rule did to one field: the lineage line of a preview."""

    rule: int  # 1-based index of the rule in the transform
    path: str
    before: str
    after: str
    how: str  # "value", "copy MSH-3", "table sex_out", "drop"

    def __str__(self) -> str:
        return f"rule {self.rule}: {self.path} {self.before!r} -> {self.after!r} ({self.how})"


@dataclass
class Transformed:
    message: bytes
    changes: list[Change] = field(default_factory=list)


class Er7:
    """An ER7 message as editable lists: ``segments[i][n]`` is SEG-n (for MSH too: MSH-1 is the
    field separator, MSH-2 the encoding characters)."""

    def __init__(self, raw: bytes):
        text = raw.decode("utf-8", "surrogateescape").replace("\r\n", "\r").replace("\n", "\r")
        lines = [line for line in text.split("\r") if line.strip()]
        if not lines or not lines[0].startswith("MSH") or len(lines[0]) < 8:
            raise TransformError("the message does not start with an MSH segment", "MSH")
        self.fs = lines[0][3]
        enc = lines[0][4:8]
        self.cs, self.rs, self.ss = enc[0], enc[1], enc[3]
        self.segments: list[list[str]] = []
        for line in lines:
            parts = line.split(self.fs)
            if parts[0] == "MSH":
                parts.insert(1, self.fs)
            self.segments.append(parts)

    def encode(self) -> bytes:
        out = []
        for parts in self.segments:
            if parts[0] == "MSH":
                parts = [parts[0], *parts[2:]]
            out.append(self.fs.join(parts))
        return ("\r".join(out) + "\r").encode("utf-8", "surrogateescape")

    def _split(self, path: Hl7Path) -> bool:
        return not (path.segment == "MSH" and path.field <= 2)

    def get(self, path: Hl7Path) -> str:
        """The first occurrence's value at ``path`` (first repetition), '' when absent."""
        for parts in self.segments:
            if parts[0] == path.segment:
                return self.read_in(parts, path)
        return ""

    def read_in(self, parts: list[str], path: Hl7Path) -> str:
        value = parts[path.field] if path.field < len(parts) else ""
        if not self._split(path):
            return value
        value = value.split(self.rs)[0]
        if path.component:
            comps = value.split(self.cs)
            value = comps[path.component - 1] if path.component <= len(comps) else ""
            if path.subcomponent:
                subs = value.split(self.ss)
                value = subs[path.subcomponent - 1] if path.subcomponent <= len(subs) else ""
        return value

    def put(self, parts: list[str], path: Hl7Path, value: str) -> None:
        while len(parts) <= path.field:
            parts.append("")
        if not self._split(path) or not path.component:
            if self._split(path) and self.rs in parts[path.field]:
                reps = parts[path.field].split(self.rs)
                parts[path.field] = self.rs.join([value, *reps[1:]])
            else:
                parts[path.field] = value
            return
        reps = parts[path.field].split(self.rs)
        comps = reps[0].split(self.cs)
        while len(comps) < path.component:
            comps.append("")
        if path.subcomponent:
            subs = comps[path.component - 1].split(self.ss)
            while len(subs) < path.subcomponent:
                subs.append("")
            subs[path.subcomponent - 1] = value
            comps[path.component - 1] = self.ss.join(subs).rstrip(self.ss)
        else:
            comps[path.component - 1] = value
        reps[0] = self.cs.join(comps).rstrip(self.cs)
        parts[path.field] = self.rs.join(reps)


def _table_value(table: spec.CodeTable, name: str, code: str, where: str) -> str:
    """``code`` mapped through ``table`` as ER7 text (a Coding-like object gives its ``code``)."""
    if code == "":
        return ""
    entries = table.map if table.case_sensitive else {str(k).upper(): v for k, v in table.map.items()}
    key = code if table.case_sensitive else code.upper()
    if key in entries:
        found: Any = entries[key]
    elif table.unmapped == "keep":
        return code
    elif table.unmapped == "default":
        found = table.default
    else:
        raise TransformError(f"code {code!r} at {where} is not in table {name!r} (unmapped: error)", where)
    if isinstance(found, dict):
        found = found.get("code", "")
    if isinstance(found, bool):
        return "Y" if found else "N"
    return "" if found is None else str(found)


def _holds(msg: Er7, cond: spec.Condition) -> bool:
    value = msg.get(parse_path(cond.source)) if cond.source else ""
    if cond.equals is not None:
        return value == cond.equals
    if cond.not_equals is not None:
        return value != cond.not_equals
    if cond.in_ is not None:
        return value in cond.in_
    if cond.not_in is not None:
        return value not in cond.not_in
    if cond.exists is False:
        return value == ""
    return value != ""


def apply(transform: spec.Hl7TransformMapping, raw: bytes, tables: dict[str, spec.CodeTable]) -> Transformed:
    """``raw`` after the transform's edits, with the lineage; TransformError when a rule cannot apply."""
    msg = Er7(raw)
    changes: list[Change] = []
    for number, rule in enumerate(transform.rules, 1):
        if rule.when is not None and not _holds(msg, rule.when):
            continue
        if rule.drop:
            before = len(msg.segments)
            msg.segments = [p for p in msg.segments if p[0] != rule.drop or p[0] == "MSH"]
            if len(msg.segments) != before:
                changes.append(
                    Change(number, rule.drop, f"{before - len(msg.segments)} segment(s)", "", "drop")
                )
            continue
        target = parse_path(rule.set or "")
        source = parse_path(rule.copy_from) if rule.copy_from else None
        copied = msg.get(source) if source is not None else None
        how = "value" if rule.value is not None else f"copy {source}" if source else f"table {rule.table}"
        for parts in msg.segments:
            if parts[0] != target.segment:
                continue
            old = msg.read_in(parts, target)
            new = rule.value if rule.value is not None else copied if copied is not None else old
            if rule.table:
                new = _table_value(tables[rule.table], rule.table, new, str(target))
                if rule.value is not None or source is not None:
                    how += f", table {rule.table}"
            if new != old:
                msg.put(parts, target, new)
                changes.append(Change(number, str(target), old, new, how))
    return Transformed(msg.encode(), changes)


def problems(transform: spec.Hl7TransformMapping, tables: set[str]) -> list[tuple[tuple[Any, ...], str, str]]:
    """What is wrong with a transform file: (location in the file, what, expected), for the loader."""
    out: list[tuple[tuple[Any, ...], str, str]] = []
    for i, rule in enumerate(transform.rules):
        at: tuple[Any, ...] = ("rules", i)
        if (rule.set is None) == (rule.drop is None):
            out.append((at, "a rule needs exactly one of `set` and `drop`", "set: PATH or drop: SEGMENT"))
            continue
        if rule.drop is not None:
            if not _SEGMENT.match(rule.drop) or rule.drop == "MSH":
                out.append((at + ("drop",), f"cannot drop {rule.drop!r}", "a segment name other than MSH"))
            if rule.value is not None or rule.copy_from or rule.table:
                out.append((at, "`drop` takes no value, copy or table", "drop: SEGMENT alone"))
        else:
            if rule.value is not None and rule.copy_from:
                out.append((at, "`value` and `copy` both given", "one of value, copy (or table alone)"))
            elif rule.value is None and not rule.copy_from and not rule.table:
                out.append((at, "`set` needs a value", "value:, copy: or table:"))
            for key, text in (("set", rule.set), ("copy", rule.copy_from)):
                if text is not None:
                    try:
                        parse_path(text)
                    except ValueError as exc:
                        out.append((at + (key,), str(exc), "SEG-n[.c[.s]]"))
        if rule.table and rule.table not in tables:
            out.append((at + ("table",), f"unknown code table {rule.table!r}", "a kind: table file's name"))
        if rule.when is not None:
            if rule.when.param is not None or rule.when.source is None:
                out.append(
                    (
                        at + ("when",),
                        "a transform condition tests a `source` path",
                        "when: {source: PATH, ...}",
                    )
                )
            else:
                try:
                    parse_path(rule.when.source)
                except ValueError as exc:
                    out.append((at + ("when", "source"), str(exc), "SEG-n[.c[.s]]"))
    if transform.generate is not None:
        out.extend(_generate_problems(transform.generate, tables))
    return out


def _generate_problems(gen: spec.Hl7Generate, tables: set[str]) -> list[tuple[tuple[Any, ...], str, str]]:
    out: list[tuple[tuple[Any, ...], str, str]] = []
    if not re.match(r"^[A-Z0-9]{3}\^[A-Z0-9]{3}(\^[A-Z0-9_]+)?$", gen.message_type):
        out.append(
            (("generate", "message_type"), f"{gen.message_type!r} is not an MSH-9", "e.g. ADT^A01^ADT_A01")
        )
    for i, seg in enumerate(gen.segments):
        if not _SEGMENT.match(seg) or seg == "MSH":
            out.append((("generate", "segments", i), f"{seg!r} is not a segment after MSH", "e.g. EVN, PID"))
    env: dict[str, Any] = {name: {} for name in gen.records} | {"now": "", "event": ""}
    expressions: list[tuple[tuple[Any, ...], str]] = [
        (("generate", "records", name, "reference"), r.reference) for name, r in gen.records.items()
    ]
    for i, item in enumerate(gen.fields):
        at: tuple[Any, ...] = ("generate", "fields", i)
        given = [k for k in ("value", "fhirpath", "components") if getattr(item, k) is not None]
        if len(given) != 1:
            out.append(
                (
                    at,
                    f"a field needs exactly one of value, fhirpath, components (has {given or 'none'})",
                    "value: TEXT, fhirpath: EXPR or components: [EXPR, ...]",
                )
            )
        try:
            path = parse_path(item.set)
            if path.segment == "MSH" and path.field <= 2 or path.segment not in [*gen.segments, "MSH"]:
                out.append(
                    (
                        at + ("set",),
                        f"{item.set!r} is not in a segment the message has",
                        f"a path in {', '.join(['MSH', *gen.segments])} (not MSH-1/2)",
                    )
                )
        except ValueError as exc:
            out.append((at + ("set",), str(exc), "SEG-n[.c[.s]]"))
        if item.table and item.table not in tables:
            out.append((at + ("table",), f"unknown code table {item.table!r}", "a kind: table file's name"))
        if item.table and item.fhirpath is None:
            out.append((at + ("table",), "`table` maps a `fhirpath` value", "fhirpath: with table:"))
        if item.fhirpath is not None:
            expressions.append((at + ("fhirpath",), item.fhirpath))
        if item.for_each is not None:
            expressions.append((at + ("for_each",), item.for_each))
        expressions += [(at + ("components", j), c) for j, c in enumerate(item.components or []) if c]
    for loc, text in expressions:
        try:
            compile_fhirpath(text)(
                {"resourceType": "Basic"}, env
            )  # a trial run: unknown functions, variables
        except Exception as exc:  # noqa: BLE001 - antlr and fhirpathpy raise plain exceptions
            out.append(
                (
                    loc,
                    f"FHIRPath {text!r}: {exc}",
                    "a FHIRPath expression; variables: " + ", ".join(f"%{v}" for v in env),
                )
            )
    return out


# ---------------------------------------------------------------------- generated messages
class _Refuse(ErrorListener):  # type: ignore[misc]
    """fhirpathpy's parser recovers from syntax errors silently: this listener makes them errors."""

    def syntaxError(self, recognizer: Any, symbol: Any, line: int, column: int, msg: str, e: Any) -> None:  # noqa: N802
        raise ValueError(f"column {column + 1}: {msg}")


@lru_cache(maxsize=1024)
def compile_fhirpath(text: str) -> Any:
    """``text`` parsed strictly (fhirpathpy alone accepts ``a == b`` or a stray ``)``) and compiled,
    once per distinct text; ValueError saying where the syntax breaks."""
    lexer = FHIRPathLexer(InputStream(text))
    lexer.removeErrorListeners()
    lexer.addErrorListener(_Refuse())
    tokens = CommonTokenStream(lexer)
    parser = FHIRPathParser(tokens)
    parser.removeErrorListeners()
    parser.addErrorListener(_Refuse())
    try:
        parser.expression()
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001 - antlr raises plain exceptions
        raise ValueError(str(exc)) from exc
    if tokens.LA(1) != Token.EOF:
        raise ValueError(f"column {tokens.LT(1).column + 1}: unexpected {tokens.LT(1).text!r}")
    return fhirpath_compile(text)


def escape(value: Any) -> str:
    """Text as an ER7 value: the separators escaped (\\F\\ \\S\\ \\T\\ \\R\\ \\E\\), line ends dropped."""
    text = str(value)
    for raw, esc in (("\\", "\\E\\"), ("|", "\\F\\"), ("^", "\\S\\"), ("&", "\\T\\"), ("~", "\\R\\")):
        text = text.replace(raw, esc)
    return text.replace("\r", " ").replace("\n", " ")


def hl7_time(value: Any) -> str:
    """A FHIR date or dateTime as an HL7 DTM (YYYYMMDD[HHMM[SS]][+ZZZZ]); '' when absent."""
    if not isinstance(value, str) or not value:
        return ""
    if len(value) <= 10:
        return value.replace("-", "")
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return ""
    return moment.strftime("%Y%m%d%H%M%S%z")


@dataclass
class GenerateInput:
    """What a generated message is built from: the event, and the records by name (``record`` is the
    one the event is about). As JSON (preview samples, golden cases)::

        {"event": "encounter.admitted", "eventId": 7, "now": "20261206120000+0000",
         "sender": "HMS-ACH", "facility": "GENHOSP",
         "records": {"record": {"resourceType": "Encounter", ...}, "patient": {...}}}
    """

    event: str
    records: dict[str, dict[str, Any]]
    event_id: int | str = 1
    now: str = ""
    sender: str = "HMS-ACH"
    facility: str = ""

    @classmethod
    def from_json(cls, data: bytes) -> GenerateInput:
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise TransformError(f"the input of a generated message is not JSON: {exc}", "input") from exc
        if not isinstance(doc, dict) or not isinstance(doc.get("records"), dict):
            raise TransformError(
                "the input of a generated message is a JSON object with `event` and `records` "
                '({"record": {...}, "patient": {...}})',
                "input",
            )
        return cls(
            str(doc.get("event") or ""),
            {str(k): v for k, v in doc["records"].items() if isinstance(v, dict)},
            doc.get("eventId", 1),
            str(doc.get("now") or ""),
            str(doc.get("sender", "HMS-ACH")),
            str(doc.get("facility", "")),
        )


def _evaluate(fn: Any, context: Any, env: dict[str, Any], where: str) -> list[Any]:
    try:
        found: list[Any] = fn(context, env)
    except Exception as exc:  # noqa: BLE001 - fhirpathpy raises plain exceptions on odd data
        raise TransformError(f"{where}: the FHIRPath failed: {exc}", where) from exc
    return found


def _first(fn: Any, context: Any, env: dict[str, Any], where: str) -> str:
    found = _evaluate(fn, context, env, where)
    if not found or found[0] is None:
        return ""
    return "true" if found[0] is True else "false" if found[0] is False else str(found[0])


def _field_value(
    item: spec.Hl7Field, context: Any, env: dict[str, Any], tables: dict[str, spec.CodeTable]
) -> str:
    """The ER7 text of one repetition of ``item`` evaluated on ``context``."""
    where = item.set
    if item.value is not None:
        return item.value
    if item.components is not None:
        parts = [_first(compile_fhirpath(c), context, env, where) if c else "" for c in item.components]
        return "^".join(escape(p) for p in parts).rstrip("^")
    text = _first(compile_fhirpath(item.fhirpath or ""), context, env, where)
    if item.format == "dtm":
        text = hl7_time(text)
    if item.table:
        return _table_value(tables[item.table], item.table, text, where)
    return escape(text)


def _source_of(item: spec.Hl7Field) -> str:
    """Where a generated field's value came from, for the lineage."""
    how = "generate: value" if item.value is not None else f"generate: fhirpath {item.fhirpath}"
    if item.components is not None:
        how = f"generate: components {', '.join(c for c in item.components if c)}"
    if item.for_each is not None:
        how += f" for each {item.for_each}"
    return (
        how + (f", table {item.table}" if item.table else "") + (", as DTM" if item.format == "dtm" else "")
    )


def generate(
    transform: spec.Hl7TransformMapping, given: GenerateInput, tables: dict[str, spec.CodeTable]
) -> Transformed:
    """The message ``transform.generate`` builds from ``given``, then the transform's ``rules``; the
    lineage names the field of the file that set each value (``field 3: fhirpath gender``)."""
    gen = transform.generate
    if gen is None:
        raise TransformError(
            f"the transform has no `generate:`; it edits a message ({given.event})", "generate"
        )
    now = given.now or datetime.now(UTC).strftime("%Y%m%d%H%M%S+0000")
    msh = f"MSH|^~\\&|{escape(given.sender)}|{escape(given.facility)}|||{now}||{gen.message_type}"
    msh += f"|HMS{given.event_id}|P|2.5.1"
    message = Er7(("\r".join([msh, *gen.segments]) + "\r").encode("utf-8"))
    record = given.records.get("record", {})
    env = {name: given.records.get(name, {}) for name in gen.records} | {"now": now, "event": given.event}
    changes: list[Change] = []
    for number, item in enumerate(gen.fields, 1):
        target = parse_path(item.set)
        if item.for_each is not None:
            items = _evaluate(compile_fhirpath(item.for_each), record, env, item.set)
            text = message.rs.join(_field_value(item, it, env, tables) for it in items)
        else:
            text = _field_value(item, record, env, tables)
        for parts in message.segments:
            if parts[0] == target.segment and text:
                message.put(parts, target, text)
                changes.append(Change(number, str(target), "", text, _source_of(item)))
    built = message.encode()
    if not transform.rules:
        return Transformed(built, changes)
    done = apply(transform, built, tables)
    return Transformed(done.message, changes + done.changes)


def run(transform: spec.Hl7TransformMapping, data: bytes, tables: dict[str, spec.CodeTable]) -> Transformed:
    """A transform on ``data``: a message to edit, or, for a ``generate:`` file, the JSON of a
    :class:`GenerateInput` (preview samples and golden cases)."""
    if transform.generate is not None:
        return generate(transform, GenerateInput.from_json(data), tables)
    return apply(transform, data, tables)
