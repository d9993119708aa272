"""``hms-ach corpus-check DIR``: every HL7 v2 message under a folder through parse -> ACK -> map.

Nothing is stored and nothing goes over the network. For each message type the table counts the
ACK codes and splits the rejections in two:

* **unsupported** - refused by design: a message type, trigger event, processing id or version the
  engine's mappings and policy do not accept (ERR-3 codes 200-203 of HL7 table 0357), or any
  rejection of a message type no mapping takes. Adding a mapping (or widening the policy) is what
  would change it.
* **content** - the message is of a kind the engine takes, but its content is wrong or incomplete: a
  required field missing, a code not in its table, a bad date, a malformed header.

``--list`` prints one line per rejected message (file, position in the file, type, ACK code, class
and reason) so each can be looked at; ``--json`` prints every message as one JSON object per line.
Reasons show positions and rule texts; quoted values are elided, so no field value is printed.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from hms_ach.app.cli_common import ConfigOpt, progress
from hms_ach.app.cli_common import load_or_exit as _load
from hms_ach.app.config import Config
from hms_ach.core.errors import ConfigErrors, Err0357

#: ERR-3 codes that mean "not a kind of message this engine takes" rather than "bad content".
UNSUPPORTED_CODES = frozenset(
    {
        Err0357.UNSUPPORTED_MESSAGE_TYPE,
        Err0357.UNSUPPORTED_EVENT,
        Err0357.UNSUPPORTED_PROCESSING_ID,
        Err0357.UNSUPPORTED_VERSION,
    }
)


@dataclass(frozen=True)
class Checked:
    """The outcome of one message of the corpus."""

    file: str
    index: int  # 1-based position of the message in its file
    message_type: str
    ack: str  # AA, AE or AR
    rejection: str  # "" (accepted), "unsupported" or "content"
    reason: str = ""


@dataclass
class Tally:
    """Everything counted over a run."""

    files: int = 0
    counts: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    reasons: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    checked: list[Checked] = field(default_factory=list)
    crashes: list[str] = field(default_factory=list)

    def add(self, item: Checked) -> None:
        self.checked.append(item)
        row = self.counts[item.message_type]
        row[item.ack] += 1
        if item.rejection:
            row[item.rejection] += 1
            self.reasons[item.message_type][item.reason] += 1

    def totals(self) -> Counter[str]:
        total = Counter[str]()
        for row in self.counts.values():
            total.update(row)
        return total


def rejection_class(code: str, message_code: str, mapped_codes: frozenset[str]) -> str:
    """``unsupported`` for the table 0357 codes of a refused kind of message, or for any rejection of
    a message type no mapping takes (a better header would not get it in); else ``content``."""
    if code in UNSUPPORTED_CODES or (message_code and message_code not in mapped_codes):
        return "unsupported"
    return "content"


def corpus_check(
    directory: Annotated[
        Path, typer.Argument(help="folder searched for *.hl7 files", exists=True, file_okay=False)
    ],
    config: ConfigOpt = Path("channels.yaml"),
    top: Annotated[int, typer.Option(help="reasons shown per message type")] = 3,
    listing: Annotated[
        bool, typer.Option("--list", help="also print one line per rejected message, with its class")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="one JSON object per message instead of the table")
    ] = False,
) -> None:
    """Feed every *.hl7 file under DIRECTORY through parse -> ACK -> map, in-process, with no network.

    Rejections are classed as unsupported (a message type, event, processing id or version the
    engine does not take: by design) or content (a message the engine takes, with bad content)."""
    from hms_ach.hl7v2.policy import Hl7Policy
    from hms_ach.mapping.engine import MappingEngine
    from hms_ach.mapping.loader import load_mappings

    cfg = _load(config) if config.exists() else Config()
    try:
        engine = MappingEngine(load_mappings(cfg.mappings_dir), cfg.engine.timezone)
    except ConfigErrors as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from exc
    policy = Hl7Policy("corpus-check")
    tally = Tally()
    files = sorted(directory.rglob("*.hl7"))
    tally.files = len(files)
    with progress("corpus-check", len(files)) as advance:
        for path in files:
            advance(1)
            _check_file(path, path.relative_to(directory).as_posix(), engine, policy, tally)
    if as_json:
        for item in tally.checked:
            typer.echo(json.dumps(asdict(item)))
    else:
        _report(directory, tally, top, listing)
    raise typer.Exit(1 if tally.crashes else 0)


def _check_file(path: Path, name: str, engine: Any, policy: Any, tally: Tally) -> None:
    """Run one file's messages through parse -> ACK -> map, adding each outcome to ``tally``."""
    from hms_ach.core.errors import MessageError
    from hms_ach.hl7v2.client import split_messages
    from hms_ach.ingest.pipeline import ack_for, evaluate

    mapped_codes = frozenset(engine.mset.supported_message_codes())
    data = path.read_bytes()
    try:
        chunks = split_messages(data) or [data]
    except MessageError:
        chunks = [data]  # not a clean message stream: the whole file is one (rejected) message
    except Exception as exc:  # noqa: BLE001 - reported as a crash
        tally.crashes.append(f"{name}: split: {type(exc).__name__}")
        return
    for index, raw in enumerate(chunks, start=1):
        try:
            ev = evaluate(raw, policy, engine)
            if ev.crashed:
                tally.crashes.append(f"{name}#{index}: {_reason(ev.error)}")
            code = "AA" if ev.error is None else (ev.error.ack_code if ev.header else "AR")
            ack_for(ev, code, ev.error)
        except Exception as exc:  # noqa: BLE001 - a crash is what this command looks for
            tally.crashes.append(f"{name}#{index}: {type(exc).__name__}")
            continue
        mtype = (ev.header.message_type if ev.header else "") or "(no MSH)"
        if ev.error is None:
            tally.add(Checked(name, index, mtype, code, ""))
        else:
            message_code = ev.header.message_code if ev.header else ""
            kind = rejection_class(ev.error.code, message_code, mapped_codes)
            tally.add(Checked(name, index, mtype, code, kind, _reason(ev.error)))


