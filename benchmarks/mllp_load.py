"""MLLP load driver, run in its own process: ``python -m benchmarks.mllp_load --port P ...``.

Opens ``--connections`` connections; each one sends its own census of messages (see
:class:`benchmarks.data.AdtStream`) the way real senders do: one message, then wait for its ACK,
then the next. Each repetition is bounded by a message count *and* a time limit, whichever comes
first. Prints one JSON object: per repetition the messages ACKed, msg/s, ACK latency percentiles and
the ACK codes seen (MSA-1).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from typing import Any

from benchmarks.data import AdtStream
from benchmarks.stats import latency_summary

VT, FS, CR = b"\x0b", b"\x1c", b"\r"
END = FS + CR


def ack_code(ack: bytes) -> str:
    """MSA-1 of an ACK (``?`` when there is no MSA segment)."""
    start = ack.find(b"\rMSA")
    if start < 0:
        return "?"
    return ack[start + 5:start + 7].decode("ascii", "replace")


async def run_once(host: str, port: int, per_connection: list[list[bytes]], seconds: float,
                   timeout: float) -> dict[str, Any]:
    latencies: list[float] = []
    codes: Counter[str] = Counter()
    start = asyncio.Event()
    ready: list[int] = []
    holder = {"deadline": float("inf")}  # set once every connection is open

    # open every connection first, then start them together
    tasks = []
    for msgs in per_connection:
        tasks.append(asyncio.create_task(_sender(host, port, msgs, holder, latencies, codes, start,
                                                             ready)))
    while len(ready) < len(per_connection):
        if any(t.done() for t in tasks):
            for t in tasks:
                if t.done() and t.exception():
                    raise t.exception()  # type: ignore[misc]
        await asyncio.sleep(0.001)
    t0 = time.perf_counter()
    holder["deadline"] = t0 + seconds
    start.set()
    async with asyncio.timeout(seconds + timeout):
        sent = await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - t0
    total = sum(sent)
    return {"messages": total, "seconds": round(elapsed, 4), "msg_per_s": round(total / elapsed, 2) if elapsed else 0,
            "codes": dict(codes), **latency_summary(latencies)}


async def _sender(host: str, port: int, msgs: list[bytes], holder: dict[str, float],
                              latencies: list[float], codes: Counter[str], start: asyncio.Event,
                              ready: list[int]) -> int:
    reader, writer = await asyncio.open_connection(host, port, limit=1 << 22)
    ready.append(1)
    await start.wait()
    deadline = holder["deadline"]
    sent = 0
    clock = time.perf_counter
    try:
        for payload in msgs:
            if clock() >= deadline:
                break
            t0 = clock()
            writer.write(VT + payload + END)
            ack = await reader.readuntil(END)
            latencies.append((clock() - t0) * 1000.0)
            codes[ack_code(ack)] += 1
            sent += 1
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass
    return sent


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    streams = [AdtStream(args.seed + i, f"{args.tag}C{i}") for i in range(args.connections)]
    warm = [s.messages(args.warmup) for s in streams]
    reps = [[s.messages(args.count) for s in streams] for _ in range(args.reps)]
    mix: Counter[str] = Counter()
    for s in streams:
        mix.update(s.counts)
    out: dict[str, Any] = {"connections": args.connections, "mix": dict(mix), "runs": []}
    if args.warmup:
        out["warmup"] = await run_once(args.host, args.port, warm, args.seconds, args.timeout)
    for batch in reps:
        out["runs"].append(await run_once(args.host, args.port, batch, args.seconds, args.timeout))
        if args.pause:
            await asyncio.sleep(args.pause)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--connections", type=int, default=1)
    p.add_argument("--count", type=int, default=1000, help="messages per connection per repetition (at most)")
    p.add_argument("--seconds", type=float, default=3.0, help="time limit of one repetition")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=0, help="messages per connection sent first, not counted")
    p.add_argument("--pause", type=float, default=0.0, help="seconds between repetitions")
    p.add_argument("--timeout", type=float, default=30.0, help="extra seconds before a stuck run is abandoned")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--tag", default="B")
    args = p.parse_args(argv)
    try:
        result = asyncio.run(main_async(args))
    except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
        result = {"error": f"{type(exc).__name__}: {exc}"}
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
