"""HL7 v2 acknowledgements: ACK text for an outcome, in original or enhanced mode.

* Original mode (MSH-15 and MSH-16 empty): MSA-1 is AA, AE or AR (HL7 table 0008).
* Enhanced mode (MSH-15 or MSH-16 set): the commit ACK we send is CA, CE or CR, and MSH-15
  (AL always, NE never, ER on error only, SU on success only) decides whether it is sent at all
  (:mod:`hms_ach.hl7v2.policy` holds these rules).
* Errors carry an ERR segment: ERR-2 location (ERL), ERR-3 code from table 0357, ERR-4 severity,
  ERR-8 the text for a person; before v2.5 the location and code go in ERR-1 (ELD) instead.
* ``fallback_ack`` builds an AR for a message whose MSH cannot be read; it cannot fail.
"""

from __future__ import annotations

import itertools
import os
import re
import time
from datetime import datetime

from hms_ach.core.errors import Err0357, MessageError
from hms_ach.core.hl7message import MshHeader, Separators
from hms_ach.hl7v2.policy import ack_code_for

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


def err_segment(error: MessageError, seps: Separators, version: str) -> str:
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
    return fs.join(["ERR", "", erl, hl7_code, "E", "", "", "", message])


def build_ack(header: MshHeader, code: str, error: MessageError | None = None) -> str:
    """The ACK (CR-separated, no MLLP framing) answering ``header`` with ``code`` (AA/AE/AR)."""
    seps = header.separators
    fs = seps.field
    ack_code = ack_code_for(header, code)
    version = header.get(12) or "2.5.1"
    event = header.trigger_event
    msh_9 = seps.component.join(["ACK", event, "ACK"]) if event else "ACK"
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
        ]
    )
    msa_text = escape(error.message, seps)[:80] if error else ""
    msa = fs.join(["MSA", ack_code, header.control_id] + ([msa_text] if msa_text else []))
    segments = [msh, msa]
    if error is not None:
        segments.append(err_segment(error, seps, header.version))
    return "\r".join(segments) + "\r"


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
