"""Reading HL7 v2 values in the Python source :mod:`hms_ach.mapping.compiler` generates.

The code written here binds a segment, splits its field into repetitions and components by index
and decodes escapes only for the value read, as :mod:`hms_ach.mapping.paths` resolves a path; where
the value was is kept as an ``At`` tuple (:mod:`~hms_ach.mapping.compiler_runtime`), made text only
when an error names it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hms_ach.mapping.engine import _leaf, _path
from hms_ach.mapping.loader import MappingSet
from hms_ach.mapping.paths import MessagePath, PathSyntaxError, Source, TypePath


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
    """An inline test equal to ``_empty(v)`` (a call only for lists: an object is empty when it has
    no member)."""
    return (
        f"({v} is None or {v} == '' or {v} == '\"\"' or (isinstance({v}, dict) and not {v})"
        f" or (isinstance({v}, list) and _rt_empty_list({v})))"
    )


class _Reads:
    """The generator's state (constants, names, functions written) and its path reads."""

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

    @staticmethod
    def split_once(out: list[str], ind: str, var: str, text: str, level: str) -> None:
        """Emit ``var = text`` split at the separator of ``level`` (``reps``, ``comps`` or ``subs``),
        split once per message: the message's ``<level>_of`` dict keeps each text's parts (inline,
        as a hit costs a ``get`` where a call would cost more than the split it saves)."""
        sep = {"reps": "RS", "comps": "CS", "subs": "SS"}[level]
        out.append(f"{ind}{var} = {level}_of.get({text})")
        out.append(f"{ind}if {var} is None:")
        out.append(f"{ind}    {var} = {level}_of[{text}] = {text}.split({sep})")

    def component(
        self,
        out: list[str],
        ind: str,
        rep: str,
        raw: str,
        comp: int | None,
        sub: int | None,
        comps: str | None = None,
    ) -> str | None:
        """Emit ``raw`` = component ``comp`` (subcomponent ``sub``) of repetition ``rep``; returns the
        variable holding ``rep``'s components (``comps``: one that already does)."""
        if comp is None:
            out.append(f"{ind}{raw} = {rep}")
            return comps
        if comps is None:
            comps = self.var("_c")
            self.split_once(out, ind, comps, rep, "comps")
        out.append(f"{ind}{raw} = {comps}[{comp - 1}] if {comp} <= len({comps}) else ''")
        if sub is not None:
            c = self.var("_c")
            self.split_once(out, ind, c, raw, "subs")
            out.append(f"{ind}{raw} = {c}[{sub - 1}] if {sub} <= len({c}) else ''")
        return comps

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
                    self.split_once(out, ind, sc, raw, "subs")
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
        if path.segment == "MSH" and fno in (1, 2):
            out.append(f"{inner}{x} = {s}.fields[{fno}] if {fno} < len({s}.fields) else ''")
            out.append(f"{inner}{reps} = [{x}]")
        else:  # an empty field has no repetition: reps_of holds '' -> []
            out.append(f"{inner}{x} = {s}.fields[{fno}] if {fno} < len({s}.fields) else ''")
            self.split_once(out, inner, reps, x, "reps")
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
            comps = None
            if path.filter_comp is not None:
                fv = self.var("_fv")
                comps = self.component(out, ind2, r, fv, path.filter_comp, None)
                out.append(f"{ind2}if (decoded[{fv}] if ESC in {fv} else {fv}) != {path.filter_value!r}:")
                out.append(f"{ind2}    continue")
            self.component(out, ind2, r, raw, path.comp, path.sub, comps)
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
                o.append(f"{bi}    {v} = decoded[{raw}] if ESC in {raw} else {raw}")
                if keep:  # where it was, and the raw text (for a value built from it)
                    o.append(f"{bi}    {v}_raw = {raw}")
                    o.append(f"{bi}    {at} = {where}")

            self.each(out, cur, path, scope, take, stop=f"{v} is not None")

    # ------------------------------------------------------------------ values
