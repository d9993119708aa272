"""Check a loaded mapping set against the FHIR R4 structure and the HL7 v2.5 definitions, once, at load.

Run by :func:`hms_ach.mapping.loader.load_mappings` (so by ``hms-ach check`` and every hot reload):

* every ``target`` of a resource mapping (root: its record type) and of a datatype mapping (root:
  its ``produces``) names R4 elements, step by step, with a did-you-mean for a misspelt one;
* cardinality: ``[]``/``[n]`` only on a list element (``Location.address[]`` is refused: it would
  store an array where R4 allows one value), and a list element written without ``[]`` is refused
  too (we do not wrap silently: the mapping says ``name[]`` when it appends);
* types: what a rule writes (a text, a boolean, an object, a reference, a datatype mapping's
  ``produces``) fits the element (no text into ``maritalStatus``, no HumanName into ``address``);
* every HL7 v2 source, ``for_each`` and ``when`` path names a segment, field, component and
  sub-component that HL7 v2.5 (or a later version) defines (``PID-88`` is refused).

Records written by the engine from a mapping that passed this check need no per-message validation.
Records of types R4 does not have (Shift, Timecard) and event payloads are not FHIR: their targets
are not checked against R4.
"""

from __future__ import annotations

from typing import Any

from hms_ach.core.errors import ConfigError
from hms_ach.core.records import MERGE_DIRECTIVES
from hms_ach.mapping import spec
from hms_ach.mapping.fhir_structure import Produced, compatible, elements, resolve_target
from hms_ach.mapping.functions import FUNCTIONS
from hms_ach.mapping.hl7_structure import check_components, check_field, datatype_known
from hms_ach.mapping.loader import LoadedFile, MappingSet, position_of
from hms_ach.mapping.paths import MessagePath, PathSyntaxError, TypePath, compile_source


def check_mapping_set(mset: MappingSet) -> list[ConfigError]:
    """Every structure problem of every mapping file (empty when all is well)."""
    return _Checker(mset).run()


def _python_kind(value: Any) -> Produced:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "list"
    return ""


def _one_kind(values: list[Any]) -> Produced:
    kinds = {_python_kind(v) for v in values if v is not None}
    return kinds.pop() if len(kinds) == 1 else ""


