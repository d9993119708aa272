"""The FHIR R4 element structure (names, types, cardinality, required codes), read once per type.

The facts come from the field metadata of the ``fhir.resources`` R4B models (R4B keeps the R4 element
structure of the resources we serve); nothing is validated here per message. The mapping checker
(:mod:`hms_ach.mapping.structure_check`) walks each mapping ``target`` through :func:`elements`,
and the FHIR write validator reads the same table for required elements and bindings.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

#: Primitive types that take a JSON number or boolean rather than a string.
NUMBER_TYPES = frozenset({"integer", "decimal", "positiveInt", "unsignedInt", "integer64"})
BOOLEAN_TYPE = "boolean"

#: Required bindings whose code list the R4B models cut short (they end it with "+"): the R4 lists.
_ENCOUNTER_STATUS = frozenset(
    {
        "planned",
        "arrived",
        "triaged",
        "in-progress",
        "onleave",
        "finished",
        "cancelled",
        "entered-in-error",
        "unknown",
    }
)
COMPLETED_CODES: dict[tuple[str, str], frozenset[str]] = {
    ("Encounter", "status"): _ENCOUNTER_STATUS,
    ("EncounterStatusHistory", "status"): _ENCOUNTER_STATUS,
    ("Task", "status"): frozenset(
        {
            "draft",
            "requested",
            "received",
            "accepted",
            "rejected",
            "ready",
            "cancelled",
            "in-progress",
            "on-hold",
            "failed",
            "completed",
            "entered-in-error",
        }
    ),
}

_STEP = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?:\[(\d*)\])?")


@dataclass(frozen=True)
class Element:
    """One element of a FHIR type, as a mapping or a client writes it in JSON."""

    name: str
    type: str
    """FHIR type name: ``code``, ``dateTime``, ``HumanName``, ``Reference``, or a backbone element
    such as ``EncounterLocation`` (its elements are read with :func:`elements` too)."""
    many: bool
    """Cardinality ``..*``: a JSON array. Otherwise a single value, never an array."""
    required: bool
    """Cardinality ``1..``."""
    codes: frozenset[str] | None
    """The allowed codes when the element has a required binding that the model lists in full."""
    choice: str | None = None
    """The choice group of a ``[x]`` element (``deceased`` for deceasedBoolean), else None."""
    choice_required: bool = False
    """The choice group is ``1..1``: one of its elements must be there."""
    primitive: bool = False
    """A primitive type (``code``, ``string``...): set from ``type`` when the element is made."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "primitive", self.type[:1].islower())


@dataclass(frozen=True)
class Step:
    """One step of a target path: ``name``, ``name[]`` (append) or ``name[2]``."""

    name: str
    index: str | None  # None: no brackets, "" : [] (append), "2": [2]


def parse_target(text: str) -> list[Step] | None:
    """``location[0].location`` -> steps; None when the text is not an element path."""
    steps = []
    for part in text.split("."):
        m = _STEP.fullmatch(part)
        if not m:
            return None
        steps.append(Step(m.group(1), m.group(2)))
    return steps


def _type_of(annotation: Any) -> tuple[str, bool] | None:
    """(FHIR type name, many) of a model field annotation."""
    many = False
    ann = annotation
    for _ in range(6):
        origin = typing.get_origin(ann)
        if origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(ann) if a is not type(None)]
            if len(args) != 1:
                return None
            ann = args[0]
        elif origin in (list, typing.List):  # noqa: UP006 - the models use typing.List
            many = True
            ann = typing.get_args(ann)[0]
        elif origin is typing.Annotated:
            meta = typing.get_args(ann)[1:]
            if not meta:
                return None
            name = type(meta[0]).__name__
            return name[:1].lower() + name[1:], many
        else:
            break
    if ann is bool:
        return BOOLEAN_TYPE, many
    name = getattr(ann, "__name__", "")
    if name.endswith("Type") and len(name) > 4:
        return name[:-4], many
    return None


