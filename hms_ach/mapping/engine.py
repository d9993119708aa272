"""Run the mappings of a :class:`MappingSet` over one parsed HL7 v2 message (or a CSV row, a FHIR resource).

Pure: no I/O, no store. The result is a :class:`MappingResult` (records keyed on business
identifiers, store actions, lineage) that the pipeline commits and the preview shows.

Each mapping file is compiled once, on first use, into plain Python closures: its paths are
resolved to compiled :mod:`~hms_ach.mapping.paths` objects, its functions and tables bound with their
arguments, its targets split into element steps and its ``required`` errors prepared. A message
then runs only those closures; nothing of the YAML tree is interpreted per message. Lineage (for
the preview) is recorded only when asked for: the pipeline does not store it.

That is the interpreted path: the preview (lineage), coverage and CSV and FHIR inputs run it. An
HL7 v2 message mapped without lineage runs the Python code generated from its mapping by
:mod:`hms_ach.mapping.compiler` instead (same result, checked by the goldens), unless the compiler
does not handle a construct of it (``fallbacks``) or ``HMS_ACH_MAPPING_INTERPRETED=1`` is set.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import replace
from functools import lru_cache
from typing import Any

from hms_ach.core.errors import Err0357, MappingError, RejectError
from hms_ach.core.hl7message import Hl7Message
from hms_ach.core.records import Lineage, MappingResult, Mode, RecordWrite, StoreAction, merge_content
from hms_ach.mapping import spec
from hms_ach.mapping.functions import FUNCTIONS, FunctionError
from hms_ach.mapping.loader import LoadedFile, MappingSet
from hms_ach.mapping.paths import (
    MessagePath,
    PathSyntaxError,
    Scope,
    Source,
    Value,
    compile_source,
    primitive_source,
)
from hms_ach.mapping.terminology import lookup

_TOKEN = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?:\[(\d*)\])?")


#: set to 1 to run every mapping interpreted (diagnosis: compare with the compiled path)
INTERPRETED_ENV = "HMS_ACH_MAPPING_INTERPRETED"

Token = tuple[str, "int | None | str"]
#: lineage is a list when the run records it, None when it does not (the pipeline)
Trace = list[Lineage] | None


@lru_cache(maxsize=4096)
def _path(text: str, datatype: str | None, kind: str = "hl7v2") -> Source:
    return compile_source(text, kind, datatype)


@lru_cache(maxsize=4096)
def _leaf(text: str, kind: str = "hl7v2") -> Source:
    """The source a primitive target reads: ``PID-7`` -> ``PID-7.1`` (TS.1), ``FT1-11`` -> MO.1."""
    return primitive_source(_path(text, "*", kind))


def _blank(v: Value) -> bool:
    """Whether what a resolved value holds (FHIR data as is, HL7 raw text, else the decoded text)
    is empty (see :func:`_empty`), without calls (it runs for every value read)."""
    x = v.data
    if x is None:
        x = v.raw if v.raw is not None else v.text
        return x == "" or x == '""'
    return _empty(x)


@lru_cache(maxsize=4096)
def _target(text: str) -> tuple[Token, ...]:
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


def _set_tokens(obj: dict[str, Any], tokens: tuple[Token, ...], value: Any, trace: bool) -> str:
    """Set ``value`` at the target ``tokens``; with ``trace``, return the concrete path (``name[1]``)."""
    node: Any = obj
    concrete: list[str] = []
    last_i = len(tokens) - 1
    for i, (name, idx) in enumerate(tokens):
        last = i == last_i
        if idx is None:
            if trace:
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
        if trace:
            concrete.append(f"{name}[{n}]")
    return ".".join(concrete) if trace else ""


def _setter(target: str) -> Callable[[dict[str, Any], Any, bool], str]:
    """A setter for one target, with a fast path for a plain element name (``gender``)."""
    tokens = _target(target)
    if len(tokens) == 1 and tokens[0][1] is None:
        name = tokens[0][0]

        def set_plain(obj: dict[str, Any], value: Any, trace: bool) -> str:
            obj[name] = value
            return name

        return set_plain
    if all(idx is None for _, idx in tokens):  # period.start: objects only
        names = [n for n, _ in tokens]
        parents, leaf, dotted = names[:-1], names[-1], ".".join(names)

        def set_dotted(obj: dict[str, Any], value: Any, trace: bool) -> str:
            node = obj
            for n in parents:
                node = node.setdefault(n, {})
            node[leaf] = value
            return dotted

        return set_dotted

    def set_path(obj: dict[str, Any], value: Any, trace: bool) -> str:
        return _set_tokens(obj, tokens, value, trace)

    return set_path


class _Run:
    __slots__ = ("result", "as_names", "by_key", "counter", "trace", "dirty")

    def __init__(self, result: MappingResult, trace: bool):
        self.result = result
        self.as_names: dict[str, str] = {}
        self.by_key: dict[tuple[str, str | None, str], RecordWrite] = {}
        self.counter = 0
        self.trace = trace
        #: the content may hold what ``_finish_refs`` must fix: ``@as:`` refs, list gaps, None or {} items
        self.dirty = False


def _fresh(value: Any, run: _Run) -> Any:
    """A deep copy of a dict or list value from a mapping file, a table, a parameter or a function, so
    that no record shares objects with them; marks the run dirty if the value holds what
    ``_finish_refs`` fixes."""
    if isinstance(value, dict):
        ref = value.get("reference")
        if isinstance(ref, str) and ref.startswith("@as:"):
            run.dirty = True
        return {k: _fresh(v, run) if isinstance(v, (dict, list)) else v for k, v in value.items()}
    if isinstance(value, list):
        items = []
        for v in value:
            if v is None or v == {}:
                run.dirty = True
            items.append(_fresh(v, run) if isinstance(v, (dict, list)) else v)
        return items
    return value


def _may_leave_holes(rule: spec.Rule) -> bool:
    """Whether setting this rule's target can leave a gap ({}) or a None item in a list."""
    tokens = _target(rule.target)
    if any(isinstance(idx, int) and idx > 0 for _, idx in tokens):
        return True
    return bool(rule.remove and tokens[-1][1] is not None)


