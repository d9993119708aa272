"""The forms a case's findings answer: what each item asks, whether a response answers it, and the
forms published to the store.

A workflow's ``form:`` is a FHIR R4 Questionnaire shipped as ``mappings/workflows/forms/<id>.json``
(checked by ``hms-ach check``: :mod:`hms_ach.mapping.form_files`).

* :func:`form_items` reads the items of a Questionnaire: linkId, type, required, repeats, the codes
  a choice allows and the bounds of the standard ``minValue`` / ``maxValue`` extensions.
* :func:`validate_response` checks a QuestionnaireResponse against the form (pure). Each
  :class:`Issue` names the item's linkId and what is wrong, never the answer given (findings are
  patient data; the issues go to API responses and logs).
* :func:`publish_forms` writes the forms to the store as ``Questionnaire/<id>`` when the engine
  starts or reloads its mappings, so FHIR clients read them; the same content again writes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from hms_ach.core.records import RecordWrite
from hms_ach.mapping.form_files import ANSWER_TYPES, FORM_SYSTEM, MAX_VALUE_EXT, MIN_VALUE_EXT
from hms_ach.store import audit
from hms_ach.store.port import Tx
from hms_ach.store.repository import Repository

log = logging.getLogger("hms_ach.cases.forms")
#: The actor of the forms' versions in the audit trail (a job of the engine's own).
PUBLISHER = "forms.publish"


@dataclass(frozen=True)
class FormItem:
    """One item of a form, as a response is checked against it."""

    link_id: str
    type: str
    required: bool = False
    repeats: bool = False
    options: tuple[tuple[str | None, str], ...] = ()
    """A choice item's allowed codings: (system, code)."""
    min_value: Any = None
    max_value: Any = None

    @property
    def answer_key(self) -> str | None:
        """The ``value[x]`` an answer of this item carries (None: the item takes no answer)."""
        return ANSWER_TYPES.get(self.type)


@dataclass(frozen=True)
class Issue:
    """One reason a response does not answer its form: the item's ``link_id`` (empty for the
    response as a whole) and the ``message`` (never the answer's value)."""

    link_id: str
    message: str


def _bound(item: dict[str, Any], url: str) -> Any:
    for ext in item.get("extension") or []:
        if isinstance(ext, dict) and ext.get("url") == url:
            for key, value in ext.items():
                if key.startswith("value"):
                    return value
    return None


def _options(item: dict[str, Any]) -> tuple[tuple[str | None, str], ...]:
    out: list[tuple[str | None, str]] = []
    for option in item.get("answerOption") or []:
        coding = option.get("valueCoding") if isinstance(option, dict) else None
        if isinstance(coding, dict) and isinstance(coding.get("code"), str):
            out.append((coding.get("system"), coding["code"]))
    return tuple(out)


def form_items(questionnaire: Mapping[str, Any]) -> list[FormItem]:
    """Every item of ``questionnaire`` (nested group items included), in document order."""

    def walk(items: Any) -> Iterator[FormItem]:
        for item in items if isinstance(items, list) else []:
            if not isinstance(item, dict) or not isinstance(item.get("linkId"), str):
                continue
            yield FormItem(
                link_id=item["linkId"],
                type=str(item.get("type")),
                required=item.get("required") is True,
                repeats=item.get("repeats") is True,
                options=_options(item),
                min_value=_bound(item, MIN_VALUE_EXT),
                max_value=_bound(item, MAX_VALUE_EXT),
            )
            yield from walk(item.get("item"))

    return list(walk(questionnaire.get("item")))


def _answers(items: Any, out: dict[str, list[Any]], depth: int = 0) -> None:
    """linkId -> the answers given, over the response's nested items (bounded depth)."""
    if depth > 16:
        return
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict) or not isinstance(item.get("linkId"), str):
            continue
        raw = item.get("answer")
        answers = [a for a in raw if isinstance(a, dict)] if isinstance(raw, list) else []
        out.setdefault(item["linkId"], []).extend(answers)
        _answers(item.get("item"), out, depth + 1)
        for answer in answers:
            _answers(answer.get("item"), out, depth + 1)


