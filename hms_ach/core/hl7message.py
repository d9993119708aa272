"""The parsed HL7 v2 message: the vocabulary that mappings read.

:class:`Hl7Message` is a header (:class:`MshHeader`) and its segments in order; a
:class:`Segment` gives its fields with the standard's 1-based numbering (MSH-1 is the field
separator). Components are split only when a mapping asks for them.

This module holds the model only. Reading bytes into it (MSH checks, charsets, segment ends) is
:mod:`hms_ach.hl7v2.parse`; a mapping never parses, it is handed messages or a parser.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Separators:
    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"

    @property
    def encoding_characters(self) -> str:
        return self.component + self.repetition + self.escape + self.subcomponent


@dataclass
class MshHeader:
    """The fields of MSH that routing, de-duplication and the ACK need."""

    separators: Separators
    fields: list[str]

    def get(self, n: int, component: int = 0) -> str:
        """MSH-n (1-based, MSH-1 is the field separator), optionally one component."""
        if n >= len(self.fields):
            return ""
        value = self.fields[n]
        if component:
            parts = value.split(self.separators.component)
            value = parts[component - 1] if component <= len(parts) else ""
        return value

    sending_application = property(lambda self: self.get(3))
    sending_facility = property(lambda self: self.get(4))
    receiving_application = property(lambda self: self.get(5))
    receiving_facility = property(lambda self: self.get(6))
    message_code = property(lambda self: self.get(9, 1))
    trigger_event = property(lambda self: self.get(9, 2))
    message_structure = property(lambda self: self.get(9, 3))
    control_id = property(lambda self: self.get(10))
    processing_id = property(lambda self: self.get(11, 1))
    version = property(lambda self: self.get(12, 1))
    accept_ack_type = property(lambda self: self.get(15))
    application_ack_type = property(lambda self: self.get(16))
    charset = property(lambda self: self.get(18).split(self.separators.repetition)[0])

    @property
    def message_type(self) -> str:
        return f"{self.message_code}^{self.trigger_event}" if self.trigger_event else self.message_code

    @property
    def enhanced_mode(self) -> bool:
        return bool(self.accept_ack_type or self.application_ack_type)


#: Decodes the escape sequences of one value (``\F\ \S\ \T\ \R\ \E\ \Xhh\`` ...); given by the parser.
Unescape = Callable[[str], str]


class Segment:
    """One segment; ``field(n)`` uses the standard's numbering (MSH-1 is the field separator)."""

    __slots__ = ("name", "fields", "index", "seps", "_unescape")

    def __init__(self, name: str, fields: list[str], index: int, seps: Separators, unescape: Unescape):
        self.name = name
        self.fields = fields
        self.index = index
        self.seps = seps
        self._unescape = unescape

    def field(self, n: int) -> str:
        return self.fields[n] if 0 <= n < len(self.fields) else ""

    def repetitions(self, n: int) -> list[str]:
        value = self.field(n)
        if self.name == "MSH" and n in (1, 2):
            return [value]
        return value.split(self.seps.repetition) if value else []

    def unescape(self, value: str) -> str:
        if self.seps.escape not in value:
            return value
        return self._unescape(value)

    def __repr__(self) -> str:
        return f"<Segment {self.name} #{self.index}>"


@dataclass
class Hl7Message:
    """A parsed HL7 v2 message: ``header`` plus its ``segments`` in order."""

    header: MshHeader
    segments: list[Segment]
    text: str = ""
    _by_name: dict[str, list[Segment]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for seg in self.segments:
            self._by_name.setdefault(seg.name, []).append(seg)

    @property
    def separators(self) -> Separators:
        return self.header.separators

    def all(self, name: str) -> list[Segment]:
        return self._by_name.get(name, [])

    def first(self, name: str) -> Segment | None:
        segs = self._by_name.get(name)
        return segs[0] if segs else None

    @property
    def message_type(self) -> str:
        return self.header.message_type
