"""Compiled message mappings: Python source generated from each HL7 v2 message mapping.

:class:`~hms_ach.mapping.engine.MappingEngine` interprets a mapping through a tree of closures (one
per rule, path, condition and conversion). For the hot path (the pipeline, no lineage, no coverage)
this module instead writes one Python function per message mapping, with its resource and datatype
mappings generated as plain functions beside it, and ``compile()``s it once. The generated code
reads segments, fields, repetitions and components by index from the message's split text, decodes
escapes only for the values it reads, inlines table look-ups and sets targets directly; locations
(``PID-3[2].1``) are only built when an error needs one.

It yields exactly the :class:`MappingResult` of the interpreted engine (records, warnings, errors
with the same text, location and code); the goldens and tests/unit/mapping/test_compiler.py check
both paths against each other. A construct this compiler does not handle (CSV and FHIR inputs, a
path that does not compile, a datatype path outside a datatype value) makes
:meth:`MappingCompiler.compile` raise :class:`Unsupported` with the reason; that mapping then stays
interpreted, and ``mapping.compile_fallback`` is logged.

This module writes rules, records and message functions; :mod:`~hms_ach.mapping.compiler_values`
writes values, targets and conditions, :mod:`~hms_ach.mapping.compiler_reads` the path reads, and
:mod:`~hms_ach.mapping.compiler_runtime` holds what the generated code calls.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from hms_ach.core.errors import Err0357, MappingError
from hms_ach.core.records import MappingResult, RecordWrite, StoreAction, merge_content
from hms_ach.mapping import compiler_runtime, spec
from hms_ach.mapping.compiler_reads import _TOP, Unsupported, _e, _Scope, _t
from hms_ach.mapping.compiler_values import _Values
from hms_ach.mapping.engine import _empty, _given, _may_leave_holes, _Run, _target
from hms_ach.mapping.functions import FunctionError
from hms_ach.mapping.loader import LoadedFile, MappingSet
from hms_ach.mapping.terminology import lookup

log = logging.getLogger(__name__)

#: the generated function: (message) -> MappingResult, like the interpreter's
CompiledFn = Callable[[Any], MappingResult]

__all__ = ["CompiledFn", "MappingCompiler", "Unsupported", "compiler_for", "generate"]


class _Gen(_Values):
    """Writes the source of message mappings and of the resource and datatype functions they call."""

    def rules(
        self, out: list[str], ind: str, f: LoadedFile, rules: list[spec.Rule], scope: _Scope, obj: str
    ) -> None:
        for rule in rules:
            cur = ind
            if not rule.critical:
                out.append(f"{ind}try:")
                cur = ind + "    "
            # a list item removed leaves a None for the walk to drop; an index past the list's end
            # leaves {} holes, flagged where the padding happens (set_target)
            holes = _may_leave_holes(rule) and rule.remove

            def body(o: list[str], bi: str, sc: _Scope, rule: spec.Rule = rule, holes: bool = holes) -> None:
                if holes:
                    o.append(f"{bi}run.dirty = True")
                self.rule(o, bi, f, rule, sc, obj)

            inner = self.guarded(out, cur, rule.when, scope)
            if rule.for_each:
                self.children(out, inner, rule.for_each, scope, body)
            else:
                body(out, inner, scope)
            if not rule.critical:
                out.append(f"{cur}pass")
                out.append(f"{ind}except _MappingError as _exc:")
                out.append(f"{ind}    run.result.warnings.append(_exc)")

    def rule(self, out: list[str], ind: str, f: LoadedFile, rule: spec.Rule, scope: _Scope, obj: str) -> None:
        if rule.remove:
            self.set_target(out, ind, rule.target, obj, "None")
            return
        if rule.rules is not None or rule.use or rule.record:
            self.builder(out, ind, f, rule, scope, obj)
            return
        if rule.ref:
            ref = repr({"reference": "@as:" + rule.ref})
            if self.ref_in_place and not any(isinstance(idx, int) for _, idx in _target(rule.target)):
                out.append(f"{ind}_rd = {ref}")
                out.append(f"{ind}refs.append(_rd)")
                self.set_target(out, ind, rule.target, obj, "_rd")
            else:
                out.append(f"{ind}run.dirty = True")
                self.set_target(out, ind, rule.target, obj, ref)
            return
        if rule.target.endswith("[]") and isinstance(rule.source, str):
            self.list_rule(out, ind, f, rule, scope, obj)
            return
        if self.constant(rule):  # known when generating: not empty, nothing applied to it
            val = self.var("_v")
            out.append(f"{ind}{val} = {self.copy_of(rule.value)}")
            self.set_target(out, ind, rule.target, obj, val)
            return
        val, text_only = self.value(out, ind, rule, f, scope, rule.target, True)
        self.emit(out, ind, rule, obj, val, None, text_only)

    def list_rule(
        self, out: list[str], ind: str, f: LoadedFile, rule: spec.Rule, scope: _Scope, obj: str
    ) -> None:
        path = self.path(str(rule.source), True)
        added = self.var("_added")
        out.append(f"{ind}{added} = 0")

        def each(o: list[str], bi: str, raw: str, at: str) -> None:
            item = self.var("_it")
            o.append(f"{bi}{item} = decoded[{raw}] if ESC in {raw} else {raw}")
            self.convert(o, bi, rule, f, rule.target, item, f"_rt_location(msg, {at})", True)
            o.append(f"{bi}if not {(_e if rule.function or rule.table else _t)(item)}:")
            o.append(f"{bi}    if isinstance({item}, (dict, list)):")
            o.append(f"{bi}        {item} = _fresh({item}, run)")
            self.set_target(o, bi + "    ", rule.target, obj, item)
            o.append(f"{bi}    {added} += 1")

        self.each(out, ind, path, scope, each)
        fail = self.require(rule, f, rule.source)
        if rule.default is not None:
            out.append(f"{ind}if not {added}:")
            self.set_target(out, ind + "    ", rule.target, obj, f"_fresh({self.const(rule.default)}, run)")
        elif fail:
            out.append(f"{ind}if not {added}:")
            out.append(f"{ind}    raise _MappingError({fail}[0], {fail}[1], _E101)")

    def builder(
        self, out: list[str], ind: str, f: LoadedFile, rule: spec.Rule, scope: _Scope, obj: str
    ) -> None:
        cur = ind
        inner = scope
        if rule.source:
            texts = rule.source if isinstance(rule.source, list) else [rule.source]
            paths = [self.path(t, False) for t in texts]
            shapes = {(type(p), getattr(p, "segment", None)) for p in paths}
            if len(shapes) > 1:
                raise Unsupported(
                    f"{f.name}: {rule.target}: sources of a built value from different segments"
                )
            g, gat = self.var("_g"), self.var("_at")
            self.first(out, ind, rule.source, scope, False, g, gat)
            self.unless_empty(out, ind, f"{g} is None", self.require(rule, f, rule.source))
            cur = ind + "    "
            inner = self.with_value(out, cur, scope, f"{g}_raw", gat, paths[0])
        fail = self.require(rule, f, rule.source or rule.use or rule.record or rule.target)
        value = self.var("_b")
        if rule.rules is not None:
            out.append(f"{cur}{value} = {{}}")
            saved = self.ref_in_place
            if any(isinstance(idx, int) for _, idx in _target(rule.target)):
                self.ref_in_place = False  # the built object may be merged into one already there
            self.rules(out, cur, f, rule.rules, inner, value)
            self.ref_in_place = saved
        elif rule.use:
            fn = self.datatype_fn(rule.use, inner)
            out.append(f"{cur}{value} = {{}}")
            out.append(f"{cur}{fn}(run, k, {self.scope_args(inner)}, {value})")
        else:
            with_ = rule.with_
            passes = any(isinstance(v, dict) and set(v) == {"param"} for v in with_.values())
            given = f"_given({self.const(with_)}, params)" if passes else f"dict({self.const(with_)})"
            fn = self.resource_fn(rule.record or "", inner)
            alias = self.var("_alias")
            out.append(f"{cur}{alias} = {fn}(run, k, {self.scope_args(inner)}, {given}, None, None, None)")
            out.append(f"{cur}{value} = {{'reference': '@' + {alias}}} if {alias} else None")
        self.unless_empty(out, cur, f"not {value}", fail)  # an object or None: empty is falsy
        self.set_target(out, cur + "    ", rule.target, obj, value)

    # ------------------------------------------------------------------ functions
    @staticmethod
    def scope_args(scope: _Scope) -> str:
        return f"{scope.seg}, {scope.val}, {scope.comps}, {scope.loc}"

    @staticmethod
    def callee_scope(shape: tuple[str | None, bool]) -> _Scope:
        segname, has_val = shape
        return _Scope(
            "seg" if segname is not None else None,
            segname,
            "val" if has_val else None,
            "comps" if has_val else None,
            "loc",
        )

    def function_name(self, kind: str, name: str, scope: _Scope) -> tuple[str, bool]:
        """The generated function of mapping ``name`` for this scope shape; True when it is to be
        written now (one function per mapping and shape, shared by all its callers)."""
        key = (kind, name, scope.shape)
        fn = self.made.get(key)
        if fn is not None:
            return fn, False
        fn = self.made[key] = f"_{kind}{len(self.made)}_{name}"
        return fn, True

    def datatype_fn(self, name: str, scope: _Scope) -> str:
        fn, new = self.function_name("D", name, scope)
        if not new:
            return fn
        dt = self.mset.datatypes[name]
        out = [f"def {fn}(run, k, seg, val, comps, loc, obj):"]
        out.append("    msg, by, CS, RS, SS, ESC, decoded, reps_of, comps_of, subs_of, refs = k")
        out.append("    params = {}")
        saved, self.ref_in_place = self.ref_in_place, False  # its objects may be set at any target
        self.rules(out, "    ", dt, dt.model.rules, self.callee_scope(scope.shape), "obj")
        self.ref_in_place = saved
        self.functions.append(out)
        return fn

    def resource_fn(self, name: str, scope: _Scope) -> str:
        fn, new = self.function_name("R", name, scope)
        if not new:
            return fn
        f = self.mset.resources[name]
        m: spec.ResourceMapping = f.model
        sc = self.callee_scope(scope.shape)
        out = [f"def {fn}(run, k, seg, val, comps, loc, given, preferred, create, mode_override):"]
        i = "    "
        out.append(f"{i}msg, by, CS, RS, SS, ESC, decoded, reps_of, comps_of, subs_of, refs = k")
        out.append(f"{i}params = dict({self.const({k: p.default for k, p in m.params.items()})})")
        out.append(f"{i}params.update(given)")
        out.append(f"{i}key_system = key_value = None")
        skip = m.without_key == "skip"
        key = m.key
        first = True
        while key is not None:
            cur = i
            if not first:
                out.append(f"{i}if key_value is None:")
                cur = i + "    "
            first = False
            system, system_text = self.value(out, cur, key.system, f, sc, "key.system", False)
            val, val_text = self.value(out, cur, key.value, f, sc, "key.value", False)
            out.append(f"{cur}if not {(_t if val_text else _e)(val)}:")
            out.append(
                f"{cur}    key_system = None if {(_t if system_text else _e)(system)} else str({system})"
            )
            out.append(f"{cur}    key_value = str({val})")
            if key.fallback is None and key.value.required and not skip:
                primary = m.key.value  # type: ignore[union-attr]
                fail = self.require(key.value, f, primary.source or primary.sources or "key.value")
                out.append(f"{cur}else:")
                out.append(f"{cur}    raise _MappingError({fail}[0], {fail}[1], _E101)")
            key = key.fallback
        if m.key is not None and skip:
            out.append(f"{i}if key_value is None:")
            out.append(f"{i}    return None")
        out.append(f"{i}content = {{}}")
        saved, self.ref_in_place = self.ref_in_place, True  # a record's content is its own
        self.rules(out, i, f, m.rules, sc, "content")
        self.ref_in_place = saved
        res = repr(m.resource)
        out.append(f"{i}if not content and not key_value:")
        out.append(f"{i}    return None")
        out.append(f"{i}if key_value:")
        out.append(f"{i}    existing = run.by_key.get(({res}, key_system, key_value))")
        out.append(f"{i}    if existing is not None:")
        out.append(f"{i}        run.dirty = True  # the merge copies objects: refs are resolved by the walk")
        out.append(f"{i}        existing.content = _merge_content(existing.content, content)")
        out.append(f"{i}        return existing.alias")
        out.append(f"{i}run.counter += 1")
        out.append(
            f"{i}alias = preferred if preferred and preferred not in run.as_names "
            f"else {f.name!r} + '#' + str(run.counter)"
        )
        out.append(
            f"{i}rec = _RecordWrite(alias, {res}, key_system, key_value, content, mode_override or {m.mode!r}, "
            f"{m.create!r} if create is None else create, [])"
        )
        out.append(f"{i}run.result.records.append(rec)")
        out.append(f"{i}if key_value:")
        out.append(f"{i}    run.by_key[({res}, key_system, key_value)] = rec")
        out.append(f"{i}return alias")
        self.functions.append(out)
        return fn

    def message(self, f: LoadedFile, name: str) -> list[str]:
        m: spec.MessageMapping = f.model
        i = "    "
        out = [
            f"def {name}(msg):",
            "    seps = msg.header.separators",
            "    CS, RS, SS, ESC = seps.component, seps.repetition, seps.subcomponent, seps.escape",
            # every segment of a message shares the parser's decoder of its encoding characters;
            # each text is decoded, and each field and component split, once per message
            "    decoded = _rt_Decoded()",
            "    decoded.decode = msg.segments[0]._unescape if msg.segments else str",
            "    reps_of = {'': []}  # field text -> its repetitions (an empty field has none)",
            "    comps_of = {}  # repetition or component text -> its components",
            "    subs_of = {}  # component text -> its subcomponents",
            "    by = msg._by_name",
            "    refs = []  # the ref: objects set, resolved in place at the end",
            "    k = (msg, by, CS, RS, SS, ESC, decoded, reps_of, comps_of, subs_of, refs)",
            "    params = {}",
            f"    run = _Run(_MappingResult(mapping={str(f.path.name)!r}), False)",
        ]
        for entry in m.records:
            cur = self.guarded(out, i, entry.when, _TOP)

            def call(o: list[str], bi: str, sc: _Scope, entry: spec.RecordEntry = entry) -> None:
                fn = self.resource_fn(entry.record, sc)
                args = (
                    f"run, k, {self.scope_args(sc)}, dict({self.const(dict(entry.with_))}), "
                    f"{entry.as_!r}, {entry.create!r}, {entry.mode!r}"
                )
                alias = self.var("_alias")
                if entry.critical:
                    o.append(f"{bi}{alias} = {fn}({args})")
                else:
                    made = self.var("_made")
                    o.append(f"{bi}{made} = len(run.result.records)")
                    o.append(f"{bi}try:")
                    o.append(f"{bi}    {alias} = {fn}({args})")
                    o.append(f"{bi}except _MappingError as _exc:")
                    o.append(f"{bi}    _rt_undo_records(run, {made}, _exc)")
                    o.append(f"{bi}    {alias} = None")
                if entry.as_:
                    o.append(f"{bi}if {alias}:")
                    o.append(f"{bi}    run.as_names[{entry.as_!r}] = {alias}")

            if entry.for_each:
                self.children(out, cur, entry.for_each, _TOP, call)
            elif entry.context:
                self.children(out, cur, entry.context, _TOP, call, first_only=True)
            else:
                call(out, cur, _TOP)
        for a in m.actions:
            args = self.const(dict(a.args))
            out.append(
                f"{i}run.result.actions.append(_StoreAction({a.action!r}, "
                f"{{k_: run.as_names.get(v_.lstrip('@'), '') for k_, v_ in {args}.items()}}))"
            )
        out.append(f"{i}if run.dirty or (refs and not _rt_resolve_refs(run, refs)):")
        out.append(f"{i}    _rt_finish_refs(run)")
        out.append(f"{i}return run.result")
        return out


_GLOBALS: dict[str, Any] = {
    "_empty": _empty,
    "_fresh": compiler_runtime.fresh,
    "_rt_empty_list": compiler_runtime.empty_list,
    "_given": _given,
    "_lookup": lookup,
    "_merge_content": merge_content,
    "_Run": _Run,
    "_MappingResult": MappingResult,
    "_RecordWrite": RecordWrite,
    "_StoreAction": StoreAction,
    "_MappingError": MappingError,
    "_E101": Err0357.REQUIRED_FIELD_MISSING,
    "FunctionError": FunctionError,
    "_rt_group": compiler_runtime.group,
    "_rt_Decoded": compiler_runtime.Decoded,
    "_rt_location": compiler_runtime.location,
    "_rt_function_error": compiler_runtime.function_error,
    "_rt_undo_records": compiler_runtime.undo_records,
    "_rt_finish_refs": compiler_runtime.finish_refs,
    "_rt_resolve_refs": compiler_runtime.resolve_refs,
}


class MappingCompiler:
    """Compiles the message mappings of one MappingSet. The functions of resource and datatype
    mappings are generated and compiled once and shared by every message mapping that runs them
    (``encounter`` serves most ADT events), so each further message mapping adds little code."""

    def __init__(self, mset: MappingSet, timezone: str):
        self.gen = _Gen(mset, timezone)
        self.namespace: dict[str, Any] = dict(_GLOBALS)
        self.count = 0
        #: compiled message mappings by id of their file (None: interpreted), and why not compiled
        self.functions: dict[int, CompiledFn | None] = {}
        self.fallbacks: dict[str, str] = {}
        self.lock = threading.Lock()

    def compiled(self, f: LoadedFile) -> CompiledFn | None:
        """``f`` compiled (once), or None when it stays interpreted (``fallbacks`` says why)."""
        key = id(f)
        if key in self.functions:
            return self.functions[key]
        with self.lock:  # the pipeline may map on several threads
            if key not in self.functions:
                try:
                    self.functions[key] = self.compile(f)
                except Unsupported as exc:
                    self.functions[key] = None
                    self.fallbacks[f.name] = str(exc)
                    log.debug("mapping.compile_fallback", extra={"mapping": f.name, "reason": str(exc)})
        return self.functions[key]

    def source(self, f: LoadedFile) -> tuple[str, str]:
        """The source this mapping adds (new shared functions, then its own) and its function's
        name; raises :class:`Unsupported` (and forgets what it began) when a construct is not compiled."""
        if not isinstance(f.model, spec.MessageMapping):
            raise Unsupported(f"{f.name} is not a message mapping")
        if f.model.match.input != "hl7v2":
            raise Unsupported(f"{f.name}: only HL7 v2 input is compiled")
        gen = self.gen
        made, functions = dict(gen.made), len(gen.functions)
        self.count += 1
        name = f"_M{self.count}_{f.name}".replace("-", "_")
        try:
            main = gen.message(f, name)
        except Unsupported:
            gen.made, gen.functions = made, gen.functions[:functions]
            raise
        lines: list[str] = []
        for fn in gen.functions[functions:]:
            lines.extend(fn)
            lines.append("")
        lines.extend(main)
        return "\n".join(lines) + "\n", name

    def compile(self, f: LoadedFile) -> CompiledFn:
        """Generate and ``compile()`` message mapping ``f``: (message) -> MappingResult."""
        source, name = self.source(f)
        self.namespace.update(self.gen.consts)
        code = compile(source, f"<compiled mapping {f.name}>", "exec")
        exec(code, self.namespace)  # noqa: S102 - our own generated source, from checked mappings
        fn: CompiledFn = self.namespace[name]
        return fn


#: the attribute of a MappingSet holding its compilers, by timezone
_CACHE = "_hms_ach_compilers"
_CACHE_LOCK = threading.Lock()


def compiler_for(mset: MappingSet, timezone: str) -> MappingCompiler:
    """The compiler of ``mset`` for ``timezone``, kept on the MappingSet itself: it lives and goes
    with the set (a reload makes a new set, hence new compiled code)."""
    with _CACHE_LOCK:
        compilers: dict[str, MappingCompiler] | None = getattr(mset, _CACHE, None)
        if compilers is None:
            compilers = {}
            setattr(mset, _CACHE, compilers)
        found = compilers.get(timezone)
        if found is None:
            found = compilers[timezone] = MappingCompiler(mset, timezone)
        return found


def generate(mset: MappingSet, f: LoadedFile, timezone: str) -> str:
    """The whole Python source of message mapping ``f`` on its own (to read or debug)."""
    return MappingCompiler(mset, timezone).source(f)[0]
