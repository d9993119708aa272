"""HL7 v2 acknowledgements: ACK text for an outcome, in original or enhanced mode.

* Original mode (MSH-15 and MSH-16 empty): one ACK, MSA-1 AA, AE or AR (HL7 table 0008); it is
  the application ACK.
* Enhanced mode (MSH-15 or MSH-16 set), :func:`acknowledge`: the commit ACK (CA, or CR for a
  message refused before processing) and, unless refused, the application ACK (AA or AE, with the
  ERR), a message of its own: MSH-9 ``ACK^<trigger>^ACK``, its own MSH-10, MSA-2 the original
  MSH-10, and MSH-15/16 ``NE``/``NE`` (an ACK is never acknowledged). MSH-15 and MSH-16 decide
  which of them is sent (:mod:`hms_ach.hl7v2.policy` holds these rules). A store that cannot
  commit answers CE (:func:`build_ack` with AE).
* Errors carry an ERR segment: ERR-2 location (ERL), ERR-3 code from table 0357, ERR-4 severity,
  ERR-8 the text for a person; before v2.5 the location and code go in ERR-1 (ELD) instead.
* ``fallback_ack`` builds an AR for a message whose MSH cannot be read; it cannot fail.
* Master files (chapter 8): an MFN whose MFI-6 response level is AL or ER (:func:`master_file`) is
  answered with an MFK instead of the ACK (the application ACK in enhanced mode): MSH-9
  ``MFK^<trigger>^MFK_M01``, MSA, ERR, the MFN's MFI, and one MFA per MFE (AL: every one; ER: only
  those not posted). MFA-1 and MFA-2 echo MFE-1 (record-level event) and MFE-2 (MFN control id),
  MFA-3 is the completion time, MFA-4 the status of table 0181 (S posted, U not posted), MFA-5 and
  MFA-6 echo MFE-4 and MFE-5 (the primary key and its type). A message is committed whole, so its
  entries are all S (AA) or all U (AE, AR).
"""

from __future__ import annotations

import itertools
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from hms_ach.core.errors import Err0357, MessageError
from hms_ach.core.hl7message import Hl7Message, MshHeader, Separators
from hms_ach.hl7v2.policy import (
    ack_code_for,
    application_code,
    commit_code,
    should_send_application,
    should_send_commit,
)

_counter = itertools.count(1)
_prefix = f"{os.getpid() % 100000:05d}"


def _ack_control_id() -> str:
    return f"A{int(time.time() * 1000) % 10**12:012d}{_prefix}{next(_counter) % 10**6:06d}"


def _timestamp() -> str:
    return datetime.now().astimezone().strftime("%Y%m%d%H%M%S%z")


def escape(text: str, seps: Separators) -> str:
    """Escape ``text`` so it can sit in one HL7 field component."""
    out = text.replace(seps.escape, f"{seps.escape}E{seps.escape}")
    for char, code in (
        (seps.field, "F"),
        (seps.component, "S"),
        (seps.subcomponent, "T"),
        (seps.repetition, "R"),
    ):
        out = out.replace(char, f"{seps.escape}{code}{seps.escape}")
    return out.replace("\r", " ").replace("\n", " ")


_LOCATION = re.compile(
    r"^(?P<seg>[A-Z][A-Z0-9]{2})(?:\[(?P<seq>\d+)\])?(?:-(?P<field>\d+)(?:\[(?P<rep>\d+)\])?"
    r"(?:\.(?P<comp>\d+))?(?:\.(?P<sub>\d+))?)?"
)


def location_parts(location: str) -> list[str]:
    """``PID[1]-3[2].1`` -> [PID, 1, 3, 2, 1, ''] (ERL components)."""
    m = _LOCATION.match(location or "")
    if not m:
        return []
    return [
        m["seg"],
        m["seq"] or "1",
        m["field"] or "",
        m["rep"] or ("1" if m["field"] else ""),
        m["comp"] or "",
        m["sub"] or "",
    ]


def _version_tuple(version: str) -> tuple[int, ...]:
    nums = re.findall(r"\d+", version or "")
    return tuple(int(n) for n in nums[:3]) or (2, 5)


def err_segment(error: MessageError, seps: Separators, version: str, severity: str = "E") -> str:
    """The ERR of ``error``; ``severity`` is ERR-4 (HL7 table 0516: E error, W warning)."""
    fs, cs, ss = seps.field, seps.component, seps.subcomponent
    code = error.code or Err0357.INTERNAL_ERROR
    code_text = Err0357.TEXT.get(code, "")
    message = escape(error.message, seps)[:500]
    parts = location_parts(error.location)
    if _version_tuple(version) < (2, 5):
        eld = cs.join(
            [*(parts[:3] if parts else ["", "", ""]), ss.join([code, escape(code_text, seps), "HL70357"])]
        )
        return fs.join(["ERR", eld])
    erl = cs.join(parts).rstrip(cs)
    hl7_code = cs.join([code, escape(code_text, seps), "HL70357"])
    # ERR-1 (empty) | ERR-2 location | ERR-3 code | ERR-4 severity | ERR-5..7 | ERR-8 user message
    return fs.join(["ERR", "", erl, hl7_code, severity, "", "", "", message])