First = Callable[[Scope], Value | None]
Produce = Callable[[Scope, dict[str, Any]], tuple[Any, list[Value]]]
Convert = Callable[[Any, str], Any]
Holds = Callable[[Scope, dict[str, Any]], bool]
Children = Callable[[Scope], list[Scope]]
RuleFn = Callable[[_Run, Scope, dict[str, Any], dict[str, Any], str, Trace], None]
ResourceFn = Callable[[_Run, Scope, dict[str, Any], "str | None", "bool | None", "Mode | None"], "str | None"]
MessageFn = Callable[[Scope, bool], MappingResult]
EventFn = Callable[[dict[str, Any]], dict[str, Any]]


def _raiser(exc: Exception) -> Callable[..., Any]:
    """A path that does not compile fails when it is read, as the interpreter did (a crash -> AE)."""

    def fail(*_: Any) -> Any:
        raise exc

    return fail


class MappingEngine:
    """Maps messages with one checked MappingSet. ``timezone`` is assumed for times sent without offset."""

    def __init__(self, mset: MappingSet, timezone: str = "UTC"):
        self.mset = mset
        self.timezone = timezone
        self._messages: dict[tuple[int, str], MessageFn] = {}
        self._resources: dict[tuple[str, str], ResourceFn] = {}
        self._datatypes: dict[tuple[str, str], list[RuleFn]] = {}
        self._events: dict[str, EventFn | None] = {}
        self.interpreted_only = os.environ.get(INTERPRETED_ENV, "") not in ("", "0")
        #: id(file) -> (file, its compiled function or None): the hot path's look-up, without the
        #: compiler cache's lock (the file is kept, so a reused id is told apart)
        self._compiled: dict[int, tuple[LoadedFile, Callable[[Hl7Message], MappingResult] | None]] = {}

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
            raise RejectError(
                f"event {code}^{event or '(none)'} is not supported by any message mapping",
                "MSH-9.2",
                Err0357.UNSUPPORTED_EVENT,
            )
        if not code:
            raise RejectError("MSH-9 message type is empty", "MSH-9", Err0357.REQUIRED_FIELD_MISSING)
        raise RejectError(
            f"message type {code} is not supported (mapped: "
            f"{', '.join(sorted(self.mset.supported_message_codes())) or 'none'})",
            "MSH-9.1",
            Err0357.UNSUPPORTED_MESSAGE_TYPE,
        )

    def map_message(
        self,
        msg: Hl7Message,
        mapping: LoadedFile | None = None,
        seen: set[str] | None = None,
        lineage: bool = True,
    ) -> MappingResult:
        """Map ``msg``; with ``seen``, every HL7 position the mapping read is added to it (coverage);
        ``lineage=False`` skips recording where each value came from (nothing but the preview reads it)."""
        f = mapping or self.mapping_for(msg)
        if not lineage and seen is None and not self.interpreted_only:
            entry = self._compiled.get(id(f))
            if entry is None or entry[0] is not f:
                entry = self._compiled[id(f)] = (f, self.compiled(f))
            if entry[1] is not None:
                return entry[1](msg)
        return self._message_fn(f, "hl7v2")(Scope(msg, seen=seen), lineage)

    def map_interpreted(self, msg: Hl7Message, mapping: LoadedFile | None = None) -> MappingResult:
        """Map ``msg`` on the interpreted path without lineage (to compare with the compiled one)."""
        f = mapping or self.mapping_for(msg)
        return self._message_fn(f, "hl7v2")(Scope(msg), False)

    def compiled(self, f: LoadedFile) -> Callable[[Hl7Message], MappingResult] | None:
        """The compiled form of HL7 v2 message mapping ``f``, made once and cached with the
        MappingSet (engines of one set share it); None when the compiler does not handle one of
        its constructs: the mapping then runs interpreted, and ``fallbacks`` says why."""
        from hms_ach.mapping.compiler import compiler_for

        return compiler_for(self.mset, self.timezone).compiled(f)

    @property
    def fallbacks(self) -> dict[str, str]:
        """Why a message mapping stays interpreted, by mapping name (of those compiled so far)."""
        from hms_ach.mapping.compiler import compiler_for

        return dict(compiler_for(self.mset, self.timezone).fallbacks)

    def compile_all(self) -> dict[str, str]:
        """Compile every HL7 v2 message mapping now; returns the fallbacks (mapping -> reason)."""
        for f in self.mset.messages.values():
            if f.model.match.input == "hl7v2":
                self.compiled(f)
        return dict(self.fallbacks)

    def input_mapping(self, kind: str, name: str) -> LoadedFile:
        """The message mapping for a CSV dataset or FHIR resourceType; RejectError when there is none."""
        found = self.mset.input_mapping(kind, name)
        if found is None:
            known = ", ".join(self.mset.inputs(kind)) or "none"
            raise RejectError(
                f"no mapping handles {kind} input {name!r} (mapped: {known})",
                "",
                Err0357.UNSUPPORTED_MESSAGE_TYPE,
            )
        return found

    def map_input(self, kind: str, name: str, data: Any, lineage: bool = True) -> MappingResult:
        """Map one CSV row (a CsvRecord) or one FHIR resource (a dict) with the mapping for ``name``."""
        return self._message_fn(self.input_mapping(kind, name), kind)(Scope(data, kind=kind), lineage)

    def map_event(self, event: str, change: dict[str, Any]) -> dict[str, Any] | None:
        """The payload of ``event`` built by its event mapping from ``change`` (resource, versionId,
        action, before, after); None when no mapping declares the event."""
        fn = self._events.get(event, False)
        if fn is False:
            found = self.mset.event_mapping(event)
            fn = self._events[event] = self._compile_event(found) if found is not None else None
        return None if fn is None else fn(change)  # type: ignore[operator]

    # ------------------------------------------------------------------ compiled forms (cached)
    def _message_fn(self, f: LoadedFile, kind: str) -> MessageFn:
        key = (id(f), kind)
        fn = self._messages.get(key)
        if fn is None:
            fn = self._messages[key] = self._compile_message(f, kind)
        return fn

    def _resource_fn(self, name: str, kind: str) -> ResourceFn:
        fn = self._resources.get((name, kind))
        if fn is None:
            fn = self._resources[(name, kind)] = self._compile_resource(self.mset.resources[name], kind)
        return fn

    def _datatype_rules(self, name: str, kind: str) -> list[RuleFn]:
        rules = self._datatypes.get((name, kind))
        if rules is None:
            dt = self.mset.datatypes[name]
            rules = self._datatypes[(name, kind)] = self._compile_rules(dt, dt.model.rules, kind)
        return rules

    # ------------------------------------------------------------------ messages
    def _compile_message(self, f: LoadedFile, kind: str) -> MessageFn:
        m: spec.MessageMapping = f.model
        mapping_name = str(f.path.name)
        entries = []
        for entry in m.records:
            holds = self._compile_when(entry.when, kind)
            if entry.for_each:
                scopes: Callable[[Scope], list[Scope]] | None = self._compile_children(entry.for_each, kind)
                first_only = False
            elif entry.context:
                scopes, first_only = self._compile_children(entry.context, kind), True
            else:
                scopes, first_only = None, False
            entries.append(
                (
                    holds,
                    entry.record,
                    scopes,
                    first_only,
                    dict(entry.with_),
                    entry.as_,
                    entry.create,
                    entry.mode,
                    entry.critical,
                )
            )
        actions = [(a.action, dict(a.args)) for a in m.actions]
        resource_fn = self._resource_fn

        def run_message(scope: Scope, trace: bool) -> MappingResult:
            run = _Run(MappingResult(mapping=mapping_name), trace)
            for holds, record, scopes, first_only, with_, as_, create, mode, critical in entries:
                if holds is not None and not holds(scope, {}):
                    continue
                res = resource_fn(record, kind)
                if scopes is None:
                    entry_scopes = [scope]
                else:
                    entry_scopes = scopes(scope)
                    if first_only:
                        entry_scopes = entry_scopes[:1]
                for entry_scope in entry_scopes:
                    if critical:
                        alias = res(run, entry_scope, dict(with_), as_, create, mode)
                    else:
                        alias = _tolerant_record(run, res, entry_scope, dict(with_), as_, create, mode)
                    if alias and as_:
                        run.as_names[as_] = alias
            for name, args in actions:
                run.result.actions.append(
                    StoreAction(name, {k: run.as_names.get(v.lstrip("@"), "") for k, v in args.items()})
                )
            if run.dirty:
                _finish_refs(run)
            return run.result

        return run_message

    # ------------------------------------------------------------------ event payloads
    def _compile_event(self, f: LoadedFile, walk: bool = True) -> EventFn:
        """The payload function of an event mapping; ``walk`` False: always the general rules (the
        test that the dict walks give the same payloads compares the two)."""
        m: spec.EventMapping = f.model
        rules = self._compile_rules(f, m.rules, "fhir")
        # every element a rule names is in the payload, null when empty, in the order of the rules
        names = list(dict.fromkeys(_target(r.target)[0][0] for r in m.rules))
        mapping_name = f.name

        def payload(change: dict[str, Any]) -> dict[str, Any]:
            run = _Run(MappingResult(mapping=mapping_name), False)
            content: dict[str, Any] = {}
            scope = Scope(change, kind="fhir")
            for rule in rules:
                rule(run, scope, {}, content, "", None)
            return {name: content.get(name) for name in names}

        walks = _member_walks(m.rules) if walk else None
        if walks is None:
            return payload

        def walked(change: dict[str, Any]) -> dict[str, Any]:
            # every rule reads plain members (after.subject.reference, a.first().b): a dict walk
            # gives what FHIRPath gives, for scalar values; anything else goes the general way
            content: dict[str, Any] = {}
            for name, paths in walks:
                for steps in paths:
                    found = _walk(change, steps)
                    if found is _NOT_SIMPLE:
                        return payload(change)
                    if found is not None:
                        content[name] = found
                        break
            return {name: content.get(name) for name in names}

        return walked

    # ------------------------------------------------------------------ records
    def _compile_resource(self, f: LoadedFile, kind: str) -> ResourceFn:
        m: spec.ResourceMapping = f.model
        defaults = {k: p.default for k, p in m.params.items()}
        resource, mode, name, skip = m.resource, m.mode, f.name, m.without_key == "skip"
        has_key = m.key is not None
        keys = []
        key = m.key
        while key is not None:
            system = self._compile_value(key.system, f, kind, "key.system", check=False)
            value = self._compile_value(key.value, f, kind, "key.value", check=False)
            fail = None
            if key.fallback is None and key.value.required and not skip:
                # report where the first key was to be found (PV1-19), not the last fallback's source
                primary = m.key.value  # type: ignore[union-attr]
                fail = self._compile_require(key.value, f, primary.source or primary.sources or "key.value")
            keys.append((system, value, fail))
            key = key.fallback
        rules = self._compile_rules(f, m.rules, kind)
        default_create = m.create
        key_target = f"{resource} key"

        def build(
            run: _Run,
            scope: Scope,
            given: dict[str, Any],
            preferred: str | None = None,
            create: bool | None = None,
            mode_override: Mode | None = None,
        ) -> str | None:
            params = dict(defaults)
            params.update(given)
            lineage: list[Lineage] = []
            trace: Trace = lineage if run.trace else None
            key_system = key_value = None
            for system_of, value_of, fail in keys:
                system, _ = system_of(scope, params)
                value, key_src = value_of(scope, params)
                if not _empty(value):
                    key_system = None if _empty(system) else str(system)
                    key_value = str(value)
                    if trace is not None:
                        trace.append(
                            Lineage(
                                key_target, ", ".join(v.location for v in key_src) or "constant", key_value
                            )
                        )
                    break
                if fail is not None:
                    fail()
            if has_key and key_value is None and skip:
                return None
            content: dict[str, Any] = {}
            for rule in rules:
                rule(run, scope, params, content, resource, trace)
            if not content and not key_value:
                return None
            if key_value:
                existing = run.by_key.get((resource, key_system, key_value))
                if existing is not None:
                    existing.content = merge_content(existing.content, content)
                    existing.lineage.extend(lineage)
                    return existing.alias
            run.counter += 1
            alias = preferred if preferred and preferred not in run.as_names else f"{name}#{run.counter}"
            rec = RecordWrite(
                alias,
                resource,
                key_system,
                key_value,
                content,
                mode_override or mode,
                default_create if create is None else create,
                lineage,
            )
            run.result.records.append(rec)
            if key_value:
                run.by_key[(resource, key_system, key_value)] = rec
            return alias

        return build

    # ------------------------------------------------------------------ paths and conditions
    def _compile_first(self, source: str | list[str], kind: str, primitive: bool = False) -> First:
        """The first non-empty value of ``source`` (a path, or a list of paths tried in order);
        ``primitive``: each path narrowed to its datatype's first component (see ``primitive_source``)."""
        compiled = _leaf if primitive else (lambda text, kind: _path(text, "*", kind))
        resolvers = []
        for text in source if isinstance(source, list) else [source]:
            try:
                resolvers.append(compiled(text, kind).resolve)
            except PathSyntaxError as exc:
                resolvers.append(_raiser(exc))

        if len(resolvers) == 1:
            (resolve,) = resolvers
            if isinstance(source, str):
                fast = getattr(compiled(source, kind), "first", None)
                if fast is not None:
                    return fast  # type: ignore[no-any-return]

            def first_one(scope: Scope) -> Value | None:
                for v in resolve(scope):
                    if not _blank(v):
                        return v
                return None

            return first_one

        def first_of(scope: Scope) -> Value | None:
            for resolve in resolvers:
                for v in resolve(scope):
                    if not _blank(v):
                        return v
            return None

        return first_of

    def _compile_children(self, text: str, kind: str) -> Children:
        """The scopes of a ``for_each`` (or ``context``): one per non-empty repetition or segment."""
        try:
            path = _path(text, "*", kind)
        except PathSyntaxError as exc:
            return _raiser(exc)
        if isinstance(path, MessagePath):
            # for_each runs once per repetition: a bare segment (NK1, MFE) means every such segment,
            # a field without a repetition selector (PID-3) every repetition
            if path.is_segment and path.segment_sel is None:
                path = replace(path, segment_sel="*")
            elif not path.is_segment and path.rep is None and path.filter_comp is None:
                path = replace(path, rep="*")
        resolve = path.resolve
        if isinstance(path, MessagePath) and path.is_segment:

            def segment_scopes(scope: Scope) -> list[Scope]:
                return [
                    scope.with_segment(v.segment, v.location)
                    for v in resolve(scope)
                    if not _blank(v) and v.segment is not None
                ]

            return segment_scopes

        def value_scopes(scope: Scope) -> list[Scope]:
            return [scope.with_value(v) for v in resolve(scope) if not _blank(v)]

        return value_scopes

    def _compile_when(self, when: Any, kind: str) -> Holds | None:
        if when is None:
            return None
        tests = [self._compile_condition(cond, kind) for cond in (when if isinstance(when, list) else [when])]
        if len(tests) == 1:
            return tests[0]

        def holds_all(scope: Scope, params: dict[str, Any]) -> bool:
            for test in tests:
                if not test(scope, params):
                    return False
            return True

        return holds_all

    def _compile_condition(self, cond: spec.Condition, kind: str) -> Holds:
        compares = cond.equals is not None or cond.not_equals is not None or cond.in_ is not None
        compares = compares or cond.not_in is not None
        # a comparison reads the primitive (PV1-2 = I); "is there a value" looks at the whole field
        first = self._compile_first(cond.source, kind, compares) if cond.source is not None else None
        param = cond.param or ""
        exists, equals, not_equals, in_, not_in = (
            cond.exists,
            cond.equals,
            cond.not_equals,
            cond.in_,
            cond.not_in,
        )
        bare = exists is None and equals is None and not_equals is None and in_ is None and not_in is None

        def holds(scope: Scope, params: dict[str, Any]) -> bool:
            if first is not None:
                found = first(scope)
                value = found.text if found else ""
            else:
                raw = params.get(param)
                value = "" if raw is None else (str(raw).lower() if isinstance(raw, bool) else str(raw))
            if exists is not None and (not _empty(value)) != exists:
                return False
            if equals is not None and value != equals:
                return False
            if not_equals is not None and value == not_equals:
                return False
            if in_ is not None and value not in in_:
                return False
            if not_in is not None and value in not_in:
                return False
            return not (bare and _empty(value))

        return holds

    # ------------------------------------------------------------------ values
    def _compile_require(self, rule: spec.ValueSpec, f: LoadedFile, where: Any) -> Callable[[], None] | None:
        """What ``required`` does when the value is empty: raise the prepared error (None: not required)."""
        if not rule.required:
            return None
        loc = _field_location(where[0] if isinstance(where, list) else str(where))
        msg = rule.required if isinstance(rule.required, str) else f"{loc} is required but empty"
        text = f"{f.name}: {msg}"

        def fail() -> None:
            raise MappingError(text, loc, Err0357.REQUIRED_FIELD_MISSING)

        return fail

    def _compile_convert(self, v: spec.ValueSpec, f: LoadedFile, what: str) -> Convert | None:
        """The rule's ``function`` then its ``table``, applied to a non-empty value (None: neither)."""
        fn: Callable[..., Any] | None = None
        args: dict[str, Any] = {}
        if v.function:
            spec_fn = FUNCTIONS[v.function]
            fn = spec_fn.fn
            args = dict(v.args)
            if "timezone" in spec_fn.args and "timezone" not in args:
                args["timezone"] = self.timezone
        table = self.mset.tables[v.table].model if v.table else None
        table_name = v.table or ""
        if fn is None and table is None:
            return None
        prefix = f"{f.name}: {what}: "

        def convert(value: Any, location: str) -> Any:
            if fn is not None and not _empty(value):
                try:
                    value = fn(value, **args)
                except FunctionError as exc:
                    raise MappingError(f"{prefix}{exc}", location, exc.code) from exc
            if table is not None and not _empty(value):
                value = lookup(table, table_name, str(value), location)
            return value

        return convert

    def _compile_value(
        self, v: spec.ValueSpec, f: LoadedFile, kind: str, what: str, check: bool = True
    ) -> Produce:
        """The value of ``v`` and the values it was read from; ``check=False`` skips ``required``."""
        sources = [self._compile_first(t, kind, True) for t in v.sources] if v.sources else None
        first = self._compile_first(v.source, kind, True) if not sources and v.source else None
        has_constant = "value" in v.model_fields_set
        constant, param = v.value, v.param
        no_location = v.source if isinstance(v.source, str) else what
        convert = self._compile_convert(v, f, what)
        default = v.default
        fail = self._compile_require(v, f, v.source or v.sources or what) if check else None

        def produce(scope: Scope, params: dict[str, Any]) -> tuple[Any, list[Value]]:
            found: list[Value] = []
            value: Any = None
            if sources is not None:
                parts = []
                for source in sources:
                    got = source(scope)
                    if got is None:
                        parts.append("")
                    else:
                        parts.append(got.data if got.data is not None else got.text)
                        found.append(got)
                value = parts if any(parts) else None
            elif first is not None:
                got = first(scope)
                if got is not None:
                    value = got.data if got.data is not None else got.text
                    found.append(got)
            elif has_constant:
                value = constant
            elif param:
                value = params.get(param)
            if convert is not None:
                value = convert(value, found[0].location if found else no_location)
            if default is not None and _empty(value):
                value = default
            if fail is not None and _empty(value):
                fail()
            return value, found

        return produce

    # ------------------------------------------------------------------ rules
    def _compile_rules(self, f: LoadedFile, rules: list[spec.Rule], kind: str) -> list[RuleFn]:
        out = []
        for rule in rules:
            body = self._compile_rule(f, rule, kind)
            if _may_leave_holes(rule):
                body = _dirtying(body)
            holds = self._compile_when(rule.when, kind)
            if rule.for_each:
                fn = _for_each(holds, self._compile_children(rule.for_each, kind), body)
            elif holds is not None:
                fn = _guarded(holds, body)
            else:
                fn = body
            out.append(fn if rule.critical else _tolerant(fn))
        return out

    def _compile_rule(self, f: LoadedFile, rule: spec.Rule, kind: str) -> RuleFn:
        set_value = _setter(rule.target)
        if rule.remove:

            def remove(
                run: _Run,
                scope: Scope,
                params: dict[str, Any],
                obj: dict[str, Any],
                prefix: str,
                lineage: Trace,
            ) -> None:
                where = set_value(obj, None, lineage is not None)
                if lineage is not None:
                    lineage.append(Lineage(f"{prefix}.{where}", "removed"))

            return remove
        if rule.rules is not None or rule.use or rule.record:
            return self._compile_builder(f, rule, kind, set_value)
        if rule.ref:
            return _compile_ref(
                rule,
                self._compile_require(rule, f, rule.source or rule.use or rule.record or rule.target),
                set_value,
            )
        if rule.target.endswith("[]") and isinstance(rule.source, str):
            return self._compile_list(f, rule, kind, set_value)
        if not rule.sources and rule.source:
            return self._compile_sourced(f, rule, kind, set_value)
        produce = self._compile_value(rule, f, kind, rule.target)
        fail = self._compile_require(rule, f, rule.source or rule.use or rule.record or rule.target)
        constant_src = f"param {rule.param}" if rule.param else "constant"

        def plain(
            run: _Run, scope: Scope, params: dict[str, Any], obj: dict[str, Any], prefix: str, lineage: Trace
        ) -> None:
            value, found = produce(scope, params)
            _emit(run, obj, prefix, lineage, set_value, fail, value, found, constant_src)

        return plain

    def _compile_sourced(
        self, f: LoadedFile, rule: spec.Rule, kind: str, set_value: Callable[[dict[str, Any], Any, bool], str]
    ) -> RuleFn:
        """The commonest rule: one ``source`` (or a list tried in order), then function, table, default."""
        first = self._compile_first(rule.source or "", kind, True)
        no_location = rule.source if isinstance(rule.source, str) else rule.target
        convert = self._compile_convert(rule, f, rule.target)
        default = rule.default
        # the value's own `required` and the rule's name the same place when there is one source
        fail = self._compile_require(rule, f, rule.source)

        def sourced(
            run: _Run, scope: Scope, params: dict[str, Any], obj: dict[str, Any], prefix: str, lineage: Trace
        ) -> None:
            got = first(scope)
            value: Any = None
            if got is not None:
                value = got.data if got.data is not None else got.text
            if convert is not None:
                value = convert(value, got.location if got is not None else no_location)
            if default is not None and _empty(value):
                value = default
            _emit(run, obj, prefix, lineage, set_value, fail, value, got, "constant")

        return sourced

    def _compile_list(
        self, f: LoadedFile, rule: spec.Rule, kind: str, set_value: Callable[[dict[str, Any], Any, bool], str]
    ) -> RuleFn:
        """A list target with one source path takes every value the path yields."""
        try:
            resolve = _leaf(str(rule.source), kind).resolve
        except PathSyntaxError as exc:
            resolve = _raiser(exc)
        convert = self._compile_convert(rule, f, rule.target)
        default = rule.default
        fail = self._compile_require(rule, f, rule.source)

        def each(
            run: _Run, scope: Scope, params: dict[str, Any], obj: dict[str, Any], prefix: str, lineage: Trace
        ) -> None:
            added = 0
            for v in resolve(scope):
                item = v.data if v.data is not None else v.text
                if convert is not None:
                    item = convert(item, v.location)
                if _empty(item):
                    continue
                if isinstance(item, (dict, list)):
                    item = _fresh(item, run)
                if lineage is None:
                    set_value(obj, item, False)
                else:
                    where = f"{prefix}.{set_value(obj, item, True)}".lstrip(".")
                    lineage.append(Lineage(where, v.location, _short(item)))
                added += 1
            if not added:
                if default is not None:
                    value = _fresh(default, run)
                    if lineage is None:
                        set_value(obj, value, False)
                    else:
                        where = f"{prefix}.{set_value(obj, value, True)}".lstrip(".")
                        lineage.append(Lineage(where, "default", _short(default)))
                elif fail is not None:
                    fail()

        return each

    def _compile_builder(
        self, f: LoadedFile, rule: spec.Rule, kind: str, set_value: Callable[[dict[str, Any], Any, bool], str]
    ) -> RuleFn:
        """``rules:``, ``use:`` or ``record:``: the value is built from the source (or the context)."""
        first = self._compile_first(rule.source, kind) if rule.source else None
        fail_source = self._compile_require(rule, f, rule.source) if rule.source else None
        fail = self._compile_require(rule, f, rule.source or rule.use or rule.record or rule.target)
        nested = self._compile_rules(f, rule.rules, kind) if rule.rules is not None else None
        use, record, with_ = rule.use, rule.record, rule.with_
        passes_params = any(isinstance(v, dict) and set(v) == {"param"} for v in with_.values())
        datatype_rules = self._datatype_rules
        resource_fn = self._resource_fn

        def build(
            run: _Run, scope: Scope, params: dict[str, Any], obj: dict[str, Any], prefix: str, lineage: Trace
        ) -> None:
            inner_scope = scope
            source_loc = ""
            if first is not None:
                found = first(scope)
                if found is None:
                    if fail_source is not None:
                        fail_source()
                    return
                inner_scope = scope.with_value(found)
                source_loc = found.location
            inner: Trace = [] if lineage is not None else None
            value: Any = {}
            if nested is not None:
                for fn in nested:
                    fn(run, inner_scope, params, value, "", inner)
            elif use:
                for fn in datatype_rules(use, kind):
                    fn(run, inner_scope, {}, value, "", inner)
            else:
                given = _given(with_, params) if passes_params else dict(with_)
                alias = resource_fn(record or "", kind)(run, inner_scope, given, None, None, None)
                value = {"reference": "@" + alias} if alias else None
                if inner is not None:
                    inner.append(
                        Lineage("", f"record {record}" + (f" from {source_loc}" if source_loc else ""))
                    )
            if _empty(value):
                if fail is not None:
                    fail()
                return
            if lineage is None:
                set_value(obj, value, False)
                return
            where = f"{prefix}.{set_value(obj, value, True)}".lstrip(".")
            for lin in inner or ():
                lineage.append(
                    Lineage(
                        f"{where}.{lin.target}".rstrip(".") if lin.target else where, lin.source, lin.value
                    )
                )

        return build