@lru_cache(maxsize=512)
def elements(type_name: str) -> dict[str, Element] | None:
    """The elements of an R4 resource, datatype or backbone element; None if R4 has no such type."""
    if not type_name or not type_name[:1].isupper():
        return None
    try:
        from fhir.resources.R4B import get_fhir_model_class

        model = get_fhir_model_class(type_name)
    except (KeyError, ValueError, ImportError, AttributeError):
        return None
    out: dict[str, Element] = {}
    for field_name, info in model.model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        if not extra.get("element_property"):
            continue
        found = _type_of(info.annotation)
        if found is None:
            continue
        ftype, many = found
        name = info.alias or field_name
        enum = extra.get("enum_values")
        codes = COMPLETED_CODES.get((type_name, name)) or (
            frozenset(str(c) for c in enum) if isinstance(enum, list) and enum and "+" not in enum else None
        )
        required = bool(extra.get("element_required")) or info.is_required()
        group = extra.get("one_of_many")
        out[name] = Element(
            name,
            ftype,
            many,
            required,
            codes,
            str(group) if group else None,
            bool(extra.get("one_of_many_required")),
        )
    return out


@lru_cache(maxsize=512)
def required_elements(type_name: str) -> tuple[str, ...]:
    """The names of the ``1..`` elements of ``type_name`` (empty for an unknown type)."""
    return tuple(name for name, e in (elements(type_name) or {}).items() if e.required)


@lru_cache(maxsize=512)
def choice_groups(type_name: str) -> tuple[tuple[str, tuple[str, ...], bool], ...]:
    """The ``[x]`` groups of ``type_name``: (group, its element names, required)."""
    groups: dict[str, list[Element]] = {}
    for e in (elements(type_name) or {}).values():
        if e.choice:
            groups.setdefault(e.choice, []).append(e)
    return tuple(
        (g, tuple(e.name for e in members), any(e.choice_required for e in members))
        for g, members in groups.items()
    )


def is_type(type_name: str) -> bool:
    """Whether ``type_name`` is an R4 complex type or resource (HumanName, Patient...)."""
    return elements(type_name) is not None


def suggest(name: str, choices: typing.Iterable[str]) -> str:
    """`` did you mean 'gender'?`` or empty."""
    hint = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {hint[0]!r}?" if hint else ""


@dataclass(frozen=True)
class Resolved:
    """Where a target path leads: the element at its end and whether the last step indexes it."""

    element: Element
    indexed: bool  # the last step has [] or [n]: one item of a list is written


def resolve_target(root: str, text: str) -> tuple[Resolved | None, str | None, str | None]:
    """Walk ``text`` from type ``root``: (resolved, problem, expected). A problem names the step."""
    steps = parse_target(text)
    if steps is None:
        return None, f"target {text!r} is not an element path", "element names such as name[].family"
    current = root
    element: Element | None = None
    for i, step in enumerate(steps):
        elems = elements(current)
        if elems is None:
            return None, None, None  # not an R4 type: nothing to check
        here = ".".join(s.name for s in steps[:i]) or root
        element = elems.get(step.name)
        if element is None:
            return (
                None,
                f"{current} has no element {step.name!r} (in target {text!r}){suggest(step.name, elems)}",
                f"an element of {here}",
            )
        last = i == len(steps) - 1
        if step.index is not None and not element.many:
            fixed = ".".join(s.name + ("" if s is step else _br(s)) for s in steps)
            return (
                None,
                f"{current}.{step.name} holds one value (0..1), never a list: {text!r} writes an array; "
                f"write {fixed!r}",
                f"{step.name} without []",
            )
        if element.many and step.index is None and not last:
            return (
                None,
                f"{current}.{step.name} is a list (0..*): say which item, e.g. "
                f"{step.name}[0] or {step.name}[] (in target {text!r})",
                f"{step.name}[] or {step.name}[n]",
            )
        if not last and element.primitive:
            return (
                None,
                f"{current}.{step.name} is a {element.type} and has no element {steps[i + 1].name!r}",
                f"the target to end at {step.name}",
            )
        current = element.type
    assert element is not None  # a parsed target has at least one step
    return Resolved(element, steps[-1].index is not None), None, None


def _br(step: Step) -> str:
    return "" if step.index is None else f"[{step.index}]"


#: What a mapping rule writes, as far as it can be known when the mapping loads.
Produced = str  # "string", "boolean", "number", "object", "list", a FHIR type name, or "" (unknown)


def compatible(element: Element, produced: Produced) -> bool:
    """Whether a value of kind ``produced`` may be written as one ``element`` value."""
    if not produced:
        return True
    if produced == "string":
        return element.primitive and element.type not in NUMBER_TYPES and element.type != BOOLEAN_TYPE
    if produced == "boolean":
        return element.type == BOOLEAN_TYPE
    if produced == "number":
        return element.type in NUMBER_TYPES
    if produced == "object":
        return not element.primitive
    if produced == "list":
        return False
    return element.type == produced or not is_type(produced)