#: MFI-6 response levels (HL7 table 0179) that ask for an MFK
MFK_LEVELS = ("AL", "ER")
#: HL7 table 0181, MFN record-level error return
_MFA_STATUS = {
    "S": "Successful posting of the record defined by the MFE segment",
    "U": "Unsuccessful posting of the record defined by the MFE segment",
}
#: an echoed MFI or MFE field is clipped to this many characters (an answer never reflects a flood)
_MAX_ECHO_CHARS = 200


@dataclass(frozen=True)
class MasterFileEntry:
    """What an MFA echoes of one MFE: MFE-1 event, MFE-2 control id, MFE-4 key, MFE-5 key type."""

    event: str
    control_id: str
    key: str
    key_type: str


@dataclass(frozen=True)
class MasterFile:
    """An MFN that asked for an MFK: its MFI segment (as sent), MFI-6, and its entries."""

    mfi: str
    response_level: str
    entries: tuple[MasterFileEntry, ...]


def master_file(message: Hl7Message) -> MasterFile | None:
    """The MFK request of ``message``: an MFN whose MFI-6 is AL or ER; None for anything else."""
    if message.header.message_code != "MFN":
        return None
    mfi = message.first("MFI")
    if mfi is None:
        return None
    level = mfi.field(6).split(mfi.seps.component)[0].strip().upper()
    if level not in MFK_LEVELS:
        return None
    fs = mfi.seps.field
    mfi_text = fs.join(["MFI", *(mfi.field(n)[:_MAX_ECHO_CHARS] for n in range(1, 7))])
    entries = tuple(
        MasterFileEntry(*(mfe.field(n)[:_MAX_ECHO_CHARS] for n in (1, 2, 4, 5))) for mfe in message.all("MFE")
    )
    return MasterFile(mfi_text, level, entries)


def mfk_message(
    header: MshHeader,
    ack_code: str,
    request: MasterFile,
    error: MessageError | None = None,
    application: bool = False,
    warnings: Sequence[MessageError] = (),
) -> str:
    """The MFK answering the MFN ``header``/``request`` with MSA-1 ``ack_code`` (AA, AE, AR)."""
    seps = header.separators
    fs, cs = seps.field, seps.component
    ack = ack_message(header, ack_code, error, application, message_code="MFK", warnings=warnings)
    status = "S" if ack_code in ("AA", "CA") else "U"
    done = _timestamp() if status == "S" else ""
    mfas = [
        fs.join(
            [
                "MFA",
                entry.event,
                entry.control_id,
                done,
                cs.join([status, escape(_MFA_STATUS[status], seps), "HL70181"]),
                entry.key,
                entry.key_type,
            ]
        ).rstrip(fs)
        for entry in request.entries
        if request.response_level == "AL" or status == "U"
    ]
    return ack + "\r".join([request.mfi, *mfas]) + "\r"


def build_ack(header: MshHeader, code: str, error: MessageError | None = None) -> str:
    """The ACK (CR-separated, no MLLP framing) answering ``header`` with ``code`` (AA/AE/AR): in
    enhanced mode the commit ACK CA/CE/CR (AE -> CE: not stored, send again)."""
    return ack_message(header, ack_code_for(header, code), error)


def ack_message(
    header: MshHeader,
    ack_code: str,
    error: MessageError | None = None,
    application: bool = False,
    message_code: str = "ACK",
    warnings: Sequence[MessageError] = (),
) -> str:
    """One ACK message answering ``header`` with MSA-1 ``ack_code`` and, for an error, its ERR.

    ``application``: an enhanced-mode application ACK, whose MSH-15 and MSH-16 are NE (the sender
    must not acknowledge it). ``message_code`` MFK: the MSH, MSA and ERR of an MFK (see
    :func:`mfk_message`). ``warnings``: one ERR of severity W each (the parts of a message stored
    without what a rule marked ``critical: false`` could not map)."""
    seps = header.separators
    fs = seps.field
    version = header.get(12) or "2.5.1"
    event = header.trigger_event
    structure = "MFK_M01" if message_code == "MFK" else "ACK"
    msh_9 = seps.component.join([message_code, event, structure]) if event else message_code
    msh = fs.join(
        [
            "MSH",
            seps.encoding_characters,
            header.receiving_application,
            header.receiving_facility,
            header.sending_application,
            header.sending_facility,
            _timestamp(),
            "",
            msh_9,
            _ack_control_id(),
            header.get(11) or "P",
            version,
            *(["", "", "NE", "NE"] if application else []),
        ]
    )
    msa_text = escape(error.message, seps)[:80] if error else ""
    msa = fs.join(["MSA", ack_code, header.control_id] + ([msa_text] if msa_text else []))
    segments = [msh, msa]
    if error is not None:
        segments.append(err_segment(error, seps, header.version))
    segments.extend(err_segment(w, seps, header.version, "W") for w in warnings)
    return "\r".join(segments) + "\r"


