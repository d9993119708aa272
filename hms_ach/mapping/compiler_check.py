"""Both paths of a message mapping, checked against each other: the compiled function
(:mod:`hms_ach.mapping.compiler`) must give what the interpreted engine gives, record for record,
warning for warning, and the same error (text, location, table 0357 code) when there is one.

The goldens (``hms-ach test``) run this on every HL7 v2 case, and a case fails with the first place
where the two differ.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hms_ach.core.errors import MessageError
from hms_ach.core.hl7message import Hl7Message
from hms_ach.core.records import MappingResult
from hms_ach.mapping.engine import MappingEngine
from hms_ach.mapping.loader import LoadedFile


def outcome(run: Callable[[], MappingResult]) -> dict[str, Any]:
    """What a mapping run yields, as plain data: its records, actions and warnings, or its error."""
    try:
        result = run()
    except MessageError as exc:
        return {
            "error": {
                "type": type(exc).__name__,
                "message": exc.message,
                "location": exc.location,
                "code": exc.code,
            }
        }
    return {
        "mapping": result.mapping,
        "records": [
            {
                "alias": r.alias,
                "resource_type": r.resource_type,
                "key_system": r.key_system,
                "key_value": r.key_value,
                "content": r.content,
                "mode": r.mode,
                "create": r.create,
            }
            for r in result.records
        ],
        "actions": [(a.name, a.args) for a in result.actions],
        "warnings": [(type(w).__name__, w.message, w.location, w.code) for w in result.warnings],
    }


def first_difference(a: Any, b: Any, where: str = "") -> str | None:
    """The first path (``records[2].content.name[0].family``) where ``a`` and ``b`` differ."""
    if type(a) is not type(b):
        return f"{where or '(top)'}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, dict):
        for k in list(a) + [k for k in b if k not in a]:
            if k not in a or k not in b:
                return f"{where}.{k}".lstrip(".") + (": only interpreted" if k in a else ": only compiled")
            found = first_difference(a[k], b[k], f"{where}.{k}".lstrip("."))
            if found:
                return found
        return None
    if isinstance(a, (list, tuple)):
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            found = first_difference(x, y, f"{where}[{i}]")
            if found:
                return found
        if len(a) != len(b):
            return f"{where}: {len(a)} items interpreted, {len(b)} compiled"
        return None
    return None if a == b else f"{where or '(top)'}: interpreted {a!r}, compiled {b!r}"


def compiled_difference(
    engine: MappingEngine, msg: Hl7Message, mapping: LoadedFile | None = None
) -> str | None:
    """Where the compiled mapping of ``msg`` differs from the interpreted one; None when they agree
    (or when the mapping is not compiled: then only one path exists)."""
    f = mapping or engine.mapping_for(msg)
    compiled = engine.compiled(f)
    if compiled is None:
        return None
    return first_difference(outcome(lambda: engine.map_interpreted(msg, f)), outcome(lambda: compiled(msg)))
