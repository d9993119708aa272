"""Department names resolved to one Organization, for the reports (the compliance status).

Shifts, timecards and Practitioners carry their department as text (the shift's
``department.display``, the timecard's ``department``, the Practitioner's department extension):
"4 West nursing" from FHIR onboarding, "4W" from the CSV feeds. The stored data keeps that text; a
report resolves it against the stored Organizations, in this order:

1. an Organization identifier value equal to the text (any system: ``NURS-4W``);
2. the Organization's ``name`` (case and surrounding spaces ignored);
3. one of the Organization's ``alias`` values (likewise).

The first step that names exactly one live Organization wins. A text that names none is
``unresolved``; one that names several at its first matching step is ``ambiguous``. Both stay in the
report under the text as written, so nothing is silently merged or lost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Resolution = Literal["identifier", "name", "alias", "unresolved", "ambiguous"]
NO_DEPARTMENT = "(none)"


@dataclass(frozen=True)
class Department:
    """Where a department text leads: the report's key and the Organization (None: not resolved)."""

    key: str
    organization: str | None
    resolution: Resolution


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


class Directory:
    """The Organizations of the store, indexed for :meth:`resolve`."""

    def __init__(self, organizations: list[dict[str, Any]]):
        self._steps: list[tuple[Resolution, dict[str, set[str]]]] = [
            ("identifier", {}),
            ("name", {}),
            ("alias", {}),
        ]
        self._names: dict[str, str] = {}
        for org in organizations:
            ref = f"Organization/{org.get('id')}"
            self._names[ref] = str(org.get("name") or ref)
        taken = list(self._names.values())
        for ref, name in self._names.items():  # a report key names one Organization
            if taken.count(name) > 1 or name == NO_DEPARTMENT:
                self._names[ref] = f"{name} ({ref})"
        for org in organizations:
            ref = f"Organization/{org.get('id')}"
            by_code, by_name, by_alias = (index for _, index in self._steps)
            for ident in org.get("identifier") or []:
                if isinstance(ident, dict) and ident.get("value"):
                    by_code.setdefault(str(ident["value"]).strip(), set()).add(ref)
            if org.get("name"):
                by_name.setdefault(_norm(str(org["name"])), set()).add(ref)
            for alias in org.get("alias") or []:
                by_alias.setdefault(_norm(str(alias)), set()).add(ref)
        self._cache: dict[str | None, Department] = {}

    def resolve(self, text: str | None) -> Department:
        """The department that ``text`` names (see the module docstring)."""
        if text in self._cache:
            return self._cache[text]
        found = self._resolve(text)
        self._cache[text] = found
        return found

    def _resolve(self, text: str | None) -> Department:
        if text is None or not text.strip():
            return Department(NO_DEPARTMENT, None, "unresolved")
        for step, index in self._steps:
            refs = index.get(text.strip() if step == "identifier" else _norm(text))
            if not refs:
                continue
            if len(refs) > 1:
                return Department(text, None, "ambiguous")
            ref = next(iter(refs))
            return Department(self._names[ref], ref, step)
        return Department(text, None, "unresolved")


__all__ = ["NO_DEPARTMENT", "Department", "Directory", "Resolution"]
