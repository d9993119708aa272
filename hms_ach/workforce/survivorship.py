"""One staff record from many sources: who wins each element of a Practitioner, and who is who.

The MFN^M02 feed, FHIR onboarding and the HR roster CSV each write the same nurse. Instead of the
last one replacing the whole record, :func:`merge` settles every element by the source that wrote
it (the inbound channel) and the ``workforce.survivorship`` rules of channels.yaml
(docs/survivorship.md):

* **Who wins.** ``elements`` names, per element, its sources in priority order. A source ranks by
  its place in the list; a source not listed ranks below every listed one. The higher-ranked
  source's value stays; a source always updates what it set itself. An element without a rule
  takes the last write (the engine's merge before survivorship).
* **Repeating elements merge by key.** Identifiers by system, telecom by system and use,
  qualifications by their identifier (else type and issuer), addresses by use, extensions by url,
  communication by language; each keyed entry is settled on its own. The winner's fields come
  first; fields only the other source has fill the gaps. A qualification's verification
  extensions (status, source) are an element of their own, ``qualification.verification``.
* **Each element remembers its source**, in an extension of the record
  (:data:`SOURCE_EXT`: element path, source), so the record, its history and the audit trail show
  which channel set it. A source writing in ``replace`` mode (FHIR) withdraws what it set before
  and no longer sends; it never removes what another source set.
* **A conflict the rules cannot settle** (two sources that neither rule ranks send different
  values) keeps the stored value and is stored in the record (:data:`CONFLICT_EXT`: element, kept
  and refused source, refused value); :func:`on_change` then emits ``practitioner.conflict``.
  Nothing is lost silently.
* **Who is who.** :func:`match_identifiers` is the match policy: when a write's business key
  finds no Practitioner, its identifiers of the ``match_systems`` (NPI, staff number...) are tried
  in that order, and the first that names exactly one Practitioner decides.

:func:`install` hands both to the store (:data:`hms_ach.core.records.RECORD_MERGERS` and
``RECORD_MATCHERS``); the composition root calls it (:func:`hms_ach.app.wiring.wire_listeners`).
"""

from __future__ import annotations

import logging
from typing import Any

import orjson

from hms_ach.core.records import (
    MERGE_SETTINGS,
    RECORD_MATCHERS,
    RECORD_MERGERS,
    MergeInput,
    merge_by_mode,
    merge_content,
)
from hms_ach.outbound.events import payload_from
from hms_ach.store.changes import Change
from hms_ach.store.outbox import enqueue
from hms_ach.store.port import Tx
from hms_ach.workforce.settings import SurvivorshipSettings, current

log = logging.getLogger("hms_ach.workforce.survivorship")

#: A record-level extension per element: which source (inbound channel) set it.
SOURCE_EXT = "urn:hms-ach:fhir:StructureDefinition/element-source"
#: A record-level extension per unsettled conflict: the value the rules could not rank, kept here.
CONFLICT_EXT = "urn:hms-ach:fhir:StructureDefinition/source-conflict"
#: The extensions of a qualification that make its own element ``qualification.verification``.
VERIFICATION_URLS = frozenset(
    {
        "urn:hms-ach:fhir:StructureDefinition/verification-status",
        "urn:hms-ach:fhir:StructureDefinition/verification-source",
    }
)
_OWN = frozenset({SOURCE_EXT, CONFLICT_EXT})
#: The event of a stored conflict.
CONFLICT_EVENT = "practitioner.conflict"


# ---------------------------------------------------------------------------- keys of repeating elements
def _coding_code(value: Any) -> str:
    codings = value.get("coding") if isinstance(value, dict) else None
    if isinstance(codings, list) and codings and isinstance(codings[0], dict):
        return str(codings[0].get("code") or "")
    return ""


def _qualification_key(item: dict[str, Any]) -> str:
    ids = item.get("identifier")
    if isinstance(ids, list) and ids and isinstance(ids[0], dict) and ids[0].get("value"):
        return str(ids[0]["value"])
    issuer = item.get("issuer") or {}
    return f"{_coding_code(item.get('code'))}|{issuer.get('reference') or issuer.get('display') or ''}"


