"""HL7 v2 ER7 reader: bytes in, a :class:`hms_ach.core.hl7message.Hl7Message` whose segments,
fields, repetitions and components are read with the standard's 1-based numbering.

Why not python-hl7's ``hl7.parse`` for the whole message: it builds five levels of container
objects for every field whether a mapping reads it or not. This reader splits segments and fields
eagerly and components only when asked. Separators can never appear inside an escaped value, so
splitting first and decoding escapes at the leaf is exact; the leaf decoder (``\\F\\ \\S\\ \\T\\
\\R\\ \\E\\ \\Xhh\\`` ...) is our own, one per set of encoding characters: it never raises, never logs
a value, and bounds what a repeat count can add.

Charsets follow MSH-18 (ASCII, 8859/n, UTF-8), with a per-channel default. Segment ends may be CR,
LF or CRLF (senders and files differ): all are read as CR.
"""

from __future__ import annotations

import re
from functools import lru_cache

from hms_ach.core.errors import ContentError, Err0357, RejectError
from hms_ach.core.hl7message import Hl7Message, MshHeader, Segment, Separators, Unescape

#: MSH-18 values (HL7 table 0211) -> Python codec.
CHARSETS: dict[str, str] = {
    "ASCII": "ascii",
    "ISO IR6": "ascii",
    "8859/1": "latin-1",
    "ISO IR100": "latin-1",
    "8859/2": "iso8859-2",
    "8859/5": "iso8859-5",
    "8859/7": "iso8859-7",
    "8859/9": "iso8859-9",
    "8859/15": "iso8859-15",
    "UNICODE UTF-8": "utf-8",
    "UTF-8": "utf-8",
    "ISO IR192": "utf-8",
    "UNICODE": "utf-8",
    "WINDOWS-1252": "cp1252",
}

_SEGMENT_END = re.compile(r"\r\n|\n|\r")
_SEGMENT_NAME = re.compile(r"^[A-Z][A-Z0-9]{2}$")
#: Segment ids already matched by _SEGMENT_NAME, looked up before the regular expression; only
#: valid ids are added, and at most 26 * 36 * 36 exist, so it stays small whatever is sent.
_VALID_NAMES: set[str] = set()


def read_header(raw: bytes) -> MshHeader:
    """Read MSH from the start of ``raw`` without trusting anything else in the message.

    Raises RejectError (-> AR) when there is no usable MSH.
    """
    head = raw.lstrip(b"\r\n \t\x0b")
    if not head.startswith(b"MSH"):
        raise RejectError("message does not start with an MSH segment", "MSH", Err0357.SEGMENT_SEQUENCE)
    ends = [i for i in (head.find(b"\r"), head.find(b"\n")) if i >= 0]
    line = head[: min(ends)].decode("latin-1") if ends else head.decode("latin-1")
    if len(line) < 8:
        raise RejectError(
            "MSH is truncated: the field separator and encoding characters are missing",
            "MSH-2",
            Err0357.REQUIRED_FIELD_MISSING,
        )
    fs = line[3]
    if fs.isalnum() or fs.isspace() or not fs.isprintable():
        raise RejectError(
            f"MSH-1 field separator {fs!r} is not a usable separator (a printable character that is "
            "not a letter, digit or space)",
            "MSH-1",
            Err0357.DATA_TYPE_ERROR,
        )
    enc = line[4:].split(fs, 1)[0]
    if (
        len(enc) < 4
        or len(set(enc[:4])) < 4
        or any(c.isalnum() or c.isspace() or not c.isprintable() or c == fs for c in enc[:4])
    ):
        raise RejectError(
            f"MSH-2 encoding characters {enc!r} are invalid: expected four distinct non-alphanumeric "
            "characters such as ^~\\&",
            "MSH-2",
            Err0357.DATA_TYPE_ERROR,
        )
    seps = Separators(fs, enc[0], enc[1], enc[2], enc[3])
    parts = line.split(fs)
    fields = ["MSH", fs] + parts[1:]
    return MshHeader(seps, fields)


def codec_for(header: MshHeader, default_charset: str = "utf-8") -> str:
    name = header.charset.strip().upper()
    if not name:
        return default_charset
    codec = CHARSETS.get(name)
    if codec is None:
        raise RejectError(
            f"MSH-18 character set {header.charset!r} is not supported; "
            f"supported: {', '.join(sorted(CHARSETS))}",
            "MSH-18",
            Err0357.DATA_TYPE_ERROR,
        )
    return codec


def decode(raw: bytes, header: MshHeader, default_charset: str = "utf-8") -> str:
    """Decode ``raw`` as MSH-18 says; invalid bytes are a content error naming where they are."""
    codec = codec_for(header, default_charset)
    try:
        return raw.decode(codec)
    except UnicodeDecodeError as exc:
        where = _locate_offset(raw, exc.start, header.separators.field)
        raise ContentError(
            f"byte 0x{raw[exc.start]:02x} at offset {exc.start} is not valid {codec} "
            f"(MSH-18 is {header.charset!r}"
            + (")" if header.charset else f", channel default {default_charset})"),
            where,
            Err0357.DATA_TYPE_ERROR,
        ) from exc


def _locate_offset(raw: bytes, offset: int, fs: str) -> str:
    before = raw[:offset].decode("latin-1")
    lines = _SEGMENT_END.split(before)
    current = lines[-1]
    name = current[:3]
    index = current.count(fs)
    if name == "MSH":
        index += 1
    same = sum(1 for seg in lines[:-1] if seg[:3] == name) + 1
    return f"{name}[{same}]-{index}" if same > 1 else f"{name}-{index}"


