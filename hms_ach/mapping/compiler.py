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
path that does not compile, a datatype path outside a datatype value) makes :func:`compile_message`
raise :class:`Unsupported` with the reason; the engine then keeps that mapping interpreted and logs
``mapping.compile_fallback``.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import replace as dc_replace
from typing import Any

from hms_ach.core.errors import Err0357, MappingError
from hms_ach.core.records import MappingResult, RecordWrite, StoreAction, merge_content
from hms_ach.mapping import compiler_runtime, spec
from hms_ach.mapping.engine import (
    _empty,
    _field_location,
    _fresh,
    _given,
    _leaf,
    _may_leave_holes,
    _path,
    _Run,
    _target,
)
from hms_ach.mapping.functions import FUNCTIONS, FunctionError
from hms_ach.mapping.loader import LoadedFile, MappingSet
from hms_ach.mapping.paths import MessagePath, PathSyntaxError, Source, TypePath
from hms_ach.mapping.terminology import _folded, lookup

log = logging.getLogger(__name__)

#: the generated function: (message, trace) -> MappingResult, like the interpreter's
CompiledFn = Callable[[Any], MappingResult]


class Unsupported(Exception):
    """A construct the compiler does not generate code for; the mapping stays interpreted."""


@dataclass(frozen=True)
class _Scope:
    """What the generated code holds for a scope: variable names, and the static segment name."""

    seg: str | None  # variable holding the current Segment (None: message level)
    segname: str | None  # its name, known when the code is generated
    val: str | None  # variable holding the current raw value (a datatype value)
    comps: str | None  # variable holding it split into components
    loc: str  # variable holding the scope's location: an At tuple, made text only for an error

    @property
    def shape(self) -> tuple[str | None, bool]:
        return (self.segname, self.val is not None)


_TOP = _Scope(None, None, None, None, '""')


def _t(v: str) -> str:
    """An inline test equal to ``_empty(v)`` for a value known to be text or None."""
    return f"({v} is None or {v} == '' or {v} == '\"\"')"


def _e(v: str) -> str:
    """An inline test equal to ``_empty(v)`` (a call only for lists and objects)."""
    return f"({v} is None or {v} == '' or {v} == '\"\"' or (isinstance({v}, (list, dict)) and _empty({v})))"


_BLANK = ("", '""')