def _item_key(element: str, item: Any) -> str:
    """The key an entry of a repeating element merges by (see the module docstring)."""
    if not isinstance(item, dict):
        return orjson.dumps(item, option=orjson.OPT_SORT_KEYS).decode()
    if element == "identifier":
        return str(item.get("system") or f"|{item.get('value', '')}")
    if element == "telecom":
        return f"{item.get('system', '')}|{item.get('use', '')}"
    if element == "qualification":
        return _qualification_key(item)
    if element == "address":
        return str(item.get("use", ""))
    if element == "extension":
        return str(item.get("url", ""))
    if element == "communication":
        return _coding_code(item) or orjson.dumps(item, option=orjson.OPT_SORT_KEYS).decode()
    return orjson.dumps(item, option=orjson.OPT_SORT_KEYS).decode()


def _by_key(element: str, items: list[Any]) -> dict[str, Any]:
    """The entries of a repeating element by key; a key that one list holds twice (two staff
    numbers in one system, from one source) is told apart by the entry's value."""
    out: dict[str, Any] = {}
    for item in items:
        key = _item_key(element, item)
        if key in out:
            value = item.get("value") if isinstance(item, dict) else None
            key = (
                f"{key}|{value}"
                if value
                else f"{key}|{orjson.dumps(item, option=orjson.OPT_SORT_KEYS).decode()}"
            )
        out[key] = item
    return out


#: Practitioner elements whose entries merge by key; the others are settled whole.
KEYED = frozenset({"identifier", "telecom", "qualification", "address", "extension", "communication"})


# ---------------------------------------------------------------------------- provenance in the record
def _sub(ext: dict[str, Any], url: str) -> str:
    for part in ext.get("extension") or []:
        if part.get("url") == url:
            return str(part.get("valueString", ""))
    return ""


def _strings(url: str, **parts: str) -> dict[str, Any]:
    return {"url": url, "extension": [{"url": k, "valueString": v} for k, v in parts.items()]}


def sources_of(content: dict[str, Any]) -> dict[str, str]:
    """Element path -> the source that set it, as stored in ``content``."""
    return {
        _sub(e, "element"): _sub(e, "source")
        for e in content.get("extension") or []
        if isinstance(e, dict) and e.get("url") == SOURCE_EXT
    }


def conflicts_of(content: dict[str, Any]) -> list[dict[str, str]]:
    """The unsettled conflicts stored in ``content``: element, kept, refused, value."""
    return [
        {k: _sub(e, k) for k in ("element", "kept", "refused", "value")}
        for e in content.get("extension") or []
        if isinstance(e, dict) and e.get("url") == CONFLICT_EXT
    ]


