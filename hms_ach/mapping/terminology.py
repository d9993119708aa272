"""Code-table look-ups (``mappings/tables/*.yaml``): an HL7 code in, a FHIR code or object out."""

from __future__ import annotations

from typing import Any

from hms_ach.core.errors import Err0357, MappingError
from hms_ach.mapping.spec import CodeTable


def lookup(table: CodeTable, name: str, code: str, location: str) -> Any:
    """Translate ``code`` with ``table``; unmapped codes follow the table's ``unmapped`` policy."""
    key = code.strip()
    if table.case_sensitive:
        found = table.map.get(key)
    else:
        found = _folded(table).get(key.upper())
    if found is not None:
        return found
    if table.unmapped == "keep":
        return key
    if table.unmapped == "default":
        if isinstance(table.default, str) and "{code}" in table.default:
            return table.default.replace("{code}", key) if key else None
        return table.default
    known = ", ".join(list(table.map)[:12])
    raise MappingError(
        f"code {key!r} is not in table {name} ({table.source_system or 'codes'}: {known})",
        location,
        Err0357.TABLE_VALUE_NOT_FOUND,
    )


# id(table) -> (table, upper-cased map); holding the table keeps its id from being reused.
_FOLDED: dict[int, tuple[CodeTable, dict[str, Any]]] = {}


def _folded(table: CodeTable) -> dict[str, Any]:
    entry = _FOLDED.get(id(table))
    if entry is None or entry[0] is not table:
        entry = (table, {str(k).upper(): v for k, v in table.map.items()})
        _FOLDED[id(table)] = entry
    return entry[1]