@dataclass(frozen=True)
class Acks:
    """The answers to one message with a readable MSH, and which of them its MSH-15/16 ask for."""

    ack: str  #: the one ACK (original mode) or the commit ACK (enhanced mode)
    ack_code: str  #: its MSA-1: AA/AE/AR, or CA/CR
    send: bool  #: original mode: always; enhanced mode: as MSH-15 says
    app_ack: str | None = None  #: enhanced mode, unless refused at commit: the application ACK
    app_code: str | None = None  #: its MSA-1: AA or AE (AR: refused, and MSH-15 suppressed the CR)
    app_send: bool = False  #: as MSH-16 says

    @property
    def result_code(self) -> str:
        """The code that says what became of the message: the application ACK's, else the first's."""
        return self.app_code or self.ack_code

    @property
    def text(self) -> str:
        """Both ACKs as stored with the message (one after the other; :func:`split_acks` parts them)."""
        return self.ack + (self.app_ack or "")


def acknowledge(
    header: MshHeader,
    code: str,
    error: MessageError | None = None,
    request: MasterFile | None = None,
    warnings: Sequence[MessageError] = (),
) -> Acks:
    """The ACKs answering a stored message whose outcome is ``code`` (AA/AE/AR) with ``error``.

    Original mode: one ACK, ``code``, with the ERR. Enhanced mode: the commit ACK (CA; CR with the
    ERR for AR) and, unless refused, the application ACK (AA; AE with the ERR); a refused message
    whose MSH-15 suppresses the CR gets an application ACK AR with the ERR instead. Each is built
    whether or not it is sent, so that a resend is answered from what was stored. ``request``: an
    MFN that asked for an MFK (:func:`master_file`); the application answer is that MFK.
    ``warnings`` (a processed message, AA): an ERR of severity W each, on the application answer."""
    first = commit_code(header, code)
    app = application_code(header, code)
    if app is None and first == "CR" and not should_send_commit(header, first):
        # Refused, and MSH-15 (NE, SU) wants no CR: were the application ACK left out too, a sender
        # waiting for the one MSH-16 asked for (AL, ER) would never learn of the refusal. It says AR.
        app = "AR"
    original = app is None and first in ("AA", "AE", "AR")
    if request is not None and original:
        ack = mfk_message(header, first, request, error, warnings=warnings)
    else:
        ack = ack_message(
            header, first, error if app is None else None, warnings=warnings if original else ()
        )
    if app is None:
        app_ack = None
    elif request is not None:
        app_ack = mfk_message(header, app, request, error, application=True, warnings=warnings)
    else:
        app_ack = ack_message(header, app, error, application=True, warnings=warnings)
    return Acks(
        ack,
        first,
        should_send_commit(header, first),
        app_ack,
        app,
        should_send_application(header, app),
    )


def split_acks(text: str) -> list[str]:
    """The ACK messages of a stored answer (each starts with MSH): [ack] or [commit, application]."""
    parts: list[str] = []
    for segment in text.split("\r"):
        if not segment:
            continue
        if segment.startswith("MSH") or not parts:
            parts.append("")
        parts[-1] += segment + "\r"
    return parts


def msa_code(ack: str) -> str:
    """MSA-1 of one ACK message ('' when it has no MSA)."""
    for segment in ack.split("\r"):
        if segment.startswith("MSA") and len(segment) > 3:
            fields = segment.split(segment[3])
            return fields[1] if len(fields) > 1 else ""
    return ""


_CONTROL_ID = re.compile(rb"^MSH(.)")


def fallback_ack(raw: bytes, error: MessageError) -> str:
    """An AR for a message whose MSH is unusable. Echoes whatever MSH-10 can be read; never raises."""
    control_id = ""
    sending_app = sending_fac = recv_app = recv_fac = ""
    try:
        m = _CONTROL_ID.match(raw.lstrip(b"\r\n \t\x0b"))
        if m and not m.group(1).isalnum():
            fs = m.group(1)
            first = re.split(rb"\r\n|\r|\n", raw.lstrip(b"\r\n \t\x0b"), maxsplit=1)[0]
            parts = [p.decode("latin-1") for p in first.split(fs)]

            # parts[0]=MSH, parts[1]=MSH-2, parts[n-1]=MSH-n
            def get(n: int) -> str:
                return parts[n - 1] if n - 1 < len(parts) else ""

            control_id, sending_app, sending_fac = get(10), get(3), get(4)
            recv_app, recv_fac = get(5), get(6)
    except Exception:  # noqa: BLE001 - the fallback must never fail
        pass
    seps = Separators()

    def clean(value: str) -> str:
        return escape(re.sub(r"[\x00-\x1f]", "", value), seps)[:100]

    msh = "|".join(
        [
            "MSH",
            "^~\\&",
            clean(recv_app),
            clean(recv_fac),
            clean(sending_app),
            clean(sending_fac),
            _timestamp(),
            "",
            "ACK",
            _ack_control_id(),
            "P",
            "2.5.1",
        ]
    )
    msa = "|".join(["MSA", "AR", clean(control_id), escape(error.message, seps)[:80]])
    return "\r".join([msh, msa, err_segment(error, seps, "2.5.1")]) + "\r"
