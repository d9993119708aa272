"""``hms-ach mapping coverage``: which populated HL7 fields of the samples no mapping reads.

Each sample is mapped with position tracing on. A populated component (``PID-10.1``) counts as used
when the mapping read it, or read its whole field as a value (``PID-8``) without reading any of
its components one by one. What is left is what the mappings drop.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from hms_ach.core.hl7message import Hl7Message
from hms_ach.mapping.engine import MappingEngine
from hms_ach.mapping.preview import field_name


def populated(msg: Hl7Message) -> set[str]:
    """Every non-empty component position of ``msg`` (repetitions folded): ``PID-5.1``, ``PID-8``.

    MSH is left out: the engine itself reads it (routing, de-duplication, the ACK).
    """
    out: set[str] = set()
    for seg in msg.segments:
        if seg.name == "MSH":
            continue
        for n in range(1, len(seg.fields)):
            if seg.name == "MSH" and n in (1, 2):
                continue
            for rep in seg.repetitions(n):
                parts = rep.split(seg.seps.component)
                if len(parts) == 1:
                    if parts[0]:
                        out.add(f"{seg.name}-{n}")
                    continue
                for c, comp in enumerate(parts, start=1):
                    if comp:
                        out.add(f"{seg.name}-{n}.{c}")
    return out


def unused(msg: Hl7Message, seen: set[str]) -> set[str]:
    field_reads = {s for s in seen if "." not in s.split("-", 1)[-1]}
    component_reads = {s.split(".")[0] for s in seen if "." in s.split("-", 1)[-1]}
    out = set()
    for pos in populated(msg):
        base = pos.split(".")[0]
        if pos in seen or any(s.startswith(pos + ".") for s in seen):
            continue
        if base in field_reads and base not in component_reads:
            continue
        out.add(pos)
    return out


@dataclass
class Coverage:
    samples: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)

    def add(self, engine: MappingEngine, msg: Hl7Message) -> None:
        seen: set[str] = set()
        self.samples += 1
        engine.map_message(msg, seen=seen)
        self.dropped.update(unused(msg, seen))

    def to_text(self, version: str = "2.5") -> str:
        if not self.dropped:
            return f"{self.samples} sample(s): every populated field is used by a mapping"
        lines = [f"{self.samples} sample(s); populated but used by no mapping (position, samples, name):"]

        def order(pos: str) -> tuple[str, int, int]:
            seg, rest = pos.split("-", 1)
            num, _, comp = rest.partition(".")
            return seg, int(num), int(comp or 0)

        for pos in sorted(self.dropped, key=order):
            seg, rest = pos.split("-", 1)
            _, name = field_name(version, seg, int(rest.split(".")[0]))
            lines.append(f"  {pos:12} {self.dropped[pos]:>3}  {name}")
        for err in self.errors:
            lines.append(f"  (not mapped) {err}")
        return "\n".join(lines)
