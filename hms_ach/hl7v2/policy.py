"""What an HL7 v2 channel accepts, and when it answers: the one place for the HL7 defaults.

* **Acceptance** (:meth:`Hl7Policy.check`): MSH-10 and MSH-9 must be set, MSH-12 must be one of the
  accepted versions (``2.5`` also accepts ``2.5.1``), MSH-11 one of the accepted processing ids.
  A header that fails is a :class:`~hms_ach.core.errors.RejectError` (AR) naming the field.
* **ACK modes** (HL7 table 0008; see ``docs/hl7-acks.md``): original mode (MSH-15 and MSH-16
  empty) always answers with one ACK, AA, AE or AR, which is the application ACK. Enhanced mode
  (MSH-15 or MSH-16 set) answers with up to two: the commit (accept) ACK, CA when the message is
  stored, CR when it is refused before processing (an unacceptable header, an unsupported type, a
  reused control id, too big) and CE when it could not be stored (send it again); then, for a
  message that was not refused, the application ACK, AA or AE. Each is sent as its own field says
  (:func:`should_send_commit`: MSH-15, :func:`should_send_application`: MSH-16): AL always, NE
  never, ER on error only, SU on success only. The standard requires both fields in enhanced mode;
  when one is empty, an empty MSH-15 counts as AL (every MLLP sender waits for a first ACK) and an
  empty MSH-16 as NE (an application ACK nobody waits for would be read as the next message's).
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
        if not header.version:
            raise RejectError(
                f"MSH-12 version id is empty (channel {self.channel} accepts {', '.join(self.versions)})",
                "MSH-12",
                Err0357.REQUIRED_FIELD_MISSING,
            )
        if not version_accepted(header.version, self.versions):
            raise RejectError(
                f"version {header.version} is not accepted by channel {self.channel} "
                f"(accepts {', '.join(self.versions)})",
                "MSH-12",
                Err0357.UNSUPPORTED_VERSION,
            )
        if not header.processing_id:
            raise RejectError(
                f"MSH-11 processing id is empty (accepts {', '.join(self.processing_ids)})",
                "MSH-11",
                Err0357.REQUIRED_FIELD_MISSING,
            )
        if header.processing_id not in self.processing_ids:
            raise RejectError(
                f"processing id {header.processing_id} is not accepted "
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
    """MSA-1 for ``code`` (AA/AE/AR), the commit codes CA/CE/CR in enhanced mode: the answer
    built without a stored message (CE: the store could not commit it)."""
    return _ENHANCED[code] if header is not None and header.enhanced_mode else code


def should_send(header: MshHeader, code: str) -> bool:
    """Enhanced mode honours MSH-15 (AL/NE/ER/SU); original mode always answers."""
    if not header.enhanced_mode:
        return True
    return ack_condition_met(header.accept_ack_type, code == "AA")


def ack_condition_met(condition: str, success: bool) -> bool:
    """Whether an ACK is sent under ``condition`` (HL7 table 0155: AL, NE, ER, SU; empty or
    unknown counts as AL) for an outcome that is a ``success`` or not."""
    value = condition.strip().upper()
    if value == "NE":
        return False
    if value == "ER":
        return not success
    if value == "SU":
        return success
    return True


def commit_code(header: MshHeader | None, code: str) -> str:
    """MSA-1 of the first ACK for a stored message whose outcome is ``code`` (AA/AE/AR).

    Original mode: ``code`` itself (the one ACK is the application ACK). Enhanced mode: CR for a
    message refused before processing (AR), otherwise CA: a message with a content error (AE) was
    committed to safe storage all the same, and its error goes in the application ACK."""
    if header is None or not header.enhanced_mode:
        return code
    return "CR" if code == "AR" else "CA"


def application_code(header: MshHeader | None, code: str) -> str | None:
    """MSA-1 of the application ACK (AA/AE) of a message whose outcome is ``code``; None in original
    mode (the one ACK is the application ACK) and for a message refused at commit (AR -> CR)."""
    if header is None or not header.enhanced_mode or code == "AR":
        return None
    return code


def should_send_commit(header: MshHeader | None, ack_code: str) -> bool:
    """Whether the first ACK (MSA-1 ``ack_code``) is sent: always in original mode and for an
    unreadable header; in enhanced mode as MSH-15 says (success: CA)."""
    if header is None or not header.enhanced_mode:
        return True
    return ack_condition_met(header.accept_ack_type, ack_code in ("CA", "AA"))


def should_send_application(header: MshHeader | None, app_code: str | None) -> bool:
    """Whether the application ACK (MSA-1 ``app_code``, None: there is none) is sent: as MSH-16
    says (success: AA; empty: NE); never in original mode."""
    if header is None or app_code is None or not header.enhanced_mode:
        return False
    if not header.application_ack_type.strip():
        return False
    return ack_condition_met(header.application_ack_type, app_code == "AA")