def _reason(error: Any) -> str:
    """The error's position and text with quoted values and long numbers elided (no field values)."""
    text = f"{error.location}: {error.message}" if error.location else error.message
    text = re.sub(r"'[^']*'", "'…'", text)
    text = re.sub(r"\d{3,}", "N", text)
    return text[:90]


def _report(directory: Path, tally: Tally, top: int, listing: bool) -> None:
    typer.echo(f"{tally.files} files, {len(tally.checked)} messages under {directory}\n")
    head = f"{'message type':16} {'AA':>5} {'AE':>5} {'AR':>5} {'unsup':>6} {'content':>7}"
    typer.echo(f"{head}  commonest reasons")
    for mtype in sorted(
        tally.counts, key=lambda t: (-sum(tally.counts[t][a] for a in ("AA", "AE", "AR")), t)
    ):
        c = tally.counts[mtype]
        common = "; ".join(f"{r} (x{n})" for r, n in tally.reasons[mtype].most_common(top))
        row = (
            f"{mtype[:16]:16} {c['AA']:>5} {c['AE']:>5} {c['AR']:>5} {c['unsupported']:>6} {c['content']:>7}"
        )
        typer.echo(f"{row}  {common}")
    t = tally.totals()
    typer.echo(f"{'total':16} {t['AA']:>5} {t['AE']:>5} {t['AR']:>5} {t['unsupported']:>6} {t['content']:>7}")
    typer.echo(
        f"\nrejected: {t['unsupported']} unsupported by design (type, event, processing id or version "
        f"not taken), {t['content']} content errors"
    )
    if listing:
        typer.echo("\nrejected messages (file#position  type  ACK  class  reason):")
        for item in tally.checked:
            if item.rejection:
                where = f"{item.file}#{item.index}"
                typer.echo(f"  {where}  {item.message_type}  {item.ack}  {item.rejection}  {item.reason}")
    typer.echo(f"\ncrashes: {len(tally.crashes)}")
    for line in tally.crashes[:50]:
        typer.echo(f"  {line}")
