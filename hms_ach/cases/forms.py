"""Checking a QuestionnaireResponse against its Questionnaire (the form a case's findings answer).

:func:`validate_response` answers the issues, each naming the item's ``linkId``: a required item
without an answer, an answer of the wrong type for the item (``valueInteger`` for an ``integer``
item...), more than one answer to an item that does not repeat, an answer to an item the form does
not have. Groups are walked recursively.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: Questionnaire.item.type -> the answer[x] element an answer of that item carries.
ANSWER_ELEMENTS: dict[str, str] = {
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
    "open-choice": "valueCoding|valueString",
    "attachment": "valueAttachment",
    "reference": "valueReference",
    "quantity": "valueQuantity",
}


@dataclass(frozen=True)
class Issue:
    """What is wrong with the answers to one item."""

    link_id: str
    message: str


def _items(node: dict[str, Any]) -> list[dict[str, Any]]:
    return [i for i in node.get("item") or [] if isinstance(i, dict)]


def _answer_value(answer: dict[str, Any]) -> tuple[str, Any] | None:
    for key, value in answer.items():
        if key.startswith("value"):
            return key, value
    return None


def _type_ok(element: str, value: Any) -> bool:
    if element == "valueBoolean":
        return isinstance(value, bool)
    if element == "valueInteger":
        return isinstance(value, int) and not isinstance(value, bool)
    if element == "valueDecimal":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if element in ("valueCoding", "valueAttachment", "valueReference", "valueQuantity"):
        return isinstance(value, dict)
    return isinstance(value, str)


def _check(questions: list[dict[str, Any]], answers: list[dict[str, Any]], issues: list[Issue]) -> None:
    by_link: dict[str, list[dict[str, Any]]] = {}
    for given in answers:
        by_link.setdefault(str(given.get("linkId", "")), []).append(given)
    known = {str(q.get("linkId", "")) for q in questions}
    for link in by_link:
        if link not in known:
            issues.append(Issue(link, "the form has no such item"))
    for question in questions:
        link = str(question.get("linkId", ""))
        kind = str(question.get("type", ""))
        given_items = by_link.get(link, [])
        values = [a for g in given_items for a in g.get("answer") or [] if isinstance(a, dict)]
        if kind in ("group", "display"):
            for g in given_items:
                _check(_items(question), _items(g), issues)
            if kind == "group" and question.get("required") and not given_items:
                issues.append(Issue(link, "required group is missing"))
            continue
        if question.get("required") and not values:
            issues.append(Issue(link, "required item has no answer"))
        if len(values) > 1 and not question.get("repeats"):
            issues.append(Issue(link, f"{len(values)} answers to an item that does not repeat"))
        expected = ANSWER_ELEMENTS.get(kind)
        for answer in values:
            found = _answer_value(answer)
            if expected is None or found is None:
                if found is None:
                    issues.append(Issue(link, "an answer without a value"))
                continue
            element, value = found
            if element not in expected.split("|") or not _type_ok(element, value):
                issues.append(Issue(link, f"the answer is {element}, expected {expected} ({kind} item)"))


def validate_response(questionnaire: dict[str, Any], response: dict[str, Any]) -> list[Issue]:
    """The issues of ``response`` (a QuestionnaireResponse) against ``questionnaire``; empty: valid."""
    issues: list[Issue] = []
    _check(_items(questionnaire), _items(response), issues)
    return issues
