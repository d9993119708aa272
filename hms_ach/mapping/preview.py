"""``hms-ach mapping preview``: what a mapping does to one sample, with nothing written anywhere.

Four views: the input as a tree with positions (an HL7 v2 message with field names from hl7apy's
HL7 tables; a CSV row's columns; a FHIR resource's elements), the canonical records, the FHIR
resources they become (checked with the fhir.resources R4B models), and the lineage of every
produced field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from hms_ach.core.hl7message import Hl7Message
from hms_ach.core.records import MappingResult
from hms_ach.mapping.engine import MappingEngine
from hms_ach.mapping.paths import CsvRecord


@lru_cache(maxsize=8)
def _fields_table(version: str) -> dict[str, Any]:
    from hl7apy import load_library

    for candidate in (version, version[:3], "2.5"):
        try:
            return dict(load_library(candidate).FIELDS)
        except Exception:  # noqa: BLE001 - unknown version: try the next one
            continue
    return {}


def field_name(version: str, segment: str, n: int) -> tuple[str, str]:
    """(datatype, long name) of SEG-n in ``version``, from hl7apy's tables; ('', '') when unknown."""
    entry = _fields_table(version).get(f"{segment}_{n}")
    if not entry or len(entry) < 4:
        return "", ""
    return str(entry[2] or ""), str(entry[3] or "").replace("_", " ").lower()


def message_tree(msg: Hl7Message) -> list[dict[str, Any]]:
    version = msg.header.version or "2.5"
    out = []
    for seg in msg.segments:
        seq = sum(1 for s in msg.segments[: seg.index] if s.name == seg.name) + 1
        seg_loc = seg.name if seq == 1 else f"{seg.name}[{seq}]"
        fields = []
        for n in range(1, len(seg.fields)):
            value = seg.field(n)
            if not value:
                continue
            dtype, name = field_name(version, seg.name, n)
            comps = []
            reps = seg.repetitions(n)
            for r_i, rep in enumerate(reps, start=1):
                parts = rep.split(seg.seps.component) if not (seg.name == "MSH" and n <= 2) else [rep]
                if len(parts) > 1:
                    for c_i, comp in enumerate(parts, start=1):
                        if comp:
                            rep_loc = f"[{r_i}]" if len(reps) > 1 else ""
                            comps.append(
                                {"path": f"{seg_loc}-{n}{rep_loc}.{c_i}", "value": seg.unescape(comp)}
                            )
            fields.append(
                {
                    "path": f"{seg_loc}-{n}",
                    "datatype": dtype,
                    "name": name,
                    "value": value,
                    "components": comps,
                }
            )
        out.append({"segment": seg_loc, "fields": fields})
    return out


@dataclass
class Preview:
    mapping: str
    tree: list[dict[str, Any]]
    result: MappingResult
    resources: list[dict[str, Any]]
    issues: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "mapping": self.mapping,
            "message": self.tree,
            "records": self.result.to_dict()["records"],
            "actions": self.result.to_dict()["actions"],
            "fhir": self.resources,
            "lineage": [str(lin) for rec in self.result.records for lin in rec.lineage],
            "issues": self.issues,
        }

    def to_text(self) -> str:
        lines = [f"mapping: {self.mapping}", "", "== message"]
        for seg in self.tree:
            lines.append(seg["segment"])
            for f in seg["fields"]:
                label = f" ({f['datatype']} {f['name']})" if f["name"] else ""
                lines.append(f"  {f['path']}{label} = {f['value']}")
                for c in f["components"]:
                    lines.append(f"      {c['path']} = {c['value']}")
        lines += ["", "== canonical records"]
        for rec in self.result.records:
            lines.append(
                f"{rec.resource_type} key {rec.key}  ({rec.alias}, mode {rec.mode}"
                + ("" if rec.create else ", update only")
                + ")"
            )
        for action in self.result.actions:
            lines.append(f"action {action.name} {action.args}")
        lines += ["", "== FHIR resources"]
        for res in self.resources:
            lines.append(json.dumps(res, indent=2, ensure_ascii=False))
        lines += ["", "== lineage"]
        for rec in self.result.records:
            lines.extend(f"  {lin}" for lin in rec.lineage)
        if self.issues:
            lines += ["", "== FHIR validation issues"] + [f"  {i}" for i in self.issues]
        return "\n".join(lines)


def preview(engine: MappingEngine, msg: Hl7Message) -> Preview:
    """Map ``msg`` without touching a store; references point at ``Type/<alias>`` placeholders."""
    mapping = engine.mapping_for(msg)
    return _preview(str(mapping.path), message_tree(msg), engine.map_message(msg, mapping))


