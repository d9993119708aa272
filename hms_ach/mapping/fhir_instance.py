"""Is this JSON a valid FHIR R4 resource? Every problem, each naming its element (pure, no I/O).

Two passes:

1. a walk over the JSON with the element table of :mod:`hms_ach.mapping.fhir_structure`: unknown
   elements (with a did-you-mean), cardinality both ways (an array where R4 allows one value, one
   value where R4 wants an array), the JSON type of primitives (``"active": "yes"`` is not a
   boolean, although pydantic would coerce it), required elements (``1..``) and the codes of
   required bindings, at any depth (``Patient.name[0].use``, ``Encounter.location[0].status``);
2. when the walk finds nothing, the R4B model of ``fhir.resources``: formats (dates, ids, uris) and
   the choice-type rules (one ``deceased[x]``).

The FHIR write path (:mod:`hms_ach.fhir.validation`) refuses a resource with a problem, and
``hms-ach reindex --validate`` reports stored versions that have one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hms_ach.mapping.fhir_structure import (
    BOOLEAN_TYPE,
    NUMBER_TYPES,
    Element,
    elements,
    required_elements,
    suggest,
)

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


def problems(resource: Any, limit: int = 20, model_check: bool = True) -> list[Problem]:
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
            for i, item in enumerate(value):
                _value(item, element, f"{where}[{i}]", out, limit, depth)
        elif isinstance(value, list):
            _add(out, limit, where, f"{key} holds one value (0..1) in R4, not an array", "structure")
        else:
            _value(value, element, where, out, limit, depth)
    for name in required_elements(type_name):
        if name not in obj and f"_{name}" not in obj:
            _add(out, limit, f"{path}.{name}", f"{type_name}.{name} is required (1..)", "required")


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
        return
    if not isinstance(value, str):
        _add(out, limit, where, f"{element.name} is a {element.type}: send a JSON string", "value")
        return
    if element.codes is not None and value not in element.codes:
        _add(
            out,
            limit,
            where,
            f"{value[:64]!r} is not a code of {element.name} (required binding: "
            f"{', '.join(sorted(element.codes))})",
            "code-invalid",
        )


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
    except (ValueError, TypeError) as exc:  # a model validator raising outside pydantic's wrapper
        return [Problem(rtype, str(exc)[:200], "structure")]
    return []
