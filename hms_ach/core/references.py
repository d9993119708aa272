"""Walking the ``reference`` elements of FHIR JSON.

A FHIR resource names other resources in ``Reference`` elements: objects with a ``reference`` string
(``Patient/123``, ``urn:uuid:...``, an absolute URL) found at any depth. Two helpers over plain JSON
(dicts, lists, scalars), shared by the FHIR REST write path (``fhir/write.py``: checks targets,
orders Bundle entries, resolves ``urn:uuid`` fullUrls) and the ``fhir_push`` sink (``outbound/fhir_push.py``:
follows and rewrites references to the remote's ids or to transaction fullUrls):

* :func:`references` lists every reference text with the element path it stands at;
* :func:`rewrite_references` copies a value with the references found in a mapping replaced.

Neither interprets the text: what counts as local, ``urn:uuid`` or unresolvable is the caller's business.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def references(value: Any, path: str = "") -> list[tuple[str, str]]:
    """Every ``(element path, reference text)`` in ``value``, in document order.

    The path is FHIRPath-like and relative to ``value`` (``subject``, ``participant[0].individual``),
    prefixed with ``path`` when given; a ``reference`` key whose value is not a string is skipped.
    """
    out: list[tuple[str, str]] = []
    if isinstance(value, dict):
        ref = value.get("reference")
        if isinstance(ref, str):
            out.append((path, ref))
        for k, v in value.items():
            out.extend(references(v, f"{path}.{k}" if path else k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out.extend(references(v, f"{path}[{i}]"))
    return out


def rewrite_references(value: Any, mapping: Mapping[str, str]) -> Any:
    """A copy of ``value`` in which every reference text that is a key of ``mapping`` is replaced by its value.

    Other references and every other element are copied unchanged; ``value`` itself is not modified.
    """
    if isinstance(value, dict):
        out = {k: rewrite_references(v, mapping) for k, v in value.items()}
        ref = out.get("reference")
        if isinstance(ref, str) and ref in mapping:
            out["reference"] = mapping[ref]
        return out
    if isinstance(value, list):
        return [rewrite_references(v, mapping) for v in value]
    return value