# ---------------------------------------------------------------------------- the merge
class _Merge:
    """One write settled element by element (the state of :func:`merge`)."""

    def __init__(self, rules: SurvivorshipSettings, inp: MergeInput):
        self.rules = rules
        self.source = inp.source
        self.replace = inp.mode == "replace"
        self.sources = sources_of(inp.old)
        self.conflicts = {(c["element"], c["refused"]): c for c in conflicts_of(inp.old)}

    def rule(self, path: str, element: str, item: Any = None) -> list[str]:
        rules = self.rules.elements
        if element == "identifier" and isinstance(item, dict) and f"identifier:{item.get('system')}" in rules:
            return rules[f"identifier:{item.get('system')}"]
        if element == "qualification" and isinstance(item, dict):
            if path.endswith(".verification") and "qualification.verification" in rules:
                return rules["qualification.verification"]
            code = _coding_code(item.get("code"))
            if f"qualification:{code}" in rules:
                return rules[f"qualification:{code}"]
        return rules.get(element, [])

    def wins(self, path: str, rule: list[str], stored: Any, incoming: Any) -> bool:
        """Whether this write's value of ``path`` replaces the stored one (a conflict is recorded
        when the rules cannot rank the two sources and the values differ)."""
        holder = self.sources.get(path, "")
        if not holder or holder == self.source or not rule:
            return True
        mine = rule.index(self.source) if self.source in rule else len(rule)
        theirs = rule.index(holder) if holder in rule else len(rule)
        if mine != theirs:
            return mine < theirs
        if stored == incoming:
            return False
        self.conflicts[(path, self.source)] = {
            "element": path,
            "kept": holder,
            "refused": self.source,
            "value": orjson.dumps(incoming, option=orjson.OPT_SORT_KEYS).decode(),
        }
        # the element's name only: a path can hold an identifier or a licence number
        element = path.split("[", 1)[0]
        log.warning(
            "practitioner.conflict", extra={"element": element, "kept": holder, "refused": self.source}
        )
        return False

    def whole(self, out: dict[str, Any], old: dict[str, Any], new: dict[str, Any], element: str) -> None:
        if element in new:
            if self.wins(element, self.rule(element, element), old.get(element), new[element]):
                if new[element] is None:
                    out.pop(element, None)
                    self.sources.pop(element, None)
                else:
                    out[element] = new[element]
                    self.sources[element] = self.source
        elif self.replace and element in old and self.sources.get(element) == self.source:
            out.pop(element, None)  # withdrawn by the source that set it
            self.sources.pop(element, None)

    def keyed(self, out: dict[str, Any], old: dict[str, Any], new: dict[str, Any], element: str) -> None:
        stored_list = [
            i
            for i in (old.get(element) or [])
            if not (element == "extension" and isinstance(i, dict) and i.get("url") in _OWN)
        ]
        stored = _by_key(element, stored_list)
        incoming = _by_key(element, new.get(element) or [])
        merged: dict[str, Any] = {}
        for key, item in {**stored, **incoming}.items():
            path = f"{element}[{key}]"
            if key not in incoming:
                if self.replace and self.sources.get(path) == self.source:
                    self._forget(path)  # withdrawn by the source that set it
                else:
                    merged[key] = item
                continue
            before = stored.get(key)
            take = self.wins(path, self.rule(path, element, item), before, item)
            if before is None:
                result = item
            elif take:
                result = _fill(before, item)
            else:
                result = _fill(item, before)
            if take:
                self.sources[path] = self.source
            if element == "qualification" and isinstance(result, dict):
                result = self._verification(path, before, item, result)
            merged[key] = result
        if merged:
            out[element] = list(merged.values())
        else:
            out.pop(element, None)

    def _forget(self, path: str) -> None:
        for p in [p for p in self.sources if p == path or p.startswith(f"{path}.")]:
            del self.sources[p]

    def _verification(
        self, path: str, before: Any, item: dict[str, Any], result: dict[str, Any]
    ) -> dict[str, Any]:
        """A qualification's verification extensions, settled as their own element."""
        vpath = f"{path}.verification"

        def of(q: Any) -> list[dict[str, Any]]:
            exts = q.get("extension") if isinstance(q, dict) else None
            return [e for e in exts or [] if isinstance(e, dict) and e.get("url") in VERIFICATION_URLS]

        mine, theirs = of(item), of(before)
        if mine and (not theirs or self.wins(vpath, self.rule(vpath, "qualification", item), theirs, mine)):
            chosen = mine
            self.sources[vpath] = self.source
        else:
            chosen = theirs
        rest = [e for e in result.get("extension") or [] if e.get("url") not in VERIFICATION_URLS]
        exts = rest + chosen
        out = {k: v for k, v in result.items() if k != "extension"}
        if exts:
            out["extension"] = exts
        return out

    def own_extensions(self) -> list[dict[str, Any]]:
        """The provenance and conflict extensions of the merged record, sorted so that a write that
        changes nothing stores the same content."""
        out = [_strings(SOURCE_EXT, element=p, source=s) for p, s in sorted(self.sources.items()) if s]
        out += [_strings(CONFLICT_EXT, **c) for _k, c in sorted(self.conflicts.items(), key=lambda kv: kv[0])]
        return out


def _fill(base: Any, winner: Any) -> Any:
    """``winner``'s fields over ``base``'s: the fields only ``base`` has fill the gaps."""
    if isinstance(base, dict) and isinstance(winner, dict):
        return merge_content(base, winner)
    return winner


