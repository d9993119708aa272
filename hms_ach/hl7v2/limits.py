"""Limits on what an HL7 v2 message may hold before anything of it is mapped or stored.

A message that breaks one of these is answered at once, naming the field or the cap, instead of
being mapped (a 200,000-repetition PID-3 would otherwise become 200,000 identifiers and index
rows) or failing inside the database (PostgreSQL refuses NUL characters in text and btree rows
over about 2.7 kB; SQLite takes both). The checks run the same way whatever the database, so a
message gets the same answer on SQLite and on PostgreSQL:

* **the header** (:func:`check_header`, AR): MSH-3 and MSH-4 at most :data:`MAX_APPLICATION_CHARS`
  characters, MSH-10 at most :data:`MAX_CONTROL_ID_CHARS`, and none of them with a NUL character.
  These three make the message's idempotency key (a unique index), so they are fixed, not settings.
* **the structure** (:func:`check_structure`, AR, ERR-3 104): at most
  :attr:`Hl7LimitSettings.max_segments_per_message` segments and
  :attr:`Hl7LimitSettings.max_repetitions_per_field` repetitions in any one field. Counted on the
  decoded text before it is split, in linear time.
* **NUL characters** (:func:`check_message`, AE, ERR-3 102): a NUL byte anywhere in a field, or one
  that an escape (``\\X00\\``, ``\\X4100\\``...) would produce, is refused with ERR-2 naming the
  field, repetition and component (``PID-5.1``, ``PID-3[2].1``). This is the one place NUL is handled for HL7 v2.
* **the records** (:attr:`Hl7LimitSettings.max_record_bytes`, checked by the pipeline on the mapped
  records, AE 104): the JSON of one record may not exceed it; a business identifier longer than
  :data:`MAX_IDENTIFIER_CHARS` (the key columns) is refused too (AE 104, naming the field).

:class:`Hl7LimitSettings` are the settings as they appear in ``channels.yaml`` for every channel
that takes HL7 v2 (``mllp``, ``file_drop``); the channel's :class:`LimitedPolicy` carries them to
the pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from pydantic import ConfigDict, Field

from hms_ach.core.errors import ContentError, Err0357, RejectError
from hms_ach.core.hl7message import Hl7Message, MshHeader, Segment
from hms_ach.hl7v2.policy import Hl7Policy, Hl7PolicySettings

#: MSH-10 (message control id) longest length, in characters (HL7 v2.7 length of MSH-10).
MAX_CONTROL_ID_CHARS = 199
#: MSH-3 and MSH-4 (sending application and facility, HD) longest length, in characters.
MAX_APPLICATION_CHARS = 227
#: Longest business identifier (system or value) of a record: the width of the key columns.
MAX_IDENTIFIER_CHARS = 255

DEFAULT_MAX_SEGMENTS = 10_000
DEFAULT_MAX_REPETITIONS = 1_000
DEFAULT_MAX_RECORD_BYTES = 1_048_576


@dataclass(frozen=True)
class Hl7Limits:
    """The caps one channel applies (see :class:`Hl7LimitSettings` for their meaning)."""

    max_segments_per_message: int = DEFAULT_MAX_SEGMENTS
    max_repetitions_per_field: int = DEFAULT_MAX_REPETITIONS
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES


DEFAULT_LIMITS = Hl7Limits()


@dataclass
class LimitedPolicy(Hl7Policy):
    """An :class:`Hl7Policy` that also carries the channel's :class:`Hl7Limits`."""

    limits: Hl7Limits = field(default_factory=Hl7Limits)


def limits_of(policy: Hl7Policy) -> Hl7Limits:
    """The limits of the channel whose policy is ``policy`` (the defaults when it states none)."""
    return policy.limits if isinstance(policy, LimitedPolicy) else DEFAULT_LIMITS


class Hl7LimitSettings(Hl7PolicySettings):
    """The ``channels.yaml`` caps of a channel that takes HL7 v2 messages."""

    model_config = ConfigDict(extra="forbid")

    max_segments_per_message: int = Field(
        DEFAULT_MAX_SEGMENTS,
        ge=1,
        description="Most segments one message may have; more: AR with ERR-3 104 naming the cap",
    )
    max_repetitions_per_field: int = Field(
        DEFAULT_MAX_REPETITIONS,
        ge=1,
        description="Most repetitions one field may have (e.g. PID-3); more: AR with ERR-3 104 naming "
        "the field and the cap",
    )
    max_record_bytes: int = Field(
        DEFAULT_MAX_RECORD_BYTES,
        ge=1024,
        description="Largest record (its JSON, in bytes) one message may write; larger: AE with "
        "ERR-3 104 naming the record",
    )

    def hl7_limits(self) -> Hl7Limits:
        return Hl7Limits(self.max_segments_per_message, self.max_repetitions_per_field, self.max_record_bytes)

    def hl7_policy(self, channel: str) -> Hl7Policy:
        base = super().hl7_policy(channel)
        values = {f.name: getattr(base, f.name) for f in fields(base) if f.init}
        return LimitedPolicy(**values, limits=self.hl7_limits())


