"""Values, targets and conditions in the Python source :mod:`hms_ach.mapping.compiler` generates:
a rule's ``source``/``sources``/``value``/``param``, then ``function``, ``table``, ``default`` and
``required`` in the interpreter's order, its ``when`` and ``for_each``, and where it is set.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace as dc_replace
from typing import Any

from hms_ach.mapping import spec
from hms_ach.mapping.compiler_reads import _e, _Reads, _Scope, _t
from hms_ach.mapping.engine import _empty, _field_location, _target
from hms_ach.mapping.functions import FUNCTIONS
from hms_ach.mapping.loader import LoadedFile
from hms_ach.mapping.paths import MessagePath, Source
from hms_ach.mapping.terminology import _folded

#: the classes of values a flat constant holds, shared safely by copies
_SCALARS = (str, int, float, bool, type(None))


def _flat_dict(value: Any) -> bool:
    """A plain dict of scalars without an ``@as:`` reference: ``_fresh`` copies it as ``dict()`` does."""
    if type(value) is not dict or not all(type(x) in _SCALARS for x in value.values()):
        return False
    ref = value.get("reference")
    return not (isinstance(ref, str) and ref.startswith("@as:"))


class _Values(_Reads):
    """Values, targets, conditions and loops."""

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
                f"{ind}    {val} = _tf if _tf is not None else {self.unmapped(table, t, name, val, where)}"
            )

    @staticmethod
    def constant(v: spec.ValueSpec) -> bool:
        """Whether ``v`` is a constant ``value`` set as it is (no source, param, function or table)
        and not empty: then its emptiness and ``required`` need no test when the code runs."""
        plain = not (v.source or v.sources or v.param or v.function or v.table)
        return plain and "value" in v.model_fields_set and not _empty(v.value)

    def copy_of(self, value: Any) -> str:
        """The expression of ``_fresh(value)`` for a constant ``value``: the constant itself when it is
        not a dict or list, a C-level copy of a flat one (scalar items, no ``@as:`` reference, no
        None item: ``_fresh`` would copy it the same way and leave the run clean)."""
        name = self.const(value)
        if not isinstance(value, (dict, list)):
            return name
        if _flat_dict(value):
            return f"dict({name})"
        if type(value) is list and all(type(x) in _SCALARS and x is not None for x in value):
            return f"list({name})"
        return f"_fresh({name}, run)"

    def unmapped(self, table: spec.CodeTable, t: str, name: str, val: str, where: str) -> str:
        """The expression of ``lookup``'s answer for a code ``_tk`` not in ``table``, inlined when the
        table's ``unmapped`` policy cannot fail (then no location is made)."""
        if table.unmapped == "keep":
            return "_tk"
        if table.unmapped == "default":
            if isinstance(table.default, str) and "{code}" in table.default:
                return f"({self.const(table.default, 'K')}.replace('{{code}}', _tk) if _tk else None)"
            return self.const(table.default, "K")  # the table's own object, as lookup returns it
        return f"_lookup({t}, {name}, str({val}), {where})"

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
            # merge_content into an empty object is a copy without the None members; a value set
            # here is always the rule's own (built, copied or read), so without None it is kept as is
            out.append(f"{ind}_od = _ls[{n}]")
            out.append(f"{ind}if isinstance({val}, dict) and isinstance(_od, dict):")
            out.append(
                f"{ind}    _ls[{n}] = _merge_content(_od, {val}) if _od else {val} if None not in {val}.values() "
                f"else {{_mk: _mv for _mk, _mv in {val}.items() if _mv is not None}}"
            )
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
        if text_only:
            pass
        elif self.flat_results(rule):
            out.append(f"{ind}    if {val}.__class__ is dict:")
            out.append(f"{ind}        {val} = dict({val})")
        else:
            out.append(f"{ind}    if isinstance({val}, (dict, list)):")
            out.append(f"{ind}        {val} = _fresh({val}, run)")
        self.set_target(out, ind + "    ", rule.target, obj, val)

    def flat_results(self, v: spec.ValueSpec) -> bool:
        """Whether ``v`` is a message text through a table (no function) whose every answer, and
        ``v``'s default, is text, a number or a flat dict: then ``dict(value)`` is ``_fresh(value)``."""
        if not v.table or v.function or v.sources or not v.source:
            return False
        table = self.mset.tables[v.table].model
        answers = [*table.map.values(), table.default, v.default]
        return all(not isinstance(x, (dict, list)) or _flat_dict(x) for x in answers)

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
                self.split_once(o, ci, comps, raw, "comps")
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
        self.split_once(out, ind, comps, raw, "comps")
        out.append(f"{ind}{loc} = {at}")
        if isinstance(path, MessagePath):
            segv = self.var("_sg")
            out.append(f"{ind}{segv} = {at}[1]")
            return _Scope(segv, path.segment, val, comps, loc)
        return _Scope(scope.seg, scope.segname, val, comps, loc)

    # ------------------------------------------------------------------ rules
