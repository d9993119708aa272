"""Generate docs/mapping-language.md and the JSON Schema from the one schema in :mod:`hms_ach.mapping.spec`.

``hms-ach docs`` writes the reference; a test fails when the committed file differs from what this
module generates, so the reference cannot drift from the language.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, TypeAdapter

from hms_ach.core.records import RECORD_TYPES
from hms_ach.mapping import paths, spec
from hms_ach.mapping.functions import FUNCTIONS

INTRO = """# The mapping language

Mappings turn each inbound message into records of the canonical store. They are YAML files under
`mappings/`, checked by `hms-ach check` (every error is `file:line:col: what (expected ...)`) and
tried with `hms-ach mapping preview SAMPLE` before they go live. This reference is generated from
the schema (`hms_ach/mapping/spec.py`) by `hms-ach docs`; do not edit it by hand.

## How a message is mapped

1. The **message mapping** (`mappings/messages/`) whose `match` fits MSH-9 is chosen. No match is
   an AR (table 0357 code 200 for an unknown type, 201 for an unknown event).
2. Each entry of its `records:` runs a **resource mapping** (`mappings/resources/`), once, once
   per repetition (`for_each:`), or on one field (`context:`), with parameters (`with:`).
3. A resource mapping computes its **business key** and applies its **rules** in order. A rule
   sets one target element; it may call a **datatype mapping** (`use:`, `mappings/datatypes/`)
   to build an element from one HL7 datatype value, or another resource mapping (`record:`) to
   make a second record and reference it.
4. The records are upserted on their keys in one transaction with the message; objects merge
   element by element, lists and single values replace, `remove: true` deletes an element.

## A complete example

```yaml
# mappings/messages/adt_a01.yaml
kind: message
match: {message: ADT, events: [A01]}
records:
  - record: patient          # mappings/resources/patient.yaml
    as: patient              # other rules refer to it with `ref: patient`
  - record: encounter
    with: {status: in-progress, bed_status: O}
```

```yaml
# mappings/resources/patient.yaml (abridged)
kind: resource
resource: Patient
key:
  system: {source: ["PID-3[CX.5=MR].4.1", "PID-3[1].4.1"], table: assigning_authority}
  value: {source: ["PID-3[CX.5=MR].1", "PID-3[1].1"], required: true}
rules:
  - target: identifier[]
    for_each: PID-3          # one Identifier per repetition
    use: cx_identifier       # mappings/datatypes/cx_identifier.yaml
  - target: gender
    source: PID-8
    table: administrative_sex
  - target: birthDate
    source: PID-7
    function: hl7_date
```

## How one rule computes its value

1. `when:` is tested; if it does not hold the rule is skipped.
2. With `for_each:`, steps 3-6 run once per repetition, with that repetition as context.
3. The value comes from exactly one of: `source` (first non-empty of the paths), `sources` (all the
   paths, as a list, for `concat`/`format`/`join`), `value` (a constant), `param`, `use`,
   `record`, `ref` or nested `rules`.
4. `function` (with `args`) converts it, then `table` looks it up.
5. An empty value takes `default`; if still empty and `required`, the message gets an AE with the
   HL7 location and code 101; otherwise the rule sets nothing.
6. The value is written at `target`.

Empty means: missing, the empty string, or HL7's explicit null `""`.

## Compiled mappings

On the hot path (the pipeline, with no lineage) each HL7 v2 message mapping runs as Python code
generated from it: one function per message mapping, with its resource and datatype mappings as
plain functions beside it, made once per loaded mapping set. The code reads fields and components
by index, decodes escapes only in the values it reads, and gives exactly the records, warnings and
errors (text, location, code) of the interpreted engine; every golden case runs both and fails at
the first place where they differ.

- What compiles: every construct of HL7 v2 message, resource and datatype mappings (paths with
  any selector, `for_each`, `context`, `when`, `use`, `record`, `ref`, nested `rules`, functions,
  tables, defaults, `required`, `critical: false`, keys with fallbacks).
- What stays interpreted: CSV and FHIR inputs, `hms-ach mapping preview` (lineage), coverage, a
  `use:`/`record:` whose `source:` list mixes paths into different segments (today only
  `mfn_m02`, through `practitioner_role_stf`), and a datatype path (`XCN.1`) read where there is
  no datatype value. The engine logs `mapping.compile_fallback` at DEBUG with the reason, and
  `MappingEngine.fallbacks` lists them.
- The engine compiles every HL7 v2 message mapping when it loads a mapping set (at start and at
  each reload), in a thread for a reload, so that ACKs do not wait for it; elsewhere (tests,
  tools) a mapping is compiled on its first message. Resource and datatype mappings are compiled
  once and shared by every message mapping that uses them.
- Around the compiled function, the pipeline reads MSH once (the separators are reused for the
  parse when the decoded MSH has the same ones) and checks the records of a message with one JSON
  serialisation (one by one only when that fails, to name the record).
- `HMS_ACH_MAPPING_INTERPRETED=1` in the environment runs every mapping interpreted (diagnosis).