def _compile_ref(
    rule: spec.Rule, fail: Callable[[], None] | None, set_value: Callable[[dict[str, Any], Any, bool], str]
) -> RuleFn:
    name = rule.ref or ""
    source = f"ref {name}"

    def ref(
        run: _Run, scope: Scope, params: dict[str, Any], obj: dict[str, Any], prefix: str, lineage: Trace
    ) -> None:
        value = {"reference": "@as:" + name}
        run.dirty = True
        if lineage is None:
            set_value(obj, value, False)
            return
        where = f"{prefix}.{set_value(obj, value, True)}".lstrip(".")
        lineage.append(Lineage(where, source))

    return ref


def _tolerant(body: RuleFn) -> RuleFn:
    """A rule marked ``critical: false``: its failure is a warning on the result, not an error."""

    def tolerant(
        run: _Run, scope: Scope, params: dict[str, Any], obj: dict[str, Any], prefix: str, lineage: Trace
    ) -> None:
        try:
            body(run, scope, params, obj, prefix, lineage)
        except MappingError as exc:
            run.result.warnings.append(exc)

    return tolerant


def _tolerant_record(
    run: _Run,
    res: ResourceFn,
    scope: Scope,
    given: dict[str, Any],
    as_: str | None,
    create: bool | None,
    mode: Mode | None,
) -> str | None:
    """A record entry marked ``critical: false``: when it fails, the records it added are taken back
    (references to it are then dropped) and the failure is a warning on the result."""
    made = len(run.result.records)
    try:
        return res(run, scope, given, as_, create, mode)
    except MappingError as exc:
        for rec in run.result.records[made:]:
            if rec.key_value:
                run.by_key.pop((rec.resource_type, rec.key_system, rec.key_value), None)
        del run.result.records[made:]
        run.result.warnings.append(exc)
        return None


