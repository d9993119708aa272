"""Masking of sensitive values in the audit diffs, so that the trail is not a copy of the PHI.

Before a change is diffed, every value that :class:`hms_ach.store.audit_keys.AuditSeal` names is
replaced by a token:

* the ``value`` of any ``{system, value}`` object whose ``system`` is one of
  ``audit.mask_identifier_systems`` (the US SSN by default);
* the value of any field named in ``audit.mask_fields``: a key name (``ssn``: at any depth) or a
  dotted path from the record root (``contact.ssn``; list positions are not part of the path).

With an audit key the token is ``masked:`` and 16 hex digits of an HMAC of the value: the same
value always gives the same token, so an auditor still sees *that* a value changed (and, with the
key, can check a candidate value), never the value. Without a key the token is plain ``masked``.
"""

from __future__ import annotations

import functools
from typing import Any

import orjson

from hms_ach.store.audit_keys import AuditSeal, hmac_sha256

UNKEYED_TOKEN = "masked"


def token(value: Any, seal: AuditSeal) -> str:
    """The token that stands for ``value`` in the trail."""
    if isinstance(value, str) and (value == UNKEYED_TOKEN or value.startswith("masked:")):
        return value  # masked already (when a stored diff is read back)
    if seal.mask_key is None:
        return UNKEYED_TOKEN
    digest = hmac_sha256(seal.mask_key, orjson.dumps(value, option=orjson.OPT_SORT_KEYS))
    return "masked:" + digest.hex()[:16]


@functools.lru_cache(maxsize=16)
def _needles(systems: frozenset[str], fields: frozenset[str]) -> tuple[bytes, ...]:
    """What the JSON of a record must contain for anything in it to be masked."""
    keys = {f.rsplit(".", 1)[-1] for f in fields}
    return tuple(orjson.dumps(s) for s in systems) + tuple(orjson.dumps(k) + b":" for k in keys)


def mask(content: dict[str, Any] | None, seal: AuditSeal) -> dict[str, Any] | None:
    """``content`` with the sensitive values of ``seal`` replaced by tokens (a copy where needed;
    ``content`` itself is never changed)."""
    if content is None or not (seal.mask_systems or seal.mask_fields):
        return content
    raw = orjson.dumps(content)  # a few microseconds: most records have nothing to mask
    if not any(needle in raw for needle in _needles(seal.mask_systems, seal.mask_fields)):
        return content
    masked = _walk(content, "", seal)
    return masked if isinstance(masked, dict) else content


def mask_diff(entries: list[dict[str, Any]], seal: AuditSeal) -> list[dict[str, Any]]:
    """A stored diff (``{op, path, old, new}`` entries) with the sensitive values of ``seal`` masked:
    entries written before masking, or under other rules, are shown masked too."""
    if not (seal.mask_systems or seal.mask_fields):
        return entries
    out = []
    for entry in entries:
        path = str(entry.get("path", ""))
        leaf = path.rsplit(".", 1)[-1]
        whole = leaf in seal.mask_fields or path in seal.mask_fields
        masked = dict(entry)
        for side in ("old", "new"):
            if side in entry and entry[side] is not None:
                masked[side] = token(entry[side], seal) if whole else _walk(entry[side], path, seal)
        out.append(masked)
    return out


def _walk(value: Any, path: str, seal: AuditSeal) -> Any:
    if isinstance(value, list):
        items = [_walk(v, path, seal) if isinstance(v, dict | list) else v for v in value]
        return items if any(a is not b for a, b in zip(items, value, strict=True)) else value
    if not isinstance(value, dict):
        return value
    out: dict[str, Any] | None = None
    secret_identifier = (
        isinstance(value.get("system"), str) and value["system"] in seal.mask_systems and "value" in value
    )
    dotted = any("." in f for f in seal.mask_fields)
    for key, item in value.items():
        sub = (f"{path}.{key}" if path else key) if dotted else key
        if (secret_identifier and key == "value") or key in seal.mask_fields or sub in seal.mask_fields:
            new = token(item, seal) if item is not None else None
        elif isinstance(item, dict | list):
            new = _walk(item, sub, seal)
        else:
            continue
        if new is not item:
            if out is None:
                out = dict(value)
            out[key] = new
    return value if out is None else out