def preview_csv_row(engine: MappingEngine, dataset: str, row: CsvRecord) -> Preview:
    """Map one CSV row of ``dataset`` as the sftp_csv and file_drop channels do; writes nothing."""
    mapping = engine.input_mapping("csv", dataset)
    fields = [_leaf(column, value) for column, value in row.values.items()]
    tree = [{"segment": f"{row.source or dataset} line {row.line}", "fields": fields}]
    return _preview(str(mapping.path), tree, engine.map_input("csv", dataset, row))


def preview_fhir(engine: MappingEngine, resource: dict[str, Any]) -> Preview:
    """Map one FHIR resource as a FHIR write (the fhir_rest channel) maps it; writes nothing."""
    rtype = str(resource.get("resourceType", ""))
    mapping = engine.input_mapping("fhir", rtype)
    fields = [_leaf(name, json.dumps(value, ensure_ascii=False)) for name, value in resource.items()]
    tree = [{"segment": rtype or "(no resourceType)", "fields": fields}]
    return _preview(str(mapping.path), tree, engine.map_input("fhir", rtype, resource))


def _leaf(path: str, value: str) -> dict[str, Any]:
    """A node of the input tree that is not an HL7 field: a CSV column or a FHIR element."""
    return {"path": path, "name": "", "datatype": "", "value": value, "components": []}


def _preview(mapping: str, tree: list[dict[str, Any]], result: MappingResult) -> Preview:
    by_alias = {r.alias: r for r in result.records}
    resources = []
    issues: list[str] = []
    for rec in result.records:
        body = {"resourceType": rec.resource_type, "id": _safe_id(rec.alias)}
        body.update(_placeholder_refs(rec.content, by_alias))
        resources.append(body)
        issues.extend(validate_fhir(body))
    return Preview(mapping, tree, result, resources, issues)


def _safe_id(alias: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "-" for c in alias)[:64]


def _placeholder_refs(value: Any, by_alias: dict[str, Any]) -> Any:
    if isinstance(value, dict):
        out = {k: _placeholder_refs(v, by_alias) for k, v in value.items()}
        ref = out.get("reference")
        if isinstance(ref, str) and ref.startswith("@") and ref[1:] in by_alias:
            target = by_alias[ref[1:]]
            out["reference"] = f"{target.resource_type}/{_safe_id(target.alias)}"
        return out
    if isinstance(value, list):
        return [_placeholder_refs(v, by_alias) for v in value]
    return value


def validate_fhir(resource: dict[str, Any]) -> list[str]:
    """Problems the fhir.resources R4B model finds in ``resource`` (empty list when valid)."""
    from fhir.resources.R4B import get_fhir_model_class
    from pydantic import ValidationError

    try:
        model = get_fhir_model_class(resource["resourceType"])
        model.model_validate(resource)
    except ValidationError as exc:
        return [
            f"{resource['resourceType']}/{resource.get('id')}: "
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
            for e in exc.errors()
        ]
    except Exception as exc:  # noqa: BLE001 - an unknown type is an issue to show, not a crash
        return [f"{resource.get('resourceType')}: {exc}"]
    return []


@dataclass
class TransformPreview:
    """What a ``kind: hl7`` transform does to one message: the message after, and which rule changed
    which field (``mapping preview --transform NAME``)."""

    transform: str
    message: str
    changes: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"transform": self.transform, "message": self.message.split("\r"), "lineage": self.changes}

    def to_text(self) -> str:
        lines = [f"== transform {self.transform}: the message after", *self.message.rstrip("\r").split("\r")]
        lines.append("== lineage")
        lines += [
            f"{c['path']:<10} {c['before']!r} -> {c['after']!r}  (rule {c['rule']}: {c['how']})"
            for c in self.changes
        ] or ["(no field changed)"]
        return "\n".join(lines)


def preview_transform(engine: MappingEngine, name: str, raw: bytes) -> TransformPreview:
    """Run the transform ``name`` of the engine's mapping set on ``raw`` (for a ``generate:`` file,
    the JSON of the records it builds from). KeyError: no such transform;
    :class:`hms_ach.mapping.hl7_transform.TransformError` when a rule cannot apply."""
    from hms_ach.mapping.hl7_transform import run

    loaded = engine.mset.transforms.get(name)
    if loaded is None:
        raise KeyError(f"no kind: hl7 mapping is named {name!r}; known: {sorted(engine.mset.transforms)}")
    tables = {n: f.model for n, f in engine.mset.tables.items()}
    done = run(loaded.model, raw, tables)
    return TransformPreview(
        name,
        done.message.decode("utf-8", "replace"),
        [
            {"rule": c.rule, "path": c.path, "before": c.before, "after": c.after, "how": c.how}
            for c in done.changes
        ],
    )
