"""The forms the workflows name: FHIR R4 Questionnaire files in a ``forms/`` folder of the mappings.

A workflow's ``form:`` (``mappings/workflows/clinical-review.yaml``: ``form:
clinical-review-findings``) is the id of a Questionnaire kept beside it as
``mappings/workflows/forms/<id>.json``. ``hms-ach check`` reads every such file with the mappings
and refuses, with ``file:line:col``:

* a file that is not a valid R4 Questionnaire (:func:`hms_ach.mapping.fhir_instance.problems`), an
  ``id`` other than the file's name, an item ``type`` outside the R4 QuestionnaireItemType codes,
  a ``linkId`` used twice, a ``choice`` item without ``answerOption``, a ``minValue``/``maxValue``
  extension on an item whose type has no such bound;
* a workflow whose ``form`` names no form file (with the known ids and a "did you mean").

The engine publishes the checked forms to the store as ``Questionnaire/<id>``
(:func:`hms_ach.cases.forms.publish_forms`); the case code validates findings against them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from hms_ach.core.errors import ConfigError
from hms_ach.mapping.fhir_instance import problems
from hms_ach.mapping.loader import LoadedFile, Positions, load_yaml, position_of

#: Questionnaire.identifier system of a shipped form (its value is the form id).
FORM_SYSTEM = "urn:hms-ach:id:form"
#: The item extensions that bound an answer (FHIR core extensions).
MIN_VALUE_EXT = "http://hl7.org/fhir/StructureDefinition/minValue"
MAX_VALUE_EXT = "http://hl7.org/fhir/StructureDefinition/maxValue"
#: R4 QuestionnaireItemType (a required binding) -> the answer value[x] each type takes (None:
#: the item takes no answer).
ANSWER_TYPES: dict[str, str | None] = {
    "group": None,
    "display": None,
    "question": None,
    "boolean": "valueBoolean",
    "decimal": "valueDecimal",
    "integer": "valueInteger",
    "date": "valueDate",
    "dateTime": "valueDateTime",
    "time": "valueTime",
    "string": "valueString",
    "text": "valueString",
    "url": "valueUri",
    "choice": "valueCoding",
    "open-choice": "valueCoding",
    "attachment": "valueAttachment",
    "reference": "valueReference",
    "quantity": "valueQuantity",
}
#: The item types a minValue/maxValue extension may bound, and the extension value it takes.
BOUND_VALUES: dict[str, str] = {
    "integer": "valueInteger",
    "decimal": "valueDecimal",
    "date": "valueDate",
    "dateTime": "valueDateTime",
    "time": "valueTime",
    "quantity": "valueQuantity",
}

_STEP = re.compile(r"([A-Za-z0-9_\-]+)(?:\[(\d+)\])?")


def form_paths(root: Path) -> list[Path]:
    """The form files under the mapping directory ``root``: ``*.json`` in a folder named ``forms``."""
    return sorted(p for p in root.rglob("*.json") if p.parent.name == "forms")


def load_form(path: Path) -> tuple[LoadedFile | None, list[ConfigError]]:
    """Read and check one form file: the loaded file (its ``model`` is the Questionnaire JSON) and
    its errors (the file is None when it cannot be used at all)."""
    try:
        data, positions = load_yaml(path)  # JSON is YAML: ruamel gives the line and column of each key
    except ConfigError as exc:
        return None, [exc]
    errors = check_form(path, data, positions)
    if not isinstance(data, dict):
        return None, errors
    return LoadedFile(path, data, positions), errors


def _loc(expression: str) -> tuple[Any, ...]:
    """``Questionnaire.item[0].type`` -> ``("item", 0, "type")``."""
    out: list[Any] = []
    for part in expression.split(".")[1:]:
        m = _STEP.fullmatch(part)
        if m is None:
            break
        out.append(m.group(1))
        if m.group(2) is not None:
            out.append(int(m.group(2)))
    return tuple(out)


def check_form(path: Path, data: Any, positions: Positions) -> list[ConfigError]:
    """The problems of one form file (empty: a usable form)."""

    def err(loc: tuple[Any, ...], msg: str, expected: str | None = None) -> None:
        errors.append(ConfigError(msg, position_of(path, positions, loc), expected))

    errors: list[ConfigError] = []
    if not isinstance(data, dict) or data.get("resourceType") != "Questionnaire":
        err(("resourceType",), "a form is a FHIR R4 Questionnaire", '"resourceType": "Questionnaire"')
        return errors
    if data.get("id") != path.stem:
        err(("id",), f"the form's id is not its file name {path.stem!r}", f'"id": "{path.stem}"')
    for problem in problems(data, limit=50, model_check=True):
        err(_loc(problem.expression), f"{problem.expression or 'Questionnaire'}: {problem.message}")
    seen: set[str] = set()
    _check_items(data.get("item"), ("item",), seen, err)
    return errors


def _check_items(items: Any, loc: tuple[Any, ...], seen: set[str], err: Any) -> None:
    for i, item in enumerate(items if isinstance(items, list) else []):
        if not isinstance(item, dict):
            continue
        at = loc + (i,)
        link_id = item.get("linkId")
        if isinstance(link_id, str):
            if link_id in seen:
                err(at + ("linkId",), f"linkId {link_id!r} is used twice", "a unique linkId per item")
            seen.add(link_id)
        kind = item.get("type")
        if kind not in ANSWER_TYPES:
            err(at + ("type",), f"unknown item type {str(kind)[:32]!r}", f"one of {', '.join(ANSWER_TYPES)}")
        if kind == "choice" and not item.get("answerOption") and not item.get("answerValueSet"):
            err(at, f"choice item {link_id!r} has no answerOption", "answerOption: the codes it allows")
        for j, ext in enumerate(item.get("extension") or []):
            if not isinstance(ext, dict) or ext.get("url") not in (MIN_VALUE_EXT, MAX_VALUE_EXT):
                continue
            want = BOUND_VALUES.get(str(kind))
            if want is None:
                err(
                    at + ("extension", j),
                    f"an item of type {kind!r} takes no minValue/maxValue",
                    "an integer or decimal item",
                )
            elif want not in ext:
                err(at + ("extension", j), f"the bound of an item of type {kind!r} is a {want}", want)
        _check_items(item.get("item"), at + ("item",), seen, err)
