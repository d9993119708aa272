"""``_summary`` and ``_elements``: a served resource cut down to the elements the client asked for.

The summary elements and the mandatory elements of each type come from the R4B models of
``fhir.resources`` (their ``summary_element_property`` and ``element_required`` flags, and the
required fields), read once per type. The cut is made on the top-level elements of the resource (a summary element keeps all it
holds). A cut-down resource carries the ``SUBSETTED`` tag in ``meta.tag``, so that no client takes
it for the whole record (and PUTs it back).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import orjson

#: The tag of a subsetted resource (FHIR R4 3.1.1.5.8).
SUBSETTED = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "SUBSETTED",
    "display": "subsetted",
}
#: The ``_summary`` values: true, text, data and false cut (false: nothing), count has no entries.
SUMMARY_MODES = ("true", "text", "data", "count", "false")
#: Kept whatever is asked.
ALWAYS = frozenset({"resourceType", "id", "meta"})


@dataclass(frozen=True)
class Subset:
    """What a client asked to see: ``summary`` (one of :data:`SUMMARY_MODES` or None) and
    ``elements`` (the ``_elements`` names, or None)."""

    summary: str | None = None
    elements: tuple[str, ...] | None = None

    @property
    def cuts(self) -> bool:
        return self.summary in ("true", "text", "data") or self.elements is not None


NOTHING = Subset()


def _fields(resource_type: str) -> list[tuple[str, dict[str, Any]]]:
    from fhir.resources.R4B import get_fhir_model_class  # noqa: PLC0415 - heavy, loaded on first use

    try:
        model = get_fhir_model_class(resource_type)
    except KeyError:
        return []
    out = []
    for name, info in model.model_fields.items():
        if name.endswith("__ext"):
            continue
        extra = dict(info.json_schema_extra) if isinstance(info.json_schema_extra, dict) else {}
        if info.is_required():  # a required complex element is a required field, not a flag
            extra["element_required"] = True
        out.append((info.alias or name, extra))
    return out


@lru_cache(maxsize=64)
def summary_elements(resource_type: str) -> frozenset[str]:
    """The top-level elements of ``resource_type`` marked as summary in R4."""
    return frozenset(n for n, extra in _fields(resource_type) if extra.get("summary_element_property"))


@lru_cache(maxsize=64)
def mandatory_elements(resource_type: str) -> frozenset[str]:
    """The top-level elements of ``resource_type`` with a minimum cardinality of 1."""
    return frozenset(n for n, extra in _fields(resource_type) if extra.get("element_required"))


def _wanted(name: str, names: frozenset[str]) -> bool:
    """``name`` (a JSON key) is one of ``names``, or the choice element one names
    (``deceased`` -> ``deceasedBoolean``)."""
    if name in names:
        return True
    return any(name.startswith(n) and name[len(n) : len(n) + 1].isupper() for n in names)


def cut(resource: dict[str, Any], subset: Subset) -> dict[str, Any]:
    """``resource`` cut down as ``subset`` asks, tagged SUBSETTED when anything was left out."""
    rtype = str(resource.get("resourceType", ""))
    keep: frozenset[str] | None = None
    drop: frozenset[str] = frozenset()
    if subset.summary == "true":
        keep = summary_elements(rtype) | mandatory_elements(rtype)
    elif subset.summary == "text":
        keep = frozenset({"text"}) | mandatory_elements(rtype)
    elif subset.summary == "data":
        drop = frozenset({"text"})
    if subset.elements is not None:
        asked = frozenset(subset.elements) | mandatory_elements(rtype)
        keep = asked if keep is None else keep & asked
    out = {
        k: v
        for k, v in resource.items()
        if k in ALWAYS or (k not in drop and (keep is None or _wanted(k, keep)))
    }
    if len(out) == len(resource):
        return resource
    meta = dict(out.get("meta") or {})
    tags = [t for t in meta.get("tag") or [] if t.get("code") != "SUBSETTED"]
    meta["tag"] = [*tags, SUBSETTED]
    out["meta"] = meta
    return out


def cut_text(text: str, subset: Subset) -> str:
    """:func:`cut` on stored JSON text (the text itself when nothing is cut)."""
    if not subset.cuts:
        return text
    resource = orjson.loads(text)
    if not isinstance(resource, dict):
        return text
    trimmed = cut(resource, subset)
    return text if trimmed is resource else orjson.dumps(trimmed).decode()


def parse_elements(value: str) -> tuple[str, ...]:
    """The element names of an ``_elements`` value (``Type.name`` is taken as ``name``)."""
    names = []
    for item in value.split(","):
        name = item.strip().rsplit(".", 1)[-1]
        if name:
            names.append(name)
    return tuple(names)
