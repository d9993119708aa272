"""The one exception tree of hms-ach.

Every error knows *where* it happened (a config file position, or an HL7 location such as
``PID-8``) and, for HL7, which HL7 table 0357 code describes it, so that the ACK and the message
store can say what is wrong without a stack trace::

    HmsAchError
    ├── ConfigError            a channels.yaml / mapping / table file is wrong (file:line:col)
    ├── MessageError           an inbound message cannot be accepted as it is
    │   ├── RejectError        unusable header or unsupported type/event/version/processing id -> AR
    │   └── ContentError       the message is readable but its content breaks a rule      -> AE
            └── MappingError   a mapping rule failed (required field missing, unmapped code, bad date)

Third-party exceptions are translated at the boundary with ``raise ... from exc``.
"""

from __future__ import annotations

from dataclasses import dataclass


class Err0357:
    """HL7 table 0357 (message error condition codes) used in ERR-3."""

    ACCEPTED = "0"
    SEGMENT_SEQUENCE = "100"
    REQUIRED_FIELD_MISSING = "101"
    DATA_TYPE_ERROR = "102"
    TABLE_VALUE_NOT_FOUND = "103"
    VALUE_TOO_LONG = "104"
    UNSUPPORTED_MESSAGE_TYPE = "200"
    UNSUPPORTED_EVENT = "201"
    UNSUPPORTED_PROCESSING_ID = "202"
    UNSUPPORTED_VERSION = "203"
    UNKNOWN_KEY = "204"
    DUPLICATE_KEY = "205"
    RECORD_LOCKED = "206"
    INTERNAL_ERROR = "207"

    TEXT = {
        "0": "Message accepted",
        "100": "Segment sequence error",
        "101": "Required field missing",
        "102": "Data type error",
        "103": "Table value not found",
        "104": "Value too long",
        "200": "Unsupported message type",
        "201": "Unsupported event code",
        "202": "Unsupported processing id",
        "203": "Unsupported version id",
        "204": "Unknown key identifier",
        "205": "Duplicate key identifier",
        "206": "Application record locked",
        "207": "Application internal error",
    }


class HmsAchError(Exception):
    """Base of every error raised on purpose by hms-ach."""


@dataclass
class SourcePosition:
    """A position in a text file, 1-based like editors show it."""

    file: str
    line: int = 0
    column: int = 0

    def __str__(self) -> str:
        if self.line:
            return f"{self.file}:{self.line}:{self.column or 1}"
        return self.file


class ConfigError(HmsAchError):
    """A configuration, mapping or code-table file is wrong.

    ``str()`` renders ``file:line:col: what (expected: ...)`` so that editors can jump to it.
    """

    def __init__(self, message: str, position: SourcePosition | None = None, expected: str | None = None):
        self.message = message
        self.position = position
        self.expected = expected
        super().__init__(self.render())

    def render(self) -> str:
        text = f"{self.position}: {self.message}" if self.position else self.message
        if self.expected:
            text += f" (expected {self.expected})"
        return text


class ConfigErrors(HmsAchError):
    """Several ConfigErrors found in one check; ``str()`` has one per line."""

    def __init__(self, errors: list[ConfigError]):
        self.errors = errors
        super().__init__("\n".join(e.render() for e in errors))


class MessageError(HmsAchError):
    """An inbound message cannot be accepted as it is.

    ``location`` is an HL7 location such as ``PID-8`` or ``MSH-9.2`` (ERR-2), ``code`` a table
    0357 code (ERR-3).
    """

    ack_code = "AE"

    def __init__(self, message: str, location: str = "", code: str = Err0357.INTERNAL_ERROR):
        self.message = message
        self.location = location
        self.code = code
        super().__init__(f"{location}: {message}" if location else message)


class RejectError(MessageError):
    """Unusable header, or an unsupported message type, event, version or processing id: AR."""

    ack_code = "AR"


class ContentError(MessageError):
    """The message is readable but its content breaks a rule: AE."""

    ack_code = "AE"


class MappingError(ContentError):
    """A mapping rule failed on this message (required field missing, unmapped code, bad value)."""