# ---------------------------------------------------------------------------- the checks
def check_header(header: MshHeader) -> None:
    """Raise RejectError (AR) when MSH-3, MSH-4 or MSH-10 cannot be part of a stored key."""
    for n, name, most in (
        (3, "sending application", MAX_APPLICATION_CHARS),
        (4, "sending facility", MAX_APPLICATION_CHARS),
        (10, "message control id", MAX_CONTROL_ID_CHARS),
    ):
        value = header.get(n)
        if "\x00" in value:
            raise RejectError(
                f"MSH-{n} {name} contains a NUL character (0x00)", f"MSH-{n}", Err0357.DATA_TYPE_ERROR
            )
        if len(value) > most:
            raise RejectError(
                f"MSH-{n} {name} is {len(value)} characters long; at most {most} are accepted",
                f"MSH-{n}",
                Err0357.VALUE_TOO_LONG,
            )


def check_structure(text: str, header: MshHeader, limits: Hl7Limits) -> None:
    """Raise RejectError (AR, ERR-3 104) when the decoded ``text`` has more segments or more
    repetitions in one field than ``limits`` allow. Linear in the text; nothing is split unless
    the repetition separator occurs more often than the cap in the whole message."""
    segments = text.count("\r") + text.count("\n") - text.count("\r\n") + 1
    if segments > limits.max_segments_per_message:
        raise RejectError(
            f"the message has more than {limits.max_segments_per_message} segments "
            f"(max_segments_per_message)",
            "MSH",
            Err0357.VALUE_TOO_LONG,
        )
    seps = header.separators
    cap = limits.max_repetitions_per_field
    if text.count(seps.repetition) < cap:
        return
    counts: dict[str, int] = {}
    for line in text.replace("\r\n", "\r").replace("\n", "\r").split("\r"):
        name = line[:3]
        counts[name] = counts.get(name, 0) + 1
        if line.count(seps.repetition) < cap:
            continue
        parts = line.split(seps.field)
        for i, value in enumerate(parts):
            if value.count(seps.repetition) >= cap:
                n = i + 1 if name == "MSH" else i
                if name == "MSH" and n == 2:
                    continue  # MSH-2 holds the repetition separator itself
                where = f"{name}[{counts[name]}]-{n}" if counts[name] > 1 else f"{name}-{n}"
                raise RejectError(
                    f"{where} has more than {cap} repetitions (max_repetitions_per_field)",
                    where,
                    Err0357.VALUE_TOO_LONG,
                )


def check_message(message: Hl7Message) -> None:
    """Raise ContentError (AE, ERR-3 102) naming the field and component when a value holds a NUL
    character, as sent or as an escape would decode it (``\\X00\\``)."""
    esc = message.separators.escape
    if "\x00" not in message.text and (esc + "X") not in message.text and (esc + "x") not in message.text:
        return
    counts: dict[str, int] = {}
    for seg in message.segments:
        counts[seg.name] = counts.get(seg.name, 0) + 1
        start = 3 if seg.name == "MSH" else 1
        for n in range(start, len(seg.fields)):
            where = _nul_in_field(seg, n)
            if where is not None:
                name = f"{seg.name}[{counts[seg.name]}]" if counts[seg.name] > 1 else seg.name
                raise ContentError(
                    f"{name}-{where} contains a NUL character (0x00), which cannot be stored",
                    f"{name}-{where}",
                    Err0357.DATA_TYPE_ERROR,
                )


def _nul_in_field(seg: Segment, n: int) -> str | None:
    """``n``, ``n.c`` or ``n.c.s`` of the first value of field ``n`` that holds or decodes to NUL."""
    value = seg.fields[n]
    seps = seg.seps
    if "\x00" not in value and (seps.escape + "X") not in value and (seps.escape + "x") not in value:
        return None
    reps = value.split(seps.repetition)
    for r, rep in enumerate(reps, 1):
        at = f"{n}[{r}]" if len(reps) > 1 else f"{n}"
        components = rep.split(seps.component)
        for c, comp in enumerate(components, 1):
            subs = comp.split(seps.subcomponent)
            for s, sub in enumerate(subs, 1):
                if _decodes_to_nul(seg, sub):
                    if len(subs) > 1:
                        return f"{at}.{c}.{s}"
                    return f"{at}.{c}" if len(components) > 1 else at
    return None


def _decodes_to_nul(seg: Segment, value: str) -> bool:
    if "\x00" in value:
        return True
    if seg.seps.escape not in value:
        return False
    try:
        return "\x00" in seg.unescape(value)
    except Exception:  # noqa: BLE001 - an escape the decoder cannot read is not a NUL
        return False
