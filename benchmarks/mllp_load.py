"""MLLP load driver, run in its own process: ``python -m benchmarks.mllp_load --port P ...``.

Opens ``--connections`` connections; each one sends its own census of messages (see
:class:`benchmarks.data.AdtStream`) the way real senders do: one message, then wait for its ACK,
then the next. Each repetition is bounded by a message count *and* a time limit, whichever comes
first. Prints one JSON object: per repetition the messages ACKed, msg/s, ACK latency percentiles
and the ACK codes seen (MSA-1).

Messages are generated before each repetition (as many as the previous repetition's rate says
will be needed), so generating them costs the measured run nothing; should a run outpace that
estimate, the rest are generated on the fly. With ``--cycle N`` (for the echo ceiling, which does
not care about duplicates) each connection repeats a pool of N messages instead.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import time
from collections import Counter, deque
from typing import Any

from benchmarks.data import AdtStream
from benchmarks.driver import StartLine, close_quietly, print_result, run_together
from benchmarks.stats import latency_summary

VT, FS, CR = b"\x0b", b"\x1c", b"\r"
END = FS + CR
#: Messages generated ahead per connection at most (beyond that they are generated while sending).
MAX_AHEAD = 50_000


def ack_code(ack: bytes) -> str:
    """MSA-1 of an ACK (``?`` when there is no MSA segment)."""
    start = ack.find(b"\rMSA")
    if start < 0:
        return "?"
    return ack[start + 5 : start + 7].decode("ascii", "replace")


class Source:
    """The messages of one connection: a census stream, or a fixed pool repeated."""

    def __init__(self, stream: AdtStream, cycle: int = 0):
        self.stream = stream
        self.pool = stream.messages(cycle) if cycle else []
        self.buffer: deque[bytes] = deque()
        self.i = 0

    def prepare(self, n: int) -> None:
        if not self.pool:
            self.buffer.extend(self.stream.messages(max(0, min(n, MAX_AHEAD) - len(self.buffer))))

    def next(self) -> bytes:
        if self.pool:
            self.i += 1
            return self.pool[self.i % len(self.pool)]
        if self.buffer:
            return self.buffer.popleft()
        return self.stream.next_message().encode("utf-8")


async def _sender(
    host: str,
    port: int,
    source: Source,
    count: int,
    latencies: list[float],
    codes: Counter[str],
    line: StartLine,
) -> int:
    reader, writer = await asyncio.open_connection(host, port, limit=1 << 22)
    deadline = await line.wait()
    sent = 0
    clock = time.perf_counter
    try:
        while sent < count and clock() < deadline:
            payload = source.next()
            t0 = clock()
            writer.write(VT + payload + END)
            ack = await reader.readuntil(END)
            latencies.append((clock() - t0) * 1000.0)
            codes[ack_code(ack)] += 1
            sent += 1
    finally:
        await close_quietly(writer)
    return sent


async def run_once(
    host: str, port: int, sources: list[Source], count: int, seconds: float, timeout: float
) -> dict[str, Any]:
    latencies: list[float] = []
    codes: Counter[str] = Counter()
    workers = [functools.partial(_sender, host, port, src, count, latencies, codes) for src in sources]
    total, elapsed = await run_together(workers, seconds, timeout)
    return {
        "messages": total,
        "seconds": round(elapsed, 4),
        "msg_per_s": round(total / elapsed, 2) if elapsed else 0.0,
        "codes": dict(codes),
        **latency_summary(latencies),
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    sources = [
        Source(AdtStream(args.seed + i, f"{args.tag}C{i}"), args.cycle) for i in range(args.connections)
    ]
    out: dict[str, Any] = {"connections": args.connections, "runs": []}
    per_conn_rate = args.expect / args.connections
    if args.warmup:
        for s in sources:
            s.prepare(args.warmup)
        out["warmup"] = await run_once(args.host, args.port, sources, args.warmup, args.seconds, args.timeout)
        per_conn_rate = out["warmup"]["msg_per_s"] / args.connections
    for _ in range(args.reps):
        need = min(args.count, int(per_conn_rate * args.seconds * 1.3) + 20)
        for s in sources:
            s.prepare(need)
        run = await run_once(args.host, args.port, sources, args.count, args.seconds, args.timeout)
        out["runs"].append(run)
        per_conn_rate = max(per_conn_rate, run["msg_per_s"] / args.connections)
    mix: Counter[str] = Counter()
    for s in sources:
        mix.update(s.stream.counts)
    out["generated_mix"] = dict(mix)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--connections", type=int, default=1)
    p.add_argument(
        "--count", type=int, default=1_000_000, help="messages per connection per repetition (at most)"
    )
    p.add_argument("--seconds", type=float, default=3.0, help="time limit of one repetition")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=0, help="messages per connection sent first, not counted")
    p.add_argument("--expect", type=float, default=500.0, help="msg/s expected, to size the first generation")
    p.add_argument("--cycle", type=int, default=0, help="repeat a pool of this many messages per connection")
    p.add_argument(
        "--timeout", type=float, default=30.0, help="extra seconds before a stuck run is abandoned"
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--tag", default="B")
    args = p.parse_args(argv)
    print_result(main_async(args))


if __name__ == "__main__":
    main()
