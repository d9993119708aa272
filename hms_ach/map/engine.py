"""Run the mappings of a :class:`MappingSet` over one parsed HL7 v2 message.

Pure: no I/O, no store. The result is a :class:`MappingResult` (records keyed on business
identifiers, store actions, lineage) that the pipeline commits and the preview shows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

from hms_ach.errors import Err0357, MappingError, RejectError
from hms_ach.map import spec
from hms_ach.map.functions import FUNCTIONS, FunctionError
from hms_ach.map.loader import LoadedFile, MappingSet
from hms_ach.map.paths import MessagePath, PathSyntaxError, Scope, Source, Value, compile_source
from hms_ach.map.result import Lineage, MappingResult, RecordWrite, StoreAction
from hms_ach.map.terminology import lookup
from hms_ach.parse.hl7v2 import Hl7Message
from hms_ach.store.repository import merge_content

_TOKEN = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?:\[(\d*)\])?")


@lru_cache(maxsize=4096)
def _path(text: str, datatype: str | None, kind: str = "hl7v2") -> Source:
    return compile_source(text, kind, datatype)


def _value_of(v: Value) -> Any:
    """The value a rule uses: FHIR data as is, else the decoded text."""
    return v.data if v.data is not None else v.text


def _present(v: Value) -> Any:
    """What a resolved value holds: FHIR data as is, HL7 raw text, else the decoded text."""
    if v.data is not None:
        return v.data
    return v.raw if v.raw is not None else v.text


@lru_cache(maxsize=4096)
def _target(text: str) -> tuple[tuple[str, int | None | str], ...]:
    """``location[0].location`` -> (("location", 0), ("location", None)); ``name[]`` -> (("name", "+"),)."""
    out: list[tuple[str, int | None | str]] = []
    for part in text.split("."):
        m = _TOKEN.fullmatch(part)
        if not m:
            raise MappingError(f"target {text!r} is not an element path like name[].family")
        idx = m.group(2)
        out.append((m.group(1), None if idx is None else ("+" if idx == "" else int(idx))))
    return tuple(out)


def _empty(value: Any) -> bool:
    if value is None or value == "" or value == '""':
        return True
    if isinstance(value, (list, dict)):
        return not value or (isinstance(value, list) and all(_empty(v) for v in value))
    return False


def _set(obj: dict[str, Any], target: str, value: Any) -> str:
    """Set ``value`` at ``target`` in ``obj``; return the concrete path (``name[1]``)."""
    tokens = _target(target)
    node: Any = obj
    concrete: list[str] = []
    for i, (name, idx) in enumerate(tokens):
        last = i == len(tokens) - 1
        if idx is None:
            concrete.append(name)
            if last:
                node[name] = value
            else:
                node = node.setdefault(name, {})
            continue
        lst = node.setdefault(name, [])
        if idx == "+":
            n = len(lst)
            if last:
                lst.append(value)
            else:
                lst.append({})
                node = lst[-1]
        else:
            n = int(idx)
            while len(lst) <= n:
                lst.append({})
            if last:
                if isinstance(value, dict) and isinstance(lst[n], dict):
                    lst[n] = merge_content(lst[n], value)
                else:
                    lst[n] = value
            else:
                node = lst[n]
        concrete.append(f"{name}[{n}]")
    return ".".join(concrete)


@dataclass
class _Run:
    result: MappingResult
    as_names: dict[str, str] = field(default_factory=dict)
    by_key: dict[tuple[str, str | None, str], RecordWrite] = field(default_factory=dict)
    counter: int = 0


class MappingEngine:
    """Maps messages with one checked MappingSet. ``timezone`` is assumed for times sent without offset."""

    def __init__(self, mset: MappingSet, timezone: str = "UTC"):
        self.mset = mset
        self.timezone = timezone

    # ------------------------------------------------------------------ entry points
    def mapping_for(self, msg: Hl7Message) -> LoadedFile:
        code = msg.header.message_code
        event = msg.header.trigger_event
        if not event:
            evn = msg.first("EVN")
            event = evn.field(1) if evn else ""
        found = self.mset.message_mapping(code, event)
        if found is not None:
            return found
        if code in self.mset.supported_message_codes():
            raise RejectError(f"event {code}^{event or '(none)'} is not supported by any message mapping",
                              "MSH-9.2", Err0357.UNSUPPORTED_EVENT)
        if not code:
            raise RejectError("MSH-9 message type is empty", "MSH-9", Err0357.REQUIRED_FIELD_MISSING)
        raise RejectError(f"message type {code} is not supported (mapped: "
                          f"{', '.join(sorted(self.mset.supported_message_codes())) or 'none'})",
                          "MSH-9.1", Err0357.UNSUPPORTED_MESSAGE_TYPE)

    def map_message(self, msg: Hl7Message, mapping: LoadedFile | None = None,
                    seen: set[str] | None = None) -> MappingResult:
        """Map ``msg``; with ``seen``, every HL7 position the mapping read is added to it (coverage)."""
        f = mapping or self.mapping_for(msg)
        return self._run_message(f, Scope(msg, seen=seen))

    def input_mapping(self, kind: str, name: str) -> LoadedFile:
        """The message mapping for a CSV dataset or FHIR resourceType; RejectError when there is none."""
        found = self.mset.input_mapping(kind, name)
        if found is None:
            known = ", ".join(self.mset.inputs(kind)) or "none"
            raise RejectError(f"no mapping handles {kind} input {name!r} (mapped: {known})", "",
                              Err0357.UNSUPPORTED_MESSAGE_TYPE)
        return found

    def map_input(self, kind: str, name: str, data: Any) -> MappingResult:
        """Map one CSV row (a CsvRecord) or one FHIR resource (a dict) with the mapping for ``name``."""
        return self._run_message(self.input_mapping(kind, name), Scope(data, kind=kind))

    def _run_message(self, f: LoadedFile, scope: Scope) -> MappingResult:
        m: spec.MessageMapping = f.model
        run = _Run(MappingResult(mapping=str(f.path.name)))
        for entry in m.records:
            if not self._holds(entry.when, scope, {}, None):
                continue
            res = self.mset.resources[entry.record]
            for entry_scope in self._entry_scopes(entry, scope):
                alias = self._resource(run, res, entry_scope, dict(entry.with_), preferred=entry.as_,
                                       create=entry.create)
                if alias and entry.as_:
                    run.as_names[entry.as_] = alias
        for action in m.actions:
            args = {k: run.as_names.get(v.lstrip("@"), "") for k, v in action.args.items()}
            run.result.actions.append(StoreAction(action.action, args))
        self._finish_refs(run)
        return run.result

    # ------------------------------------------------------------------ records
    def _entry_scopes(self, entry: spec.RecordEntry, scope: Scope) -> list[Scope]:
        if entry.for_each:
            return self._child_scopes(entry.for_each, scope, None)
        if entry.context:
            return self._child_scopes(entry.context, scope, None)[:1]
        return [scope]

    def _child_scopes(self, text: str, scope: Scope, datatype: str | None) -> list[Scope]:
        path = _path(text, datatype, scope.kind)
        if isinstance(path, MessagePath):
            # for_each runs once per repetition: a bare segment (NK1, MFE) means every such segment,
            # a field without a repetition selector (PID-3) every repetition
            if path.is_segment and path.segment_sel is None:
                path = replace(path, segment_sel="*")
            elif not path.is_segment and path.rep is None and path.filter_comp is None:
                path = replace(path, rep="*")
        values = [v for v in path.resolve(scope) if not _empty(_present(v))]
        if isinstance(path, MessagePath) and path.is_segment:
            return [scope.with_segment(v.segment, v.location) for v in values if v.segment is not None]
        return [scope.with_value(v) for v in values]

    def _resource(self, run: _Run, f: LoadedFile, scope: Scope, given: dict[str, Any],
                  preferred: str | None = None, create: bool | None = None) -> str | None:
        m: spec.ResourceMapping = f.model
        params = {k: p.default for k, p in m.params.items()}
        params.update(given)
        lineage: list[Lineage] = []
        key_system = key_value = None
        key = m.key
        while key is not None:
            system, _ = self._value(key.system, scope, params, m.context, f, "key.system", check=False)
            value, key_src = self._value(key.value, scope, params, m.context, f, "key.value", check=False)
            if not _empty(value):
                key_system = None if _empty(system) else str(system)
                key_value = str(value)
                lineage.append(Lineage(f"{m.resource} key", ", ".join(v.location for v in key_src) or "constant",
                                       key_value))
                break
            if key.fallback is None and key.value.required and m.without_key != "skip":
                # report where the first key was to be found (PV1-19), not the last fallback's source
                primary = m.key.value  # type: ignore[union-attr]
                self._require(key.value, f, primary.source or primary.sources or "key.value")
            key = key.fallback
        if m.key is not None and key_value is None and m.without_key == "skip":
            return None
        content: dict[str, Any] = {}
        self._rules(run, f, m.rules, scope, params, content, m.resource, lineage, m.context)
        if not content and not key_value:
            return None
        if key_value:
            existing = run.by_key.get((m.resource, key_system, key_value))
            if existing is not None:
                existing.content = merge_content(existing.content, content)
                existing.lineage.extend(lineage)
                return existing.alias
        run.counter += 1
        alias = preferred if preferred and preferred not in run.as_names else f"{f.name}#{run.counter}"
        rec = RecordWrite(alias, m.resource, key_system, key_value, content, m.mode,
                          m.create if create is None else create, lineage)
        run.result.records.append(rec)
        if key_value:
            run.by_key[(m.resource, key_system, key_value)] = rec
        return alias

    def _finish_refs(self, run: _Run) -> None:
        """Turn ``ref:`` placeholders into record aliases; drop refs to records that were not made."""

        def fix(value: Any) -> Any:
            if isinstance(value, dict):
                ref = value.get("reference")
                if isinstance(ref, str) and ref.startswith("@as:"):
                    alias = run.as_names.get(ref[4:])
                    if alias is None:
                        return None
                    value = {**value, "reference": "@" + alias}
                # drop what became None (a ref to a record not made); keep None set by `remove:`
                out = {k: fix(v) for k, v in value.items()}
                return {k: v for k, v in out.items() if v is not None or value[k] is None}
            if isinstance(value, list):
                return [v for v in (fix(v) for v in value) if v is not None and v != {}]
            return value

        for rec in run.result.records:
            rec.content = fix(rec.content)

    # ------------------------------------------------------------------ rules
    def _rules(self, run: _Run, f: LoadedFile, rules: list[spec.Rule], scope: Scope, params: dict[str, Any],
               obj: dict[str, Any], prefix: str, lineage: list[Lineage], datatype: str | None) -> None:
        for rule in rules:
            if not self._holds(rule.when, scope, params, datatype):
                continue
            if rule.for_each:
                for child in self._child_scopes(rule.for_each, scope, datatype):
                    inner = "*" if child.value is not None else datatype
                    self._rule(run, f, rule, child, params, obj, prefix, lineage, inner)
            else:
                self._rule(run, f, rule, scope, params, obj, prefix, lineage, datatype)

    def _rule(self, run: _Run, f: LoadedFile, rule: spec.Rule, scope: Scope, params: dict[str, Any],
              obj: dict[str, Any], prefix: str, lineage: list[Lineage], datatype: str | None) -> None:
        if rule.remove:
            where = _set(obj, rule.target, None)
            lineage.append(Lineage(f"{prefix}.{where}", "removed"))
            return
        inner: list[Lineage] = []
        source_loc = ""
        if rule.rules is not None or rule.use or rule.record:
            inner_scope = scope
            if rule.source:
                found = self._first(rule.source, scope, datatype)
                if found is None:
                    self._require(rule, f, rule.source)
                    return
                inner_scope = scope.with_value(found)
                source_loc = found.location
            value: Any = {}
            if rule.rules is not None:
                nested = "*" if inner_scope.value is not None else datatype
                self._rules(run, f, rule.rules, inner_scope, params, value, "", inner, nested)
            elif rule.use:
                dt = self.mset.datatypes[rule.use]
                self._rules(run, dt, dt.model.rules, inner_scope, {}, value, "", inner, dt.model.datatype)
            else:
                res = self.mset.resources[rule.record or ""]
                alias = self._resource(run, res, inner_scope, _given(rule.with_, params))
                value = {"reference": "@" + alias} if alias else None
                inner.append(Lineage("", f"record {rule.record}" + (f" from {source_loc}" if source_loc else "")))
        elif rule.ref:
            value = {"reference": "@as:" + rule.ref}
            inner.append(Lineage("", f"ref {rule.ref}"))
        elif rule.target.endswith("[]") and isinstance(rule.source, str):
            # a list target with one source path takes every value the path yields
            added = 0
            for v in _path(rule.source, datatype, scope.kind).resolve(scope):
                item = self._convert(rule, _value_of(v), v.location, f, rule.target)
                if _empty(item):
                    continue
                where = f"{prefix}.{_set(obj, rule.target, item)}".lstrip(".")
                lineage.append(Lineage(where, v.location, _short(item)))
                added += 1
            if not added:
                if rule.default is not None:
                    where = f"{prefix}.{_set(obj, rule.target, rule.default)}".lstrip(".")
                    lineage.append(Lineage(where, "default", _short(rule.default)))
                else:
                    self._require(rule, f, rule.source)
            return
        else:
            value, found_values = self._value(rule, scope, params, datatype, f, rule.target)
            src = ", ".join(v.location for v in found_values) or (
                f"param {rule.param}" if rule.param else "constant")
            inner.append(Lineage("", src, _short(value)))
        if _empty(value):
            self._require(rule, f, rule.source or rule.use or rule.record or rule.target)
            return
        where = f"{prefix}.{_set(obj, rule.target, value)}".lstrip(".")
        for lin in inner:
            lineage.append(Lineage(f"{where}.{lin.target}".rstrip(".") if lin.target else where, lin.source, lin.value))

    def _require(self, rule: spec.ValueSpec, f: LoadedFile, where: Any) -> None:
        if rule.required:
            loc = _field_location(where[0] if isinstance(where, list) else str(where))
            msg = rule.required if isinstance(rule.required, str) else f"{loc} is required but empty"
            raise MappingError(f"{f.name}: {msg}", loc, Err0357.REQUIRED_FIELD_MISSING)

    def _first(self, source: str | list[str], scope: Scope, datatype: str | None) -> Value | None:
        for text in source if isinstance(source, list) else [source]:
            for v in _path(text, datatype, scope.kind).resolve(scope):
                if not _empty(_present(v)):
                    return v
        return None

    def _value(self, v: spec.ValueSpec, scope: Scope, params: dict[str, Any], datatype: str | None,
               f: LoadedFile, what: str, check: bool = True) -> tuple[Any, list[Value]]:
        """The value of ``v`` and the values it was read from; ``check=False`` skips ``required``."""
        found: list[Value] = []
        value: Any = None
        if v.sources:
            parts = []
            for text in v.sources:
                first = self._first(text, scope, datatype)
                parts.append((first.data if first.data is not None else first.text) if first else "")
                if first:
                    found.append(first)
            value = parts if any(parts) else None
        elif v.source:
            first = self._first(v.source, scope, datatype)
            if first is not None:
                value = first.data if first.data is not None else first.text
                found.append(first)
        elif "value" in v.model_fields_set:
            value = v.value
        elif v.param:
            value = params.get(v.param)
        location = found[0].location if found else (v.source if isinstance(v.source, str) else what)
        value = self._convert(v, value, location, f, what)
        if _empty(value) and v.default is not None:
            value = v.default
        if _empty(value) and v.required and check:
            self._require(v, f, v.source or v.sources or what)
        return value, found

    def _convert(self, v: spec.ValueSpec, value: Any, location: str, f: LoadedFile, what: str) -> Any:
        """Apply the rule's ``function`` then its ``table`` to a non-empty value."""
        if not _empty(value) and v.function:
            spec_fn = FUNCTIONS[v.function]
            args = dict(v.args)
            if "timezone" in spec_fn.args and "timezone" not in args:
                args["timezone"] = self.timezone
            try:
                value = spec_fn.fn(value, **args)
            except FunctionError as exc:
                raise MappingError(f"{f.name}: {what}: {exc}", location, exc.code) from exc
        if not _empty(value) and v.table:
            value = lookup(self.mset.tables[v.table].model, v.table, str(value), location)
        return value

    def _holds(self, when: Any, scope: Scope, params: dict[str, Any], datatype: str | None) -> bool:
        if when is None:
            return True
        for cond in when if isinstance(when, list) else [when]:
            if cond.source is not None:
                first = self._first(cond.source, scope, datatype)
                value = first.text if first else ""
            else:
                raw = params.get(cond.param or "")
                value = "" if raw is None else (str(raw).lower() if isinstance(raw, bool) else str(raw))
            if cond.exists is not None and (not _empty(value)) != cond.exists:
                return False
            if cond.equals is not None and value != cond.equals:
                return False
            if cond.not_equals is not None and value == cond.not_equals:
                return False
            if cond.in_ is not None and value not in cond.in_:
                return False
            if cond.not_in is not None and value in cond.not_in:
                return False
            if (cond.exists is None and cond.equals is None and cond.not_equals is None
                    and cond.in_ is None and cond.not_in is None and _empty(value)):
                return False
        return True


def _field_location(text: str) -> str:
    """The HL7 field a required-but-empty path names (ERR-2 of code 101): ``PID-3[CX.5=MR].1`` -> ``PID-3``."""
    try:
        path = _path(text, "*", "hl7v2")
    except PathSyntaxError:
        return text
    if isinstance(path, MessagePath) and path.field is not None:
        seg = path.segment + (f"[{path.segment_sel}]" if path.segment_sel not in (None, "*") else "")
        return f"{seg}-{path.field}"
    return text


def _given(with_: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """``with:`` values; ``{param: NAME}`` passes on the caller's own parameter NAME."""
    out = {}
    for k, v in with_.items():
        if isinstance(v, dict) and set(v) == {"param"}:
            v = params.get(str(v["param"]))
        out[k] = v
    return out


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