#: Text of the formatting escapes of HL7 v2 chapter 2 (``\\.br\\``...); a number after ``.sp``,
#: ``.in``, ``.ti`` or ``.sk`` repeats it (up to :data:`MAX_ESCAPE_REPEAT` times).
_FORMATTING = {
    ".br": "\r",
    ".sp": "\r",
    ".ce": "\r",
    ".fi": "",
    ".nf": "",
    ".in": "    ",
    ".ti": "    ",
    ".sk": " ",
}
#: The most times a formatting escape may repeat its text (``\\.sp5\\``): no escape can inflate a
#: value without bound.
MAX_ESCAPE_REPEAT = 100
_HEX = re.compile(r"^(?:[0-9A-Fa-f]{2})+$")


@lru_cache(maxsize=32)
def _unescaper(seps: Separators) -> Unescape:
    """The decoder of the escape sequences of one value, for one set of encoding characters.

    ``\\F\\ \\S\\ \\T\\ \\R\\ \\E\\`` give the separators, ``\\Xhh..\\`` the characters of its hex
    pairs, the formatting escapes their text; highlighting (``\\H\\ \\N\\``), character-set switches
    (``\\C..\\ \\M..\\``), local escapes (``\\Z..\\``), malformed hex and an unterminated escape are
    dropped. It never raises and never logs (python-hl7's decoder logs the field's value and a
    traceback on a malformed escape, and a repeat count could make it build a huge string)."""
    named = {
        "F": seps.field,
        "S": seps.component,
        "T": seps.subcomponent,
        "R": seps.repetition,
        "E": seps.escape,
    }
    esc = seps.escape

    def unescape(value: str) -> str:
        if esc not in value:
            return value
        parts = value.split(esc)
        out: list[str] = []
        # even parts are text, odd parts escape sequences; an even count of parts means the last
        # sequence has no closing escape character: it is dropped
        last = len(parts) if len(parts) % 2 else len(parts) - 1
        for i in range(last):
            part = parts[i]
            if i % 2 == 0:
                out.append(part)
            else:
                out.append(_sequence(part, named))
        return "".join(out)

    return unescape


def _sequence(seq: str, named: dict[str, str]) -> str:
    if seq in named:
        return named[seq]
    if seq[:1] in ("X", "x"):
        digits = seq[1:]
        if not _HEX.match(digits):
            return ""
        return "".join(chr(int(digits[i : i + 2], 16)) for i in range(0, len(digits), 2))
    text = _FORMATTING.get(seq[:3])
    if text is None:
        return ""
    count = seq[3:].strip()
    if not count:
        return text
    if not count.isdigit():
        return ""
    return text * min(int(count), MAX_ESCAPE_REPEAT)


__all__ = [
    "CHARSETS",
    "Hl7Message",
    "MshHeader",
    "Segment",
    "Separators",
    "codec_for",
    "decode",
    "parse",
    "parse_text",
    "read_header",
    "split_segments",
]


def split_segments(text: str) -> list[str]:
    """Segments of ``text``, ended by CR, LF or CRLF; blank lines are dropped."""
    parts = text.split("\r") if "\n" not in text else _SEGMENT_END.split(text)
    return [s for s in parts if s and not s.isspace()]


def parse_text(text: str, known: Separators | None = None) -> Hl7Message:
    """Parse already-decoded ER7 text (segments ended by CR, LF or CRLF).

    ``known``: the separators :func:`read_header` already accepted for this message's bytes; when
    the decoded MSH starts with the same five characters they are taken without reading MSH again
    (the checks would see the same characters)."""
    raw_segments = split_segments(text.lstrip("\x0b"))
    if not raw_segments or not raw_segments[0].startswith("MSH"):
        raise RejectError("message does not start with an MSH segment", "MSH", Err0357.SEGMENT_SEQUENCE)
    if known is not None and raw_segments[0][3:8] == known.field + known.encoding_characters:
        seps = known
    else:
        # the decoded MSH fields are kept below (read_header sees latin-1 bytes of the raw text)
        seps = read_header(raw_segments[0].encode("latin-1", errors="replace")).separators
    header = MshHeader(seps, ["MSH", seps.field] + raw_segments[0].split(seps.field)[1:])
    segments: list[Segment] = []
    unescape = _unescaper(seps)
    for i, seg_text in enumerate(raw_segments):
        parts = seg_text.split(seps.field)
        name = parts[0].strip()
        if name in _VALID_NAMES:
            pass
        elif _SEGMENT_NAME.match(name):
            _VALID_NAMES.add(name)
        else:
            raise ContentError(
                f"segment {i + 1} has no valid segment id (expected three capital letters or digits, "
                "the first a letter)",
                f"segment {i + 1}",
                Err0357.SEGMENT_SEQUENCE,
            )
        fields = ["MSH", seps.field] + parts[1:] if i == 0 else parts
        segments.append(Segment(name, fields, i, seps, unescape))
    return Hl7Message(header, segments, "\r".join(raw_segments))


def parse(raw: bytes, default_charset: str = "utf-8") -> Hl7Message:
    """Bytes -> message: MSH first (RejectError if unusable), then decode by MSH-18, then split."""
    header = read_header(raw)
    text = decode(raw, header, default_charset)
    return parse_text(text)