class _Checker:
    def __init__(self, mset: MappingSet):
        self.mset = mset
        self.errors: list[ConfigError] = []

    def run(self) -> list[ConfigError]:
        for f in self.mset.resources.values():
            m: spec.ResourceMapping = f.model
            root = m.resource if elements(m.resource) is not None else None
            self._rules(f, m.rules, ("rules",), root, m.input, m.context)
            key, kloc = m.key, tuple[Any, ...](("key",))
            while key is not None:
                for part in ("system", "value"):
                    self._sources(f, getattr(key, part), (*kloc, part), m.input, m.context)
                key, kloc = key.fallback, (*kloc, "fallback")
        for f in self.mset.datatypes.values():
            d: spec.DatatypeMapping = f.model
            produces = d.produces.strip()
            if produces and elements(produces) is None:
                self._err(f, ("produces",), f"{produces!r} is not a FHIR R4 datatype", "e.g. HumanName")
                produces = ""
            self._rules(f, d.rules, ("rules",), produces or None, "hl7v2", d.datatype)
        for f in self.mset.messages.values():
            mm: spec.MessageMapping = f.model
            if mm.match.input != "hl7v2":
                continue
            for i, entry in enumerate(mm.records):
                for attr in ("context", "for_each"):
                    text = getattr(entry, attr)
                    if text:
                        self._hl7(f, text, ("records", i, attr), None)
                self._when(f, entry.when, ("records", i, "when"), "hl7v2", None)
        return self.errors

    def _err(self, f: LoadedFile, loc: tuple[Any, ...], msg: str, expected: str | None = None) -> None:
        self.errors.append(ConfigError(msg, position_of(f.path, f.positions, loc), expected))

    # ------------------------------------------------------------------ HL7 sources
    def _hl7(self, f: LoadedFile, text: str, loc: tuple[Any, ...], datatype: str | None) -> None:
        try:
            path = compile_source(text, "hl7v2", datatype)
        except PathSyntaxError:
            return  # the loader reports the syntax
        problem: str | None = None
        if isinstance(path, MessagePath):
            problem = check_field(path.segment, path.field, path.comp, path.sub)
            if problem is None and path.filter_comp is not None and path.field is not None:
                problem = check_field(path.segment, path.field, path.filter_comp, None)
        elif isinstance(path, TypePath) and path.comp is not None and datatype_known(path.dtype):
            problem = check_components(path.dtype, {path.dtype}, path.comp, path.sub)
        if problem:
            self._err(f, loc, f"source {text!r}: {problem}", "a position HL7 v2.5 defines")

    def _sources(
        self, f: LoadedFile, v: spec.ValueSpec, loc: tuple[Any, ...], kind: str, datatype: str | None
    ) -> None:
        if kind != "hl7v2":
            return
        if isinstance(v.source, list):
            for i, s in enumerate(v.source):
                self._hl7(f, s, (*loc, "source", i), datatype)
        elif v.source:
            self._hl7(f, v.source, (*loc, "source"), datatype)
        for i, s in enumerate(v.sources or []):
            self._hl7(f, s, (*loc, "sources", i), datatype)

    def _when(self, f: LoadedFile, when: Any, loc: tuple[Any, ...], kind: str, datatype: str | None) -> None:
        if when is None or kind != "hl7v2":
            return
        items = when if isinstance(when, list) else [when]
        for i, cond in enumerate(items):
            if cond.source:
                cloc = (*loc, i) if isinstance(when, list) else loc
                self._hl7(f, cond.source, (*cloc, "source"), datatype)

    # ------------------------------------------------------------------ FHIR targets
    def _produced(self, rule: spec.Rule, kind: str) -> Produced:
        """What the rule writes, as far as the mapping says; "" when it cannot be known here."""
        if rule.rules is not None:
            return "object"
        if rule.use is not None:
            dt = self.mset.datatypes.get(rule.use)
            produces = dt.model.produces.strip() if dt is not None else ""
            return produces if produces and elements(produces) is not None else "object"
        if rule.record is not None or rule.ref is not None:
            return "Reference"
        if rule.table is not None:
            table = self.mset.tables.get(rule.table)
            if table is None:
                return ""
            values = list(table.model.map.values())
            if table.model.unmapped == "keep":
                values.append("")
            elif table.model.unmapped == "default":
                values.append(table.model.default)
            return _one_kind(values)
        if rule.function is not None:
            if isinstance(rule.args.get("map"), dict):  # lookup: the values of its own map
                return _one_kind([*rule.args["map"].values(), rule.args.get("default")])
            fn = FUNCTIONS.get(rule.function)
            return _one_kind([ex[2] for ex in fn.examples]) if fn is not None and fn.examples else ""
        if "value" in rule.model_fields_set:
            return _python_kind(rule.value)
        if rule.source is not None and kind in ("hl7v2", "csv") and not rule.sources:
            return "string"
        return ""

    def _rules(
        self,
        f: LoadedFile,
        rules: list[spec.Rule],
        loc: tuple[Any, ...],
        root: str | None,
        kind: str,
        datatype: str | None,
    ) -> None:
        for i, rule in enumerate(rules):
            rloc = (*loc, i)
            self._sources(f, rule, rloc, kind, "*" if rule.for_each else datatype)
            if rule.for_each and kind == "hl7v2":
                self._hl7(f, rule.for_each, (*rloc, "for_each"), datatype)
            self._when(f, rule.when, (*rloc, "when"), kind, datatype)
            inner_root: str | None = None
            if root is not None:
                inner_root = self._target(f, rule, rloc, root, kind)
            if rule.rules is not None:
                inner = "*" if (rule.for_each or rule.source) else datatype
                self._rules(f, rule.rules, (*rloc, "rules"), inner_root, kind, inner)

    def _target(
        self, f: LoadedFile, rule: spec.Rule, rloc: tuple[Any, ...], root: str, kind: str
    ) -> str | None:
        """Check one rule's target from ``root``; returns the type nested ``rules:`` build (or None)."""
        tloc = (*rloc, "target")
        resolved, problem, expected = resolve_target(root, rule.target)
        if problem:
            self._err(f, tloc, problem, expected)
            return None
        if resolved is None:
            return None
        element = resolved.element
        if rule.remove:
            return None
        produced = self._produced(rule, kind)
        if element.many and not resolved.indexed:
            if produced != "list":
                self._err(
                    f,
                    tloc,
                    f"{element.name} is a list (0..*) in R4 and this rule writes one value: "
                    f"write {rule.target}[] to append it (or {rule.target}[0])",
                    f"{rule.target}[]",
                )
            return element.type if rule.rules is not None else None
        if produced == "list":
            self._err(
                f,
                tloc,
                f"the value is a list, but {rule.target} holds one {element.type}",
                "one value, or a list target without []",
            )
            return None
        if rule.rules is not None and element.primitive:
            self._err(
                f,
                tloc,
                f"{element.name} is a {element.type}: nested rules build an object it cannot hold",
                "source, value or function for a primitive element",
            )
            return None
        if not compatible(element, produced):
            written = produced if produced[:1].islower() else f"{produced} ({rule.use or 'reference'})"
            self._err(
                f,
                tloc,
                f"{element.name} is a {element.type} in R4, but this rule writes a {written}",
                f"a value of type {element.type}",
            )
            return None
        if element.codes is not None and "value" in rule.model_fields_set and isinstance(rule.value, str):
            directives = MERGE_DIRECTIVES.get((root, element.name), frozenset())
            if rule.value not in element.codes | directives:
                self._err(
                    f,
                    (*rloc, "value"),
                    f"{rule.value!r} is not a code of {element.name} (a required binding)",
                    f"one of {', '.join(sorted(element.codes))}",
                )
        return element.type if rule.rules is not None else None