class _Gen:
    """Writes the source of one message mapping and the functions it calls."""

    def __init__(self, mset: MappingSet, timezone: str):
        self.mset = mset
        self.timezone = timezone
        self.consts: dict[str, Any] = {}
        self.const_ids: dict[int, str] = {}
        self.functions: list[list[str]] = []
        self.made: dict[tuple[Any, ...], str] = {}
        self.counter = itertools.count()
        #: whether a ``ref:`` set here stays the object in the record (no merge can copy it): then it
        #: is resolved in place at the end, without the walk over every record
        self.ref_in_place = True

    # ------------------------------------------------------------------ plumbing
    def const(self, value: Any, prefix: str = "K") -> str:
        key = id(value)
        name = self.const_ids.get(key)
        if name is None or self.consts[name] is not value:
            name = f"{prefix}{len(self.consts)}"
            self.consts[name] = value
            self.const_ids[key] = name
        return name

    def var(self, prefix: str) -> str:
        return f"{prefix}{next(self.counter)}"

    def path(self, text: str, primitive: bool) -> Source:
        try:
            return _leaf(text, "hl7v2") if primitive else _path(text, "*", "hl7v2")
        except PathSyntaxError as exc:
            raise Unsupported(f"path {text!r} does not compile: {exc}") from exc

    # ------------------------------------------------------------------ reading values
    def segments(
        self, out: list[str], ind: str, path: MessagePath, scope: _Scope, s: str
    ) -> tuple[str, bool]:
        """Emit the block binding ``s`` to each segment ``path`` reads; returns the new indent, and
        whether the block is a loop (else it runs at most once: no ``break`` may end it)."""
        name = repr(path.segment)
        sel = path.segment_sel
        if scope.seg is not None and scope.segname == path.segment and sel is None:
            out.append(f"{ind}{s} = {scope.seg}")
            out.append(f"{ind}if True:")
            return ind + "    ", False
        if scope.seg is None:
            base = f"by.get({name}, ())"
        else:
            base = f"_rt_group(msg, {scope.seg}, {name})"
        if sel is None:
            ss = self.var("_ss")
            out.append(f"{ind}{ss} = {base}")
            out.append(f"{ind}if {ss}:")
            out.append(f"{ind}    {s} = {ss}[0]")
            return ind + "    ", False
        if sel == "*":
            out.append(f"{ind}for {s} in {base}:")
        else:
            n = int(sel)
            out.append(f"{ind}for {s} in {base}[{n - 1}:{n}]:")
        return ind + "    ", True

    def component(
        self, out: list[str], ind: str, rep: str, raw: str, comp: int | None, sub: int | None
    ) -> None:
        if comp is None:
            out.append(f"{ind}{raw} = {rep}")
            return
        c = self.var("_c")
        out.append(f"{ind}{c} = {rep}.split(CS)")
        out.append(f"{ind}{raw} = {c}[{comp - 1}] if {comp} <= len({c}) else ''")
        if sub is not None:
            out.append(f"{ind}{c} = {raw}.split(SS)")
            out.append(f"{ind}{raw} = {c}[{sub - 1}] if {sub} <= len({c}) else ''")

    def each(
        self,
        out: list[str],
        ind: str,
        path: Source,
        scope: _Scope,
        body: Callable[[list[str], str, str, str], None],
        stop: str | None = None,
    ) -> None:
        """Emit a loop over every value ``path`` resolves to; ``body(out, indent, raw, at)`` gets the
        variable names of the raw value and of its ``At`` tuple expression. ``stop``: an expression
        that ends the loops when true (checked after each value)."""
        if isinstance(path, TypePath):
            if scope.val is None or scope.seg is None:
                raise Unsupported(f"{path.text} is read outside a datatype value")
            raw = self.var("_raw")
            if path.comp is None:
                out.append(f"{ind}{raw} = {scope.val}")
            else:
                c = scope.comps
                out.append(f"{ind}{raw} = {c}[{path.comp - 1}] if {path.comp} <= len({c}) else ''")
                if path.sub is not None:
                    sc = self.var("_c")
                    out.append(f"{ind}{sc} = {raw}.split(SS)")
                    out.append(f"{ind}{raw} = {sc}[{path.sub - 1}] if {path.sub} <= len({sc}) else ''")
            body(out, ind, raw, f"({self.const(path, 'P')}, None, {scope.loc}, 0)")
            return
        if not isinstance(path, MessagePath):
            raise Unsupported(f"{path.text}: not an HL7 path")
        s, x, reps, r, ri = (self.var(p) for p in ("_s", "_x", "_rp", "_r", "_ri"))
        pc = self.const(path, "P")
        inner, loops = self.segments(out, ind, path, scope, s)
        if path.field is None:
            body(out, inner, f"{s}.name", f"({pc}, {s}, 0, 0)")
            if stop and loops:
                out.append(f"{inner}if {stop}:")
                out.append(f"{inner}    break")
            return
        fno = path.field
        out.append(f"{inner}{x} = {s}.fields[{fno}] if {fno} < len({s}.fields) else ''")
        if path.segment == "MSH" and fno in (1, 2):
            out.append(f"{inner}{reps} = [{x}]")
        else:
            out.append(f"{inner}{reps} = {x}.split(RS) if {x} else []")
        raw = self.var("_raw")
        at = f"({pc}, {s}, len({reps}), {ri})"
        if path.rep is None and path.filter_comp is None:
            out.append(f"{inner}if {reps}:")
            ind2 = inner + "    "
            out.append(f"{ind2}{ri} = 1")
            self.component(out, ind2, f"{reps}[0]", raw, path.comp, path.sub)
            body(out, ind2, raw, at)
        else:
            out.append(f"{inner}for {ri}, {r} in enumerate({reps}, 1):")
            ind2 = inner + "    "
            if path.rep not in (None, "*"):
                out.append(f"{ind2}if {ri} != {int(path.rep)}:")
                out.append(f"{ind2}    continue")
            if path.filter_comp is not None:
                fv = self.var("_fv")
                self.component(out, ind2, r, fv, path.filter_comp, None)
                out.append(f"{ind2}if (unesc({fv}) if ESC in {fv} else {fv}) != {path.filter_value!r}:")
                out.append(f"{ind2}    continue")
            self.component(out, ind2, r, raw, path.comp, path.sub)
            body(out, ind2, raw, at)
            if stop:
                out.append(f"{ind2}if {stop}:")
                out.append(f"{ind2}    break")
        if stop and loops:
            out.append(f"{inner}if {stop}:")
            out.append(f"{inner}    break")

    def first(
        self,
        out: list[str],
        ind: str,
        source: str | list[str],
        scope: _Scope,
        primitive: bool,
        v: str,
        at: str,
        keep: bool = True,
    ) -> None:
        """Emit code setting ``v`` to the decoded text of the first non-blank value of ``source``
        (None when there is none); with ``keep``, ``at`` to where it was and ``<v>_raw`` to its raw text."""
        out.append(f"{ind}{v} = None")
        texts = source if isinstance(source, list) else [source]
        for i, text in enumerate(texts):
            path = self.path(text, primitive)
            cur = ind
            if i:
                out.append(f"{ind}if {v} is None:")
                cur = ind + "    "

            def take(o: list[str], bi: str, raw: str, where: str) -> None:
                o.append(f"{bi}if {raw} != '' and {raw} != '\"\"':")
                o.append(f"{bi}    {v} = unesc({raw}) if ESC in {raw} else {raw}")
                if keep:  # where it was, and the raw text (for a value built from it)
                    o.append(f"{bi}    {v}_raw = {raw}")
                    o.append(f"{bi}    {at} = {where}")

            self.each(out, cur, path, scope, take, stop=f"{v} is not None")

    # ------------------------------------------------------------------ values
    def require(self, v: spec.ValueSpec, f: LoadedFile, where: Any) -> str | None:
        """The name of a prepared required-error (raised as ``raise NAME.__class__(...)``)."""
        if not v.required:
            return None
        loc = _field_location(where[0] if isinstance(where, list) else str(where))
        msg = v.required if isinstance(v.required, str) else f"{loc} is required but empty"
        return self.const((f"{f.name}: {msg}", loc), "Q")

    def convert(
        self,
        out: list[str],
        ind: str,
        v: spec.ValueSpec,
        f: LoadedFile,
        what: str,
        val: str,
        where: str,
        text: bool = False,
    ) -> None:
        """Emit the rule's ``function`` then ``table`` on ``val`` (``where``: the location expression;
        ``text``: ``val`` is known to be text or None)."""
        empty = _t if text else _e
        if v.function:
            spec_fn = FUNCTIONS[v.function]
            args = dict(v.args)
            if "timezone" in spec_fn.args and "timezone" not in args:
                args["timezone"] = self.timezone
            fn = self.const(spec_fn.fn, "F")
            a = self.const(args, "A")
            prefix = self.const(f"{f.name}: {what}: ", "K")
            out.append(f"{ind}if not {empty(val)}:")
            out.append(f"{ind}    try:")
            out.append(f"{ind}        {val} = {fn}({val}, **{a})")
            out.append(f"{ind}    except FunctionError as _exc:")
            out.append(f"{ind}        raise _rt_function_error({prefix}, _exc, {where}) from _exc")
        if v.table:
            table = self.mset.tables[v.table].model
            t = self.const(table, "T")
            name = self.const(v.table, "K")
            out.append(f"{ind}if not {(_e if v.function else empty)(val)}:")
            if table.case_sensitive:
                m = self.const(table.map, "M")
                out.append(f"{ind}    _tk = str({val}).strip()")
                out.append(f"{ind}    _tf = {m}.get(_tk)")
            else:
                out.append(f"{ind}    _tk = str({val}).strip()")
                folded = self.const(_folded(table), "M")  # the table's codes upper-cased, once
                out.append(f"{ind}    _tf = {folded}.get(_tk.upper())")
            out.append(
                f"{ind}    {val} = _tf if _tf is not None else _lookup({t}, {name}, str({val}), {where})"
            )

    def value(
        self,
        out: list[str],
        ind: str,
        v: spec.ValueSpec,
        f: LoadedFile,
        scope: _Scope,
        what: str,
        check: bool,
    ) -> tuple[str, bool]:
        """Emit ``_compile_value``'s produce; returns the variable holding the value, and whether
        it is known to be text or None (read from the message, no function, table or default)."""
        val = self.var("_v")
        no_location = repr(v.source if isinstance(v.source, str) else what)
        where = no_location
        if v.sources:
            parts = self.var("_parts")
            at0 = self.var("_at")
            out.append(f"{ind}{parts} = []")
            out.append(f"{ind}{at0} = None")
            for text in v.sources:
                g, gat = self.var("_g"), self.var("_at")
                self.first(out, ind, text, scope, True, g, gat, bool(v.function or v.table))
                out.append(f"{ind}if {g} is None:")
                out.append(f"{ind}    {parts}.append('')")
                out.append(f"{ind}else:")
                out.append(f"{ind}    {parts}.append({g})")
                if v.function or v.table:  # only an error of theirs names where the value was
                    out.append(f"{ind}    if {at0} is None:")
                    out.append(f"{ind}        {at0} = {gat}")
            out.append(f"{ind}{val} = {parts} if any({parts}) else None")
            where = f"(_rt_location(msg, {at0}) if {at0} is not None else {no_location})"
        elif v.source:
            gat = self.var("_at")
            self.first(out, ind, v.source, scope, True, val, gat, bool(v.function or v.table))
            where = f"(_rt_location(msg, {gat}) if {val} is not None else {no_location})"
        elif "value" in v.model_fields_set:
            out.append(f"{ind}{val} = {self.const(v.value)}")
        elif v.param:
            out.append(f"{ind}{val} = params.get({v.param!r})")
        else:
            out.append(f"{ind}{val} = None")
        is_text = bool(v.source) and not v.sources
        self.convert(out, ind, v, f, what, val, where, is_text)
        is_text = is_text and not (v.function or v.table)
        if v.default is not None:
            out.append(f"{ind}if {(_t if is_text else _e)(val)}:")
            out.append(f"{ind}    {val} = {self.const(v.default)}")
            is_text = is_text and isinstance(v.default, str)
        fail = self.require(v, f, v.source or v.sources or what) if check else None
        if fail:
            out.append(f"{ind}if {(_t if is_text else _e)(val)}:")
            out.append(f"{ind}    raise _MappingError({fail}[0], {fail}[1], _E101)")
        return val, is_text

    # ------------------------------------------------------------------ targets
    def set_target(self, out: list[str], ind: str, target: str, obj: str, val: str) -> None:
        tokens = _target(target)
        if all(idx is None for _, idx in tokens):
            node = obj
            for name, _ in tokens[:-1]:
                out.append(f"{ind}_nd = {node}.setdefault({name!r}, {{}})")
                node = "_nd"
            out.append(f"{ind}{node}[{tokens[-1][0]!r}] = {val}")
            return
        if len(tokens) == 1 and tokens[0][1] == "+":
            out.append(f"{ind}{obj}.setdefault({tokens[0][0]!r}, []).append({val})")
            return
        # the walk of the interpreter's _set_tokens, unrolled for this target
        out.append(f"{ind}_nd = {obj}")
        last_i = len(tokens) - 1
        for i, (name, idx) in enumerate(tokens):
            last = i == last_i
            if idx is None:
                out.append(
                    f"{ind}_nd[{name!r}] = {val}" if last else f"{ind}_nd = _nd.setdefault({name!r}, {{}})"
                )
                continue
            out.append(f"{ind}_ls = _nd.setdefault({name!r}, [])")
            if idx == "+":
                out.append(f"{ind}_ls.append({val})" if last else f"{ind}_nd = {{}}\n{ind}_ls.append(_nd)")
                continue
            n = int(idx)
            if n > 0:
                out.append(f"{ind}if len(_ls) < {n}:")
                out.append(f"{ind}    run.dirty = True")
            out.append(f"{ind}while len(_ls) <= {n}:")
            out.append(f"{ind}    _ls.append({{}})")
            if not last:
                out.append(f"{ind}_nd = _ls[{n}]")
                continue
            out.append(f"{ind}if isinstance({val}, dict) and isinstance(_ls[{n}], dict):")
            out.append(f"{ind}    _ls[{n}] = _merge_content(_ls[{n}], {val})")
            out.append(f"{ind}else:")
            out.append(f"{ind}    _ls[{n}] = {val}")

    @staticmethod
    def unless_empty(out: list[str], ind: str, empty: str, fail: str | None) -> None:
        """Emit ``if EMPTY: <raise the required error, or nothing> else:``; the caller writes the
        ``else`` body one level in."""
        out.append(f"{ind}if {empty}:")
        out.append(f"{ind}    raise _MappingError({fail}[0], {fail}[1], _E101)" if fail else f"{ind}    pass")
        out.append(f"{ind}else:")

    def emit(
        self, out: list[str], ind: str, rule: spec.Rule, obj: str, val: str, fail: str | None, text_only: bool
    ) -> None:
        """``_emit``: an empty value runs only the required check; others are copied and set.
        ``text_only``: the value is text or None (read from the message, nothing applied after)."""
        self.unless_empty(out, ind, (_t if text_only else _e)(val), fail)
        if not text_only:
            out.append(f"{ind}    if isinstance({val}, (dict, list)):")
            out.append(f"{ind}        {val} = _fresh({val}, run)")
        self.set_target(out, ind + "    ", rule.target, obj, val)

    # ------------------------------------------------------------------ conditions and loops
    def when(self, out: list[str], ind: str, when: Any, scope: _Scope) -> str | None:
        """Emit the test of ``when``; returns the boolean variable (None: no condition)."""
        if when is None:
            return None
        ok = self.var("_ok")
        out.append(f"{ind}{ok} = True")
        for cond in when if isinstance(when, list) else [when]:
            cur = ind
            out.append(f"{ind}if {ok}:")
            cur = ind + "    "
            compares = any(x is not None for x in (cond.equals, cond.not_equals, cond.in_, cond.not_in))
            val = self.var("_cv")
            if cond.source is not None:
                g, gat = self.var("_g"), self.var("_at")
                self.first(out, cur, cond.source, scope, compares, g, gat, False)
                out.append(f"{cur}{val} = {g} if {g} is not None else ''")
            else:
                raw = self.var("_cp")
                out.append(f"{cur}{raw} = params.get({(cond.param or '')!r})")
                out.append(
                    f"{cur}{val} = '' if {raw} is None else "
                    f"(str({raw}).lower() if isinstance({raw}, bool) else str({raw}))"
                )
            tests = []
            if cond.exists is not None:
                tests.append(f"(not {_t(val)}) != {cond.exists!r}")  # the tested value is text
            if cond.equals is not None:
                tests.append(f"{val} != {cond.equals!r}")
            if cond.not_equals is not None:
                tests.append(f"{val} == {cond.not_equals!r}")
            if cond.in_ is not None:
                tests.append(f"{val} not in {self.const(list(cond.in_))}")
            if cond.not_in is not None:
                tests.append(f"{val} in {self.const(list(cond.not_in))}")
            if not tests:
                tests.append(f"{_t(val)}")
            out.append(f"{cur}if {' or '.join(tests)}:")
            out.append(f"{cur}    {ok} = False")
        return ok

    def guarded(self, out: list[str], ind: str, when: Any, scope: _Scope) -> str:
        """Emit ``when``'s test and open its block; returns the indent of what it guards."""
        ok = self.when(out, ind, when, scope)
        if ok is None:
            return ind
        out.append(f"{ind}if {ok}:")
        out.append(f"{ind}    pass")
        return ind + "    "

    def children(
        self,
        out: list[str],
        ind: str,
        text: str,
        scope: _Scope,
        body: Callable[[list[str], str, _Scope], None],
        first_only: bool = False,
    ) -> None:
        """Emit a loop over the scopes of a ``for_each`` (or the first, for a ``context``)."""
        path = self.path(text, False)
        if isinstance(path, MessagePath):
            if path.is_segment and path.segment_sel is None:
                path = dc_replace(path, segment_sel="*")
            elif not path.is_segment and path.rep is None and path.filter_comp is None:
                path = dc_replace(path, rep="*")
        done = self.var("_done") if first_only else None
        if done:
            out.append(f"{ind}{done} = False")

        def each(o: list[str], bi: str, raw: str, at: str) -> None:
            o.append(f"{bi}if {raw} != '' and {raw} != '\"\"':")
            ci = bi + "    "
            if isinstance(path, MessagePath) and path.is_segment:
                s = at.split(", ")[1]
                loc = self.var("_l")
                o.append(f"{ci}{loc} = {at}")
                child = _Scope(s, path.segment, None, None, loc)
            else:
                val, comps, loc = self.var("_val"), self.var("_cs"), self.var("_l")
                o.append(f"{ci}{val} = {raw}")
                o.append(f"{ci}{comps} = {raw}.split(CS)")
                o.append(f"{ci}{loc} = {at}")
                segvar = at.split(", ")[1] if isinstance(path, MessagePath) else scope.seg
                segname = path.segment if isinstance(path, MessagePath) else scope.segname
                child = _Scope(segvar, segname, val, comps, loc)
            body(o, ci, child)
            if done:
                o.append(f"{ci}{done} = True")

        self.each(out, ind, path, scope, each, stop=done)

    def with_value(self, out: list[str], ind: str, scope: _Scope, raw: str, at: str, path: Source) -> _Scope:
        val, comps, loc = self.var("_val"), self.var("_cs"), self.var("_l")
        out.append(f"{ind}{val} = {raw}")
        out.append(f"{ind}{comps} = {raw}.split(CS)")
        out.append(f"{ind}{loc} = {at}")
        if isinstance(path, MessagePath):
            segv = self.var("_sg")
            out.append(f"{ind}{segv} = {at}[1]")
            return _Scope(segv, path.segment, val, comps, loc)
        return _Scope(scope.seg, scope.segname, val, comps, loc)

    # ------------------------------------------------------------------ rules
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
            o.append(f"{bi}{item} = unesc({raw}) if ESC in {raw} else {raw}")
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
        out.append("    msg, by, CS, RS, SS, ESC, unesc, refs = k")
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
        out.append(f"{i}msg, by, CS, RS, SS, ESC, unesc, refs = k")
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
            # every segment of a message shares the parser's decoder of its encoding characters
            "    unesc = msg.segments[0]._unescape if msg.segments else (lambda x: x)",
            "    by = msg._by_name",
            "    refs = []  # the ref: objects set, resolved in place at the end",
            "    k = (msg, by, CS, RS, SS, ESC, unesc, refs)",
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
    "_fresh": _fresh,
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
