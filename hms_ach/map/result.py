"""What a mapping produces: the records to upsert, the store actions to run, with lineage.

This is the contract between the mapping engine (``map/``) and the store (``store/``). It is
plain data, so the preview can show it and the golden tests can compare it.

References between records of one message are written ``{"reference": "@alias"}`` and resolved by
the store to ``Type/id`` once the aliased record has its id.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Mode = Literal["merge", "replace", "fill"]


@dataclass
class Lineage:
    """Where one produced value came from: ``Encounter.location[0].location <- PV1-3 (4W^412^B)``."""

    target: str
    source: str
    value: str = ""

    def __str__(self) -> str:
        return f"{self.target} <- {self.source}" + (f" ({self.value})" if self.value else "")


@dataclass
class RecordWrite:
    """Upsert one canonical record, keyed on its business identifier."""

    alias: str
    resource_type: str
    key_system: str | None
    key_value: str | None
    content: dict[str, Any]
    mode: Mode = "merge"
    create: bool = True
    lineage: list[Lineage] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.key_system}|{self.key_value}" if self.key_value else "(no key)"


@dataclass
class StoreAction:
    """A registered store operation beyond upserts, e.g. ``merge_patient``."""

    name: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class MappingResult:
    mapping: str = ""
    records: list[RecordWrite] = field(default_factory=list)
    actions: list[StoreAction] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "mapping": self.mapping,
            "records": [
                {
                    "alias": r.alias,
                    "resourceType": r.resource_type,
                    "key": {"system": r.key_system, "value": r.key_value},
                    "mode": r.mode,
                    "create": r.create,
                    "content": r.content,
                }
                for r in self.records
            ],
            "actions": [{"name": a.name, "args": a.args} for a in self.actions],
        }