def _type_ok(key: str, value: Any) -> bool:
    if key == "valueBoolean":
        return isinstance(value, bool)
    if key == "valueInteger":
        return isinstance(value, int) and not isinstance(value, bool)
    if key == "valueDecimal":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if key in ("valueCoding", "valueQuantity", "valueReference", "valueAttachment"):
        return isinstance(value, dict)
    return isinstance(value, str) and value != ""


def _comparable(a: Any, b: Any) -> bool:
    numbers = int | float
    return (isinstance(a, numbers) and isinstance(b, numbers)) or (isinstance(a, str) and isinstance(b, str))


def _answer_issues(item: FormItem, answer: dict[str, Any]) -> Iterator[str]:
    key = item.answer_key
    given = [k for k in answer if k.startswith("value")]
    if key is None:
        yield f"a {item.type} item takes no answer"
        return
    allowed = {key, "valueString"} if item.type == "open-choice" else {key}
    if len(given) != 1 or given[0] not in allowed:
        yield f"the answer must be a {key} (a {item.type} item)"
        return
    value = answer[given[0]]
    if not _type_ok(given[0], value):
        yield f"the answer is not a valid {given[0]}"
        return
    if item.type == "choice" and item.options:
        system, code = value.get("system"), value.get("code")
        if not any(code == c and (system is None or s is None or system == s) for s, c in item.options):
            yield f"the answer is not one of the options ({', '.join(c for _, c in item.options)})"
    if item.type in ("integer", "decimal", "date", "dateTime", "time"):
        if item.min_value is not None and _comparable(value, item.min_value) and value < item.min_value:
            yield f"the answer is below the minimum {item.min_value}"
        if item.max_value is not None and _comparable(value, item.max_value) and value > item.max_value:
            yield f"the answer is above the maximum {item.max_value}"


def validate_response(questionnaire: dict[str, Any], response: dict[str, Any]) -> list[Issue]:
    """The issues of ``response`` (a QuestionnaireResponse) against its form ``questionnaire``;
    empty when it answers the form: every required item answered, no item outside the form, one
    answer per item that does not repeat, each answer of the item's type, a choice among the
    options, numbers and dates within the minValue/maxValue bounds."""
    if not isinstance(response, dict) or response.get("resourceType", "QuestionnaireResponse") != (
        "QuestionnaireResponse"
    ):
        return [Issue("", "a QuestionnaireResponse is expected")]
    answers: dict[str, list[Any]] = {}
    _answers(response.get("item"), answers)
    items = form_items(questionnaire)
    known = {item.link_id for item in items}
    issues = [Issue(link_id[:64], "not an item of the form") for link_id in answers if link_id not in known]
    for item in items:
        given = answers.get(item.link_id, [])
        if item.required and item.answer_key is not None and not given:
            issues.append(Issue(item.link_id, "is required but has no answer"))
        if len(given) > 1 and not item.repeats:
            issues.append(Issue(item.link_id, f"takes one answer, {len(given)} were given"))
        for answer in given:
            issues.extend(Issue(item.link_id, message) for message in _answer_issues(item, answer))
    return issues


def publish_forms(tx: Tx, forms: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Write each form (id -> Questionnaire JSON) as ``Questionnaire/<id>``, keyed on its
    identifier in :data:`~hms_ach.mapping.form_files.FORM_SYSTEM`; answers the references of the
    forms that got a new version (a form whose content is stored already gets none)."""
    repo = Repository(tx)
    written: list[str] = []
    with audit.acting(tx, audit.actor_json(kind="system", job=PUBLISHER)):  # who wrote them, audited
        for form_id, questionnaire in sorted(forms.items()):
            content = {k: v for k, v in questionnaire.items() if k not in ("id", "meta")}
            content.setdefault("identifier", [{"system": FORM_SYSTEM, "value": form_id}])
            rec = RecordWrite("form", "Questionnaire", FORM_SYSTEM, form_id, content, mode="replace")
            out = repo.upsert(rec, content, None, rid=form_id)
            if out is not None and out.changed:
                written.append(out.reference)
    if written:
        log.info("forms.published", extra={"forms": written})
    return written