def _dirtying(body: RuleFn) -> RuleFn:
    def dirtying(
        run: _Run, scope: Scope, params: dict[str, Any], obj: dict[str, Any], prefix: str, lineage: Trace
    ) -> None:
        run.dirty = True
        body(run, scope, params, obj, prefix, lineage)

    return dirtying


def _guarded(holds: Holds, body: RuleFn) -> RuleFn:
    def guarded(
        run: _Run, scope: Scope, params: dict[str, Any], obj: dict[str, Any], prefix: str, lineage: Trace
    ) -> None:
        if holds(scope, params):
            body(run, scope, params, obj, prefix, lineage)

    return guarded


def _emit(
    run: _Run,
    obj: dict[str, Any],
    prefix: str,
    lineage: Trace,
    set_value: Callable[[dict[str, Any], Any, bool], str],
    fail: Callable[[], None] | None,
    value: Any,
    found: Value | list[Value] | None,
    fallback: str,
) -> None:
    """The end every single-value rule shares: an empty value only runs the ``required`` check;
    any other is copied (lists and objects), set at the target and, when tracing, recorded with the
    source locations it came from (``found``; ``fallback`` when there are none)."""
    if value is None or value == "" or value == '""' or (isinstance(value, (list, dict)) and _empty(value)):
        if fail is not None:
            fail()
        return
    if isinstance(value, (dict, list)):
        value = _fresh(value, run)
    if lineage is None:
        set_value(obj, value, False)
        return
    where = f"{prefix}.{set_value(obj, value, True)}".lstrip(".")
    if isinstance(found, Value):
        src = found.location
    else:
        src = ", ".join(v.location for v in found or ()) or fallback
    lineage.append(Lineage(where, src, _short(value)))