## HL7 paths
"""


def _type_name(ann: Any) -> str:
    text = str(ann).replace("typing.", "").replace("hms_ach.mapping.spec.", "")
    text = text.replace("NoneType", "null").replace("<class '", "").replace("'>", "")
    return text.replace(" | ", " or ").replace("Literal[", "one of [")


def _model_table(model: type[BaseModel]) -> list[str]:
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        key = field.alias or name
        if field.is_required():
            default = "required"
        elif field.default_factory is not None:
            default = "empty"
        else:
            default = "" if field.default is None else json.dumps(field.default)
        rows.append(f"| `{key}` | {_type_name(field.annotation)} | {default} | {field.description or ''} |")
    return rows


def _rst_blocks_to_markdown(doc: str) -> str:
    """The path grammar from paths.py's docstring: ``::`` blocks become fenced code."""
    lines = doc.strip().splitlines()[2:]
    out: list[str] = []
    in_block = False
    for line in lines:
        if "compiled path" in line or "for lineage" in line:
            break
        if line.rstrip().endswith("::"):
            out.append(line.rstrip()[:-1])
            out.append("```")
            in_block = True
            continue
        if in_block and line.strip() == "" and out[-1] != "```":
            out.append("```")
            in_block = False
            out.append("")
            continue
        if in_block and line.strip() == "":
            continue
        out.append(line[4:] if in_block and line.startswith("    ") else line)
    if in_block:
        out.append("```")
    return "\n".join(out).strip()


def generate() -> str:
    out = [INTRO]
    out.append(_rst_blocks_to_markdown(paths.__doc__ or ""))
    out.append("")
    sections = [
        ("Message mappings (`kind: message`)", spec.MessageMapping),
        ("Message match", spec.MessageMatch),
        ("Record entries (`records:` items)", spec.RecordEntry),
        ("Actions (`actions:` items)", spec.ActionEntry),
        ("Resource mappings (`kind: resource`)", spec.ResourceMapping),
        ("Business key (`key:`)", spec.KeySpec),
        ("Parameters (`params:` values)", spec.ParamSpec),
        ("Rules (`rules:` items)", spec.Rule),
        ("Values (`key.system`, `key.value`)", spec.ValueSpec),
        ("Conditions (`when:`)", spec.Condition),
        ("Datatype mappings (`kind: datatype`)", spec.DatatypeMapping),
        ("Code tables (`kind: table`)", spec.CodeTable),
        ("Event payloads (`kind: event`)", spec.EventMapping),
        ("Outbound HL7 v2 transforms (`kind: hl7`)", spec.Hl7TransformMapping),
        ("Transform edits (`rules:` items of `kind: hl7`)", spec.Hl7Edit),
        ("Generated messages (`generate:` of `kind: hl7`)", spec.Hl7Generate),
        ("Records read (`generate.records:` values)", spec.Hl7RecordRead),
        ("Generated fields (`generate.fields:` items)", spec.Hl7Field),
        ("Notifications (`kind: notification`)", spec.NotificationMapping),
        ("Notification examples (`examples:` items)", spec.NotificationExample),
        ("Case workflows (`kind: workflow`)", spec.WorkflowMapping),
        ("Workflow assignment (`assignment:`)", spec.WorkflowAssignment),
        ("Workflow states (`states:` items)", spec.WorkflowState),
        ("Workflow SLA (`sla:` of a state)", spec.WorkflowSla),
        ("Workflow transitions (`transitions:` items)", spec.WorkflowTransition),
        ("Workflow routing (`routing:`)", spec.WorkflowRouting),
        ("Routing categories (`routing.categories:` items)", spec.WorkflowCategory),
        ("Workflow policies (`policies:` items)", spec.WorkflowPolicy),
    ]
    for title, model in sections:
        out.append(f"## {title}\n")
        if model.__doc__:
            out.append(" ".join(model.__doc__.split()) + "\n")
        out.extend(_model_table(model))  # type: ignore[arg-type]
        out.append("")
    out.append("Record types (`resource:`): " + ", ".join(f"`{t}`" for t in RECORD_TYPES) + ".\n")
    out.append("## Functions\n")
    out.append("Called with `function: NAME` and `args: {...}`. Each example is run as a test.\n")
    for name in sorted(FUNCTIONS):
        fn = FUNCTIONS[name]
        out.append(f"### `{name}`\n\n{fn.summary}\n")
        if fn.args:
            out.append("| argument | meaning |\n|---|---|")
            out.extend(f"| `{a}` | {d} |" for a, d in fn.args.items())
            out.append("")
        if fn.examples:
            out.append("| input | args | result |\n|---|---|---|")
            out.extend(
                f"| `{json.dumps(i)}` | `{json.dumps(a)}` | `{json.dumps(r)}` |" for i, a, r in fn.examples
            )
            out.append("")
    return "\n".join(out).rstrip() + "\n"


def json_schema() -> dict[str, Any]:
    schema = TypeAdapter(spec.MappingFile).json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "hms-ach mapping file"
    return schema


def write_docs(root: Path) -> Path:
    target = root / "docs" / "mapping-language.md"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(generate(), encoding="utf-8")
    return target
