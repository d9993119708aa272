"""Is this JSON a valid FHIR R4 resource? Every problem, each naming its element (pure, no I/O).

A problem names the element and what is wrong, never the value found there (it may be a birth date or
a name, and the messages go to OperationOutcomes, the message log and ``reindex --validate``).

Two passes:

1. a walk over the JSON with the element table of :mod:`hms_ach.mapping.fhir_structure`: unknown
   elements (with a did-you-mean), cardinality both ways (an array where R4 allows one value, one
   value where R4 wants an array), the JSON type of primitives (``"active": "yes"`` is not a
   boolean, although pydantic would coerce it), required elements (``1..``) and the codes of
   required bindings, at any depth (``Patient.name[0].use``, ``Encounter.location[0].status``);
   the lexical form of each primitive (the R4 regexes: dates, ids, codes, uris; a full date must
   exist in the calendar) and the choice types (at most one ``deceased[x]``, exactly one of a
   required ``[x]``);
2. optionally (``model_check=True``), when the walk finds nothing, the R4B model of
   ``fhir.resources`` as a second opinion. The write path does not run it: on the R4 examples and
   thousands of invalid variants of them it found nothing the walk missed, at several times the
   walk's cost (docs/fhir-validation.md, ``benchmarks/fhir_validation.py``).

The FHIR write path (:mod:`hms_ach.fhir.validation`) refuses a resource with a problem, and
``hms-ach reindex --validate`` reports stored versions that have one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date
from typing import Any

from hms_ach.mapping.fhir_structure import (
    BOOLEAN_TYPE,
    NUMBER_TYPES,
    Element,
    choice_groups,
    elements,
    required_elements,
    suggest,
)

_YEAR = r"([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)"
_MONTH = r"(0[1-9]|1[0-2])"
_DAY = r"(0[1-9]|[1-2][0-9]|3[0-1])"
_TIME = r"([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?"
_ZONE = r"(Z|(\+|-)((0[0-9]|1[0-3]):[0-5][0-9]|14:00))"
#: The lexical forms of the R4 string-valued primitive types (the specification's regexes).
FORMATS: dict[str, re.Pattern[str]] = {
    name: re.compile(pattern)
    for name, pattern in {
        "date": rf"{_YEAR}(-{_MONTH}(-{_DAY})?)?",
        "dateTime": rf"{_YEAR}(-{_MONTH}(-{_DAY}(T{_TIME}{_ZONE})?)?)?",
        "instant": rf"{_YEAR}-{_MONTH}-{_DAY}T{_TIME}{_ZONE}",
        "time": _TIME,
        "code": r"[^\s]+(\s[^\s]+)*",
        "id": r"[A-Za-z0-9\-.]{1,64}",
        "uri": r"\S*",
        "url": r"\S*",
        "canonical": r"\S*",
        "oid": r"urn:oid:[0-2](\.(0|[1-9][0-9]*))+",
        "uuidVersion": r"urn:uuid:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
        "encodedBytes": r"(\s*([0-9a-zA-Z+/=]){4}\s*)+",
        "string": r"[ \r\n\t\S]+",
        "markdown": r"[ \r\n\t\S]+",
    }.items()
}
_FULL_DATE = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})")

#: Walk no deeper than this (a resource nests a few levels; a hostile body may nest thousands).
MAX_DEPTH = 32


@dataclass(frozen=True)
class Problem:
    """One reason a resource is not valid R4."""

    expression: str
    """The element, in FHIRPath-like notation: ``Patient.name[0].use``."""
    message: str
    code: str
    """OperationOutcome issue type: ``structure``, ``required``, ``value`` or ``code-invalid``."""


def problems(resource: Any, limit: int = 20, model_check: bool = False) -> list[Problem]:
    """The problems of ``resource`` (at most ``limit``); empty when it is valid R4."""
    out: list[Problem] = []
    if not isinstance(resource, dict):
        return [Problem("", "a resource is a JSON object", "structure")]
    rtype = resource.get("resourceType")
    if not isinstance(rtype, str) or elements(rtype) is None:
        return [Problem("resourceType", f"{str(rtype)[:64]!r} is not an R4 resource type", "structure")]
    _walk(resource, rtype, rtype, out, limit, 0, resource=True)
    if not out and model_check:
        out.extend(_model_problems(resource, rtype, limit))
    return out[:limit]


def _add(out: list[Problem], limit: int, expression: str, message: str, code: str) -> bool:
    """Record a problem; False once ``limit`` is reached (the walk stops)."""
    if len(out) < limit:
        out.append(Problem(expression, message, code))
    return len(out) < limit


def _walk(
    obj: dict[str, Any],
    type_name: str,
    path: str,
    out: list[Problem],
    limit: int,
    depth: int,
    resource: bool = False,
) -> None:
    elems = elements(type_name)
    if elems is None:
        return
    if depth > MAX_DEPTH:
        _add(out, limit, path, f"nested deeper than {MAX_DEPTH} levels", "structure")
        return
    for key, value in obj.items():
        if len(out) >= limit:
            return
        if key == "resourceType" and resource:
            continue
        where = f"{path}.{key}"
        if key.startswith("_"):  # the id/extensions of a primitive element
            base = elems.get(key[1:])
            if base is None or not base.primitive:
                _add(out, limit, where, f"{type_name} has no primitive element {key[1:]!r}", "structure")
            else:
                _primitive_extras(value, base.many, where, out, limit, depth)
            continue
        element = elems.get(key)
        if element is None:
            _add(out, limit, where, f"{type_name} has no element {key!r}{suggest(key, elems)}", "structure")
            continue
        if value is None:
            _add(out, limit, where, "null is not a FHIR value: leave the element out", "structure")
            continue
        if element.many:
            if not isinstance(value, list):
                _add(out, limit, where, f"{key} is a list (0..*) in R4: send an array", "structure")
                continue
            padded = f"_{key}" in obj  # a null item stands for one that has only an extension
            for i, item in enumerate(value):
                if item is None and padded:
                    continue
                _value(item, element, f"{where}[{i}]", out, limit, depth)
        elif isinstance(value, list):
            _add(out, limit, where, f"{key} holds one value (0..1) in R4, not an array", "structure")
        else:
            _value(value, element, where, out, limit, depth)
    for group, names, required in choice_groups(type_name):
        given = [n for n in names if n in obj or f"_{n}" in obj]
        if len(given) > 1:
            _add(
                out,
                limit,
                f"{path}.{given[1]}",
                f"{group}[x] takes one value: {', '.join(given)} given",
                "structure",
            )
        elif required and not given:
            _add(out, limit, f"{path}.{group}[x]", f"{type_name}.{group}[x] is required (1..1)", "required")
    for name in required_elements(type_name):
        if name not in obj and f"_{name}" not in obj:
            _add(out, limit, f"{path}.{name}", f"{type_name}.{name} is required (1..)", "required")


def _primitive_extras(value: Any, many: bool, where: str, out: list[Problem], limit: int, depth: int) -> None:
    """``_given``: an Element (id, extension) per value, null for a value that has none."""
    items = value if many and isinstance(value, list) else [value]
    if many != isinstance(value, list):
        _add(out, limit, where, "must match its element: an array for a list, else one object", "structure")
        return
    for i, item in enumerate(items):
        at = f"{where}[{i}]" if many else where
        if item is None and many:
            continue
        if not isinstance(item, dict):
            _add(out, limit, at, "the id and extensions of a primitive value are a JSON object", "structure")
        else:
            _walk(item, "Element", at, out, limit, depth + 1)


def _value(value: Any, element: Element, where: str, out: list[Problem], limit: int, depth: int) -> None:
    if element.type == "Resource":  # contained
        if not isinstance(value, dict) or not isinstance(value.get("resourceType"), str):
            _add(out, limit, where, "a contained resource is an object with a resourceType", "structure")
        elif elements(value["resourceType"]) is None:
            _add(out, limit, where, f"{value['resourceType'][:64]!r} is not an R4 resource type", "structure")
        else:
            _walk(value, value["resourceType"], where, out, limit, depth + 1, resource=True)
        return
    if not element.primitive:
        if not isinstance(value, dict):
            _add(out, limit, where, f"{element.name} is a {element.type}: send a JSON object", "structure")
        else:
            _walk(value, element.type, where, out, limit, depth + 1)
        return
    if element.type == BOOLEAN_TYPE:
        if not isinstance(value, bool):
            _add(out, limit, where, f"{element.name} is a boolean: send true or false", "value")
        return
    if element.type in NUMBER_TYPES:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _add(out, limit, where, f"{element.name} is a {element.type}: send a JSON number", "value")
        elif element.type != "decimal" and (
            isinstance(value, float) or value < _MINIMUM.get(element.type, value)
        ):
            _add(out, limit, where, f"{element.name} is a {element.type}: this number is not one", "value")
        return
    if not isinstance(value, str):
        _add(out, limit, where, f"{element.name} is a {element.type}: send a JSON string", "value")
        return
    form = FORMATS.get(element.type)
    if form is not None and not form.fullmatch(value):
        _add(out, limit, where, f"{element.name}: not a valid {element.type}", "value")
        return
    if element.type in ("date", "dateTime", "instant") and not _real_date(value):
        _add(out, limit, where, f"{element.name}: not a date of the calendar", "value")
        return
    if element.codes is not None and value not in element.codes:
        _add(
            out,
            limit,
            where,
            f"{element.name}: not one of the codes of its required binding ("
            f"{', '.join(sorted(element.codes))})",
            "code-invalid",
        )


_MINIMUM = {"positiveInt": 1, "unsignedInt": 0}


def _real_date(value: str) -> bool:
    """Whether the YYYY-MM-DD that ``value`` starts with, if any, exists (no 1980-02-31)."""
    m = _FULL_DATE.match(value)
    if m is None:
        return True
    try:
        date(int(m.group(1)), int(m.group(2)), int(m.group(3)))
    except ValueError:
        return False
    return True


def _model_problems(resource: dict[str, Any], rtype: str, limit: int) -> list[Problem]:
    import pydantic
    from fhir.resources.R4B import get_fhir_model_class

    try:
        get_fhir_model_class(rtype).model_validate(resource)
    except pydantic.ValidationError as exc:
        found = []
        for err in exc.errors()[:limit]:
            where = rtype
            for part in err.get("loc", ()):
                if isinstance(part, int):
                    where += f"[{part}]"
                elif part not in ("root", "__root__") and not str(part).startswith("function-"):
                    where += f".{part}"
            code = "required" if err.get("type") == "missing" else "value"
            found.append(Problem(where, str(err.get("msg", "invalid")), code))
        return found
    except (ValueError, TypeError, AttributeError) as exc:  # a validator raising outside pydantic
        return [Problem(rtype, str(exc)[:200], "structure")]
    return []