def _for_each(holds: Holds | None, children: Children, body: RuleFn) -> RuleFn:
    def for_each(
        run: _Run, scope: Scope, params: dict[str, Any], obj: dict[str, Any], prefix: str, lineage: Trace
    ) -> None:
        if holds is not None and not holds(scope, params):
            return
        for child in children(scope):
            body(run, child, params, obj, prefix, lineage)

    return for_each


def _finish_refs(run: _Run) -> None:
    """Turn ``ref:`` placeholders into record aliases; drop refs to records that were not made.

    Every dict and list of the content is rebuilt, so no record shares an object with the mapping
    files (``value:`` constants) or with another record.
    """
    as_names = run.as_names

    def fix(value: Any) -> Any:
        if isinstance(value, dict):
            ref = value.get("reference")
            if isinstance(ref, str) and ref.startswith("@as:"):
                alias = as_names.get(ref[4:])
                if alias is None:
                    return None
                value = {**value, "reference": "@" + alias}
            out = {}
            for k, v in value.items():
                if isinstance(v, (dict, list)):
                    v = fix(v)
                    if v is None:  # a ref to a record not made; None set by `remove:` is kept
                        continue
                out[k] = v
            return out
        if isinstance(value, list):
            items = []
            for v in value:
                if isinstance(v, (dict, list)):
                    v = fix(v)
                if v is not None and v != {}:
                    items.append(v)
            return items
        return value

    for rec in run.result.records:
        rec.content = fix(rec.content)


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