def merge(inp: MergeInput) -> dict[str, Any]:
    """The Practitioner to store when ``inp.source`` writes ``inp.new`` over ``inp.old`` (see the
    module docstring). With survivorship switched off: the write's ``mode`` as for any type."""
    rules = current().survivorship
    if not rules.enabled:
        return merge_by_mode(inp.mode, inp.old, inp.new)
    new = dict(inp.new)
    if isinstance(new.get("extension"), list):
        new["extension"] = [e for e in new["extension"] if not (isinstance(e, dict) and e.get("url") in _OWN)]
    state = _Merge(rules, inp)
    out = {k: v for k, v in inp.old.items() if k != "extension"}
    for element in dict.fromkeys([*inp.old, *new]):
        if element == "resourceType":
            continue
        if element in KEYED:
            state.keyed(out, inp.old, new, element)
        else:
            state.whole(out, inp.old, new, element)
    own = state.own_extensions()
    if own:
        out["extension"] = [*(out.get("extension") or []), *own]
    if "resourceType" in inp.new or "resourceType" in inp.old:
        out["resourceType"] = inp.resource_type
    return out


def explain(content: dict[str, Any], source: str, rules: SurvivorshipSettings) -> list[str]:
    """For ``hms-ach mapping preview --source``: each element path of ``content`` (a Practitioner
    a mapping produced), the sources its rule ranks, and where ``source`` stands among them."""
    state = _Merge(rules, MergeInput("Practitioner", {}, content, source, "merge"))
    lines: list[str] = []
    for element, value in content.items():
        if element in ("resourceType", "id", "meta"):
            continue
        items = _by_key(element, value) if element in KEYED and isinstance(value, list) else {"": value}
        for key, item in items.items():
            paths = [f"{element}[{key}]" if key else element]
            if element == "qualification":
                paths.append(f"{paths[0]}.verification")
            for path in paths:
                rule = state.rule(path, element, item)
                if not rule:
                    lines.append(f"{path} <- {source}: no rule, the last write wins")
                    continue
                rank = rule.index(source) if source in rule else len(rule)
                above, below = rule[:rank], rule[rank + 1 :] if source in rule else []
                standing = f"rank {rank + 1} of {len(rule)}" if source in rule else "not listed, below all"
                lines.append(
                    f"{path} <- {source}: {standing} in [{', '.join(rule)}]"
                    + (f"; kept over {', '.join(below)}" if below else "")
                    + (f"; yields to {', '.join(above)}" if above else "")
                )
    return lines


def match_identifiers(content: dict[str, Any]) -> list[tuple[str, str]]:
    """The match policy: ``content``'s identifiers of the ``match_systems``, in that order."""
    rules = current().survivorship
    if not rules.enabled:
        return []
    ids = [i for i in content.get("identifier") or [] if isinstance(i, dict) and i.get("value")]
    return [
        (system, str(i["value"])) for system in rules.match_systems for i in ids if i.get("system") == system
    ]


def install() -> None:
    """Hand the Practitioner merge and match policy to the store (the composition root calls it)."""
    RECORD_MERGERS["Practitioner"] = merge
    RECORD_MATCHERS["Practitioner"] = match_identifiers
    MERGE_SETTINGS["Practitioner"] = _rules_in_use


def _rules_in_use() -> SurvivorshipSettings:
    """The survivorship rules :func:`merge` reads now (a reload puts a new object in use)."""
    return current().survivorship


def on_change(tx: Tx, change: Change) -> None:
    """Change listener: ``practitioner.conflict`` for each conflict the change stored anew."""
    if change.resource_type != "Practitioner" or change.after is None:
        return
    before = {(c["element"], c["refused"], c["value"]) for c in conflicts_of(change.before or {})}
    for c in conflicts_of(change.after):
        if (c["element"], c["refused"], c["value"]) in before:
            continue
        facts = {
            "resource": change.reference,
            "versionId": change.version_id,
            "element": c["element"],
            "keptSource": c["kept"],
            "refusedSource": c["refused"],
        }
        enqueue(tx, CONFLICT_EVENT, payload_from(CONFLICT_EVENT, facts, facts))


__all__ = [
    "CONFLICT_EVENT",
    "CONFLICT_EXT",
    "SOURCE_EXT",
    "conflicts_of",
    "explain",
    "install",
    "match_identifiers",
    "merge",
    "on_change",
    "sources_of",
]
