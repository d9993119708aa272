"""What an HL7 v2 channel accepts, and when it answers: the one place for the HL7 defaults.

* **Acceptance** (:meth:`Hl7Policy.check`): MSH-10 and MSH-9 must be set, MSH-12 must be one of the
  accepted versions (``2.5`` also accepts ``2.5.1``), MSH-11 one of the accepted processing ids.
  A header that fails is a :class:`~hms_ach.core.errors.RejectError` (AR) naming the field.
* **ACK modes**: original mode (MSH-15 and MSH-16 empty) always answers AA, AE or AR (HL7 table
  0008); enhanced mode answers with the commit codes CA, CE or CR, sent as MSH-15 says (AL always,
  NE never, ER on error only, SU on success only).
* **A reused control id** (``on_reused_control_id``): a message whose MSH-3, MSH-4 and MSH-10 were
  stored before with *different* content (a true resend has the same content and gets the stored
  ACK) is ``reject``-ed (the default: AR with an ERR at MSH-10, code 205, stored for review and
  replay) or ``process``-ed as a new message (see :mod:`hms_ach.ingest.pipeline`).

:class:`Hl7PolicySettings` are the same settings as they appear in ``channels.yaml`` for every
channel that takes HL7 v2 (``mllp``, ``file_drop``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, TypeAlias

from pydantic import BaseModel, ConfigDict, Field

from hms_ach.core.errors import Err0357, RejectError
from hms_ach.core.hl7message import MshHeader

#: MSH-12 versions accepted unless a channel says otherwise.
DEFAULT_VERSIONS: tuple[str, ...] = ("2.1", "2.2", "2.3", "2.4", "2.5", "2.6", "2.7", "2.8")
#: MSH-11 processing ids accepted unless a channel says otherwise (production, training, debugging).
DEFAULT_PROCESSING_IDS: tuple[str, ...] = ("P", "T", "D")
#: The charset of a message whose MSH-18 is empty, unless a channel says otherwise.
DEFAULT_CHARSET = "utf-8"

#: What a channel does with a message reusing an earlier control id for different content.
ReusedControlId: TypeAlias = Literal["reject", "process"]

_ENHANCED = {"AA": "CA", "AE": "CE", "AR": "CR"}
_ORIGINAL = {v: k for k, v in _ENHANCED.items()}


def version_accepted(version: str, accepted: list[str] | tuple[str, ...]) -> bool:
    """``version`` is one of ``accepted``, or a sub-version of one (2.5.1 of 2.5)."""
    return any(version == v or version.startswith(v + ".") for v in accepted)


@dataclass
class Hl7Policy:
    """What a channel accepts, and how it reads text."""

    channel: str
    default_charset: str = DEFAULT_CHARSET
    versions: list[str] = field(default_factory=lambda: list(DEFAULT_VERSIONS))
    processing_ids: list[str] = field(default_factory=lambda: list(DEFAULT_PROCESSING_IDS))
    on_reused_control_id: ReusedControlId = "reject"

    def check(self, header: MshHeader) -> None:
        """Raise RejectError (AR) when ``header`` is not acceptable on this channel."""
        if not header.control_id:
            raise RejectError("MSH-10 message control id is empty", "MSH-10", Err0357.REQUIRED_FIELD_MISSING)
        if not header.message_code:
            raise RejectError("MSH-9 message type is empty", "MSH-9", Err0357.REQUIRED_FIELD_MISSING)
        if not version_accepted(header.version, self.versions):
            raise RejectError(
                f"version {header.version or '(empty)'} is not accepted by channel {self.channel} "
                f"(accepts {', '.join(self.versions)})",
                "MSH-12",
                Err0357.UNSUPPORTED_VERSION,
            )
        if header.processing_id not in self.processing_ids:
            raise RejectError(
                f"processing id {header.processing_id or '(empty)'} is not accepted "
                f"(accepts {', '.join(self.processing_ids)})",
                "MSH-11",
                Err0357.UNSUPPORTED_PROCESSING_ID,
            )


class Hl7PolicySettings(BaseModel):
    """The ``channels.yaml`` settings of a channel that takes HL7 v2 messages."""

    model_config = ConfigDict(extra="forbid")

    default_charset: str = Field(
        DEFAULT_CHARSET,
        description="Python codec for messages whose MSH-18 is empty (e.g. utf-8, latin-1, ascii)",
    )
    accept_versions: list[str] = Field(
        default_factory=lambda: list(DEFAULT_VERSIONS),
        description="MSH-12 versions accepted (2.5 also accepts 2.5.1); others get AR with code 203",
    )
    accept_processing_ids: list[str] = Field(
        default_factory=lambda: list(DEFAULT_PROCESSING_IDS),
        description="MSH-11 processing ids accepted; others get AR",
    )
    on_reused_control_id: ReusedControlId = Field(
        "reject",
        description="a message reusing a stored MSH-3/MSH-4/MSH-10 with different content: reject "
        "(AR, ERR MSH-10 code 205, stored for review and replay) or process (as a new message)",
    )

    def hl7_policy(self, channel: str) -> Hl7Policy:
        return Hl7Policy(
            channel,
            self.default_charset,
            list(self.accept_versions),
            list(self.accept_processing_ids),
            self.on_reused_control_id,
        )


def ack_code_for(header: MshHeader | None, code: str) -> str:
    """MSA-1 for ``code`` (AA/AE/AR): the commit codes CA/CE/CR in enhanced mode."""
    return _ENHANCED[code] if header is not None and header.enhanced_mode else code


def original_code(ack_code: str) -> str:
    """AA/AE/AR for a stored MSA-1 (CA -> AA ...); an empty code is AA."""
    return _ORIGINAL.get(ack_code, ack_code or "AA")


def should_send(header: MshHeader, code: str) -> bool:
    """Enhanced mode honours MSH-15 (AL/NE/ER/SU); original mode always answers."""
    if not header.enhanced_mode:
        return True
    accept = header.accept_ack_type.strip().upper()
    if accept == "NE":
        return False
    if accept == "ER":
        return code != "AA"
    if accept == "SU":
        return code == "AA"
    return True
