"""HL7 v2.5 segment and datatype definitions (from hl7apy's tables), for checking mapping sources.

``PID-88`` or ``PV1-3.12`` is refused when the mapping loads: v2.5 is the reference, and a field or
component that a later version adds (PV1-53 in v2.7) is accepted too, since messages of every version
we accept are read with the same paths. Z-segments are site-defined: any field of them is accepted.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

#: v2.5 first; the later versions only widen what is accepted.
VERSIONS = ("v2_5", "v2_5_1", "v2_6", "v2_7", "v2_7_1", "v2_8", "v2_8_1", "v2_8_2")
REFERENCE_VERSION = "2.5"


@dataclass(frozen=True)
class Composite:
    """A datatype's components: each component's datatype ("" for a primitive one)."""

    name: str
    components: tuple[str, ...]


@lru_cache(maxsize=16)
def _segments(version: str) -> dict[str, Any]:
    try:
        module = importlib.import_module(f"hl7apy.{version}.segments")
    except ImportError:
        return {}
    table: dict[str, Any] = module.SEGMENTS
    return table


def _node_type(node: Any) -> tuple[str, tuple[Any, ...]]:
    """(datatype, child nodes) of a field or component node of hl7apy's tables."""
    if not isinstance(node, (tuple, list)) or len(node) < 3:
        return "", ()
    kind, children, dtype = node[0], node[1], node[2]
    return str(dtype), tuple(children) if kind == "sequence" and children else ()


@lru_cache(maxsize=16)
def _primitives(version: str) -> frozenset[str]:
    """The datatypes that appear as leaves (ST, IS, DTM...) in ``version``."""
    _datatypes(version)
    return frozenset(_LEAVES.get(version, ()))


_LEAVES: dict[str, set[str]] = {}


@lru_cache(maxsize=16)
def _datatypes(version: str) -> dict[str, Composite]:
    out: dict[str, Composite] = {}
    leaves = _LEAVES.setdefault(version, set())

    def walk(node: Any) -> None:
        dtype, children = _node_type(node)
        if not children:
            leaves.add(dtype)
            return
        if dtype in out:
            return
        out[dtype] = Composite(dtype, tuple(_node_type(c[1])[0] for c in children))
        for child in children:
            walk(child[1])

    for seg in _segments(version).values():
        for field in _fields(seg):
            walk(field[1])
    return out


def _fields(seg: Any) -> tuple[Any, ...]:
    """The field nodes of one segment definition (empty for a malformed entry)."""
    if isinstance(seg, tuple) and len(seg) > 1 and isinstance(seg[1], tuple):
        return tuple(f for f in seg[1] if isinstance(f, tuple) and len(f) > 1)
    return ()


def segment_known(name: str) -> bool:
    return name.startswith("Z") or any(name in _segments(v) for v in VERSIONS)


def segment_names() -> list[str]:
    return sorted(_segments(VERSIONS[0]))


def _field_counts(segment: str) -> int:
    return max((len(_fields(_segments(v)[segment])) for v in VERSIONS if segment in _segments(v)), default=0)


def _field_types(segment: str, field: int) -> set[str]:
    """The datatypes field ``field`` (1-based) of ``segment`` has in the versions that define it."""
    found = set()
    for v in VERSIONS:
        fields = _fields(_segments(v).get(segment))
        if field <= len(fields):
            found.add(_node_type(fields[field - 1][1])[0])
    return found


def _components(dtype: str) -> int | None:
    """How many components ``dtype`` has at most (0: a primitive); None if no version knows it."""
    counts = [len(c.components) for v in VERSIONS if (c := _datatypes(v).get(dtype)) is not None]
    if counts:
        return max(counts)
    return 0 if any(dtype in _primitives(v) for v in VERSIONS) else None


def _component_types(dtype: str, comp: int) -> set[str]:
    out = set()
    for v in VERSIONS:
        c = _datatypes(v).get(dtype)
        if c is not None and comp <= len(c.components):
            out.add(c.components[comp - 1])
    return out


def check_field(segment: str, field: int | None, comp: int | None, sub: int | None) -> str | None:
    """A problem with ``SEG-field.comp.sub`` against the definitions, or None."""
    if not segment_known(segment):
        import difflib

        hint = difflib.get_close_matches(segment, segment_names(), n=1)
        return f"unknown segment {segment!r} in HL7 v{REFERENCE_VERSION}" + (
            f"; did you mean {hint[0]!r}?" if hint else ""
        )
    if segment.startswith("Z") or field is None:
        return None
    count = _field_counts(segment)
    if field < 1 or field > count:
        return (
            f"{segment} has fields {segment}-1 to {segment}-{count} (HL7 v{REFERENCE_VERSION} and later), "
            f"not {segment}-{field}"
        )
    if comp is None:
        return None
    return check_components(f"{segment}-{field}", _field_types(segment, field), comp, sub)


def check_components(where: str, dtypes: set[str], comp: int, sub: int | None) -> str | None:
    """A problem with component ``comp`` (and sub-component ``sub``) of a value of ``dtypes``."""
    counts = [n for d in dtypes if (n := _components(d)) is not None]
    if not counts:
        return None  # a datatype no table knows: nothing to check
    most = max(counts)
    kinds = "/".join(sorted(dtypes))
    if most == 0:
        if comp != 1 or (sub is not None and sub != 1):
            return f"{where} is a primitive {kinds} with no components: read {where} (or {where}.1)"
        return None
    if comp < 1 or comp > most:
        return f"{where} is a {kinds} with components 1 to {most}, not {comp}"
    if sub is None:
        return None
    inner = {t for d in dtypes for t in _component_types(d, comp)}
    subs = [n for t in inner if t and (n := _components(t)) is not None]
    if not subs or max(subs) == 0:
        if sub != 1:
            return f"{where}.{comp} is a primitive with no sub-components: read {where}.{comp}"
        return None
    if sub < 1 or sub > max(subs):
        return f"{where}.{comp} is a {'/'.join(sorted(t for t in inner if t))} with sub-components 1 to {max(subs)}, not {sub}"
    return None


def datatype_known(name: str) -> bool:
    return _components(name) is not None