# ---------------------------------------------------------------------- event payloads as dict walks
#: A FHIRPath an event payload rule may read without fhirpathpy: lower-case member names, each
#: optionally followed by ``.first()`` (``after.location.first().location.reference``).
_MEMBER_PATH = re.compile(r"[a-z][A-Za-z0-9]*(?:\.first\(\))?(?:\.[a-z][A-Za-z0-9]*(?:\.first\(\))?)*")
#: What a walk returns when the data is not plain scalars (an object, a list, a primitive's
#: extension): the payload is then made by the general rules.
_NOT_SIMPLE: Any = object()


def _member_walks(rules: list[spec.Rule]) -> list[tuple[str, list[list[tuple[str, bool]]]]] | None:
    """For event rules that each only copy a member path (or a list of them, tried in order) to a
    plain target: per rule (target, [[(member, first), ...] per path]); else None."""
    walks = []
    for rule in rules:
        if set(rule.model_dump(exclude_defaults=True)) - {"target", "source"}:
            return None
        sources = rule.source if isinstance(rule.source, list) else [rule.source]
        if not _PLAIN_TARGET.fullmatch(rule.target) or not sources:
            return None
        paths = []
        for text in sources:
            if not isinstance(text, str) or not _MEMBER_PATH.fullmatch(text):
                return None
            steps: list[tuple[str, bool]] = []
            for part in text.split("."):
                if part == "first()":
                    steps[-1] = (steps[-1][0], True)
                else:
                    steps.append((part, False))
            paths.append(steps)
        walks.append((rule.target, paths))
    return walks


_PLAIN_TARGET = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _walk(base: dict[str, Any], steps: list[tuple[str, bool]]) -> Any:
    """The first non-empty scalar (text, number, boolean) the member path ``steps`` reaches from
    ``base``, lists flattened as FHIRPath does; None when there is none; :data:`_NOT_SIMPLE` when
    it reaches an object or list, or a member with a primitive extension (``_status``)."""
    items: list[Any] = [base]
    for key, first in steps:
        nxt: list[Any] = []
        for item in items:
            if not isinstance(item, dict):
                continue
            if "_" + key in item:
                return _NOT_SIMPLE
            value = item.get(key)
            if value is None:
                continue
            if isinstance(value, list):
                nxt.extend(v for v in value if v is not None)
            else:
                nxt.append(value)
        items = nxt[:1] if first else nxt
        if not items:
            return None
    for item in items:
        if isinstance(item, bool):
            return item
        if isinstance(item, str):
            if item != "" and item != '""':
                return item
        elif isinstance(item, int | float):
            return float(item) if isinstance(item, float) else item
        else:
            return _NOT_SIMPLE
    return None
