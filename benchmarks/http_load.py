"""HTTP load driver, run in its own process: ``python -m benchmarks.http_load --port P --kind K ...``.

A small HTTP/1.1 keep-alive client on asyncio streams (lighter than a general-purpose client, so
that on a 2-core machine the load generator takes as little CPU from the server as it can).
``--concurrency`` workers each send one request, read the whole response, then send the next.
Each repetition is bounded by a request count and a time limit. Prints one JSON object with, per
repetition, req/s, latency percentiles, the HTTP statuses seen and the mean response size; the
first responses of each run are parsed and checked (a Bundle with entries, or the resource asked
for).

Kinds (targets come from the ``--targets`` JSON written by the bulk loader):

* ``read``: ``GET /fhir/Practitioner/<id>``
* ``family``: ``GET /fhir/Practitioner?family=<name>&_count=20``
* ``encounter``: ``GET /fhir/Encounter?patient=Patient/<id>&date=ge<date>&_include=Encounter:location``
* ``create``: ``POST /fhir/Practitioner``, a new Practitioner with an identifier of its own each time
  (FHIR ingest; answered 201)
* ``ping``: ``GET /ping`` (the HTTP ceiling server)
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import random
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import quote

from benchmarks.driver import RUN_ERRORS, StartLine, close_quietly, print_result, run_together
from benchmarks.stats import latency_summary

#: Responses parsed and checked per run and kind (parsing all would load the driver).
CHECKED = 20


def request_path(kind: str, targets: dict[str, Any], rng: random.Random) -> str:
    if kind == "read":
        return f"/fhir/Practitioner/{rng.choice(targets['practitioner_ids'])}"
    if kind == "family":
        return f"/fhir/Practitioner?family={quote(rng.choice(targets['families']))}&_count=20"
    if kind == "family_nototal":
        return f"/fhir/Practitioner?family={quote(rng.choice(targets['families']))}&_count=20&_total=none"
    if kind == "encounter":
        return (
            f"/fhir/Encounter?patient=Patient/{rng.choice(targets['patients'])}"
            f"&date=ge{targets['date_ge']}&_include=Encounter:location"
        )
    if kind == "create":
        return "/fhir/Practitioner"
    if kind == "ping":
        return "/ping"
    raise ValueError(f"unknown kind {kind!r}")


#: Kinds that write: the request is a POST with a body, and 201 is the answer expected.
WRITE_KINDS = frozenset({"create"})


def request_body(kind: str, rng: random.Random) -> bytes:
    """The body of a ``create``: a Practitioner whose identifier no other request uses (a random
    uuid, not the seeded ``rng``: the same store is loaded again by the next variant's run)."""
    number = uuid.uuid4().hex[:16]
    return json.dumps(
        {
            "resourceType": "Practitioner",
            "identifier": [{"system": "urn:bench:staff", "value": f"B{number}"}],
            "name": [{"family": f"Bench{number[:6]}", "given": ["Ann"]}],
            "active": True,
        }
    ).encode()


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            parts.append(chunk[:-2])
        body = b"".join(parts)
    elif status in (204, 304):
        body = b""
    else:
        raise ValueError("response without Content-Length or chunked body")
    return status, body


def check(kind: str, status: int, body: bytes, checks: Counter[str], stats: dict[str, list[int]]) -> None:
    """Look inside a response: is it what was asked for? Counts problems in ``checks``."""
    if status != (201 if kind in WRITE_KINDS else 200):
        checks[f"status_{status}"] += 1
        return
    try:
        doc = json.loads(body)
    except ValueError:
        checks["not_json"] += 1
        return
    if kind in ("read", "create"):
        checks["ok" if doc.get("resourceType") == "Practitioner" else "wrong_type"] += 1
    elif kind in ("family", "family_nototal", "encounter"):
        if doc.get("resourceType") != "Bundle":
            checks["not_bundle"] += 1
            return
        entries = doc.get("entry", [])
        matches = sum(1 for e in entries if e.get("search", {}).get("mode") == "match")
        includes = sum(1 for e in entries if e.get("search", {}).get("mode") == "include")
        stats.setdefault("matches", []).append(matches)
        stats.setdefault("includes", []).append(includes)
        if "total" in doc:
            stats.setdefault("total", []).append(int(doc["total"]))
        checks["ok" if matches else "empty"] += 1
    else:
        checks["ok"] += 1


async def _worker(
    host: str,
    port: int,
    kind: str,
    targets: dict[str, Any],
    rng: random.Random,
    budget: list[int],
    lat: list[float],
    statuses: Counter[str],
    sizes: list[int],
    checks: Counter[str],
    stats: dict[str, list[int]],
    line: StartLine,
) -> int:
    reader, writer = await asyncio.open_connection(host, port, limit=1 << 24)
    deadline = await line.wait()
    clock = time.perf_counter
    done = 0
    try:
        while budget[0] > 0 and clock() < deadline:
            budget[0] -= 1
            path = request_path(kind, targets, rng)
            if kind in WRITE_KINDS:
                body_out = request_body(kind, rng)
                req = (
                    f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: application/fhir+json\r\n"
                    f"Content-Type: application/fhir+json\r\nContent-Length: {len(body_out)}\r\n"
                    f"{_extra_headers[0]}Connection: keep-alive\r\n\r\n"
                ).encode("ascii") + body_out
            else:
                req = (
                    f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: application/fhir+json\r\n"
                    f"{_extra_headers[0]}Connection: keep-alive\r\n\r\n"
                ).encode("ascii")
            t0 = clock()
            writer.write(req)
            status, body = await _read_response(reader)
            lat.append((clock() - t0) * 1000.0)
            statuses[str(status)] += 1
            sizes.append(len(body))
            if sum(checks.values()) < CHECKED:
                check(kind, status, body, checks, stats)
            done += 1
    finally:
        await close_quietly(writer)
    return done


#: Header lines sent with every request (``--token-file``: the bearer token), CRLF-terminated.
_extra_headers = [""]


async def run_once(
    args: argparse.Namespace, targets: dict[str, Any], seconds: float, count: int, rng: random.Random
) -> dict[str, Any]:
    lat: list[float] = []
    statuses: Counter[str] = Counter()
    checks: Counter[str] = Counter()
    stats: dict[str, list[int]] = {}
    sizes: list[int] = []
    budget = [count]
    workers = [
        functools.partial(
            _worker,
            args.host,
            args.port,
            args.kind,
            targets,
            random.Random(rng.random()),
            budget,
            lat,
            statuses,
            sizes,
            checks,
            stats,
        )
        for _ in range(args.concurrency)
    ]
    total, elapsed = await run_together(workers, seconds, args.timeout)
    out: dict[str, Any] = {
        "requests": total,
        "seconds": round(elapsed, 4),
        "req_per_s": round(total / elapsed, 2) if elapsed else 0,
        "statuses": dict(statuses),
        "mean_bytes": round(sum(sizes) / len(sizes)) if sizes else 0,
        "checks": dict(checks),
        **latency_summary(lat),
    }
    for key, values in stats.items():
        out[f"mean_{key}"] = round(sum(values) / len(values), 1) if values else None
    return out


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    targets = json.loads(Path(args.targets).read_text()) if args.targets else {}
    rng = random.Random(args.seed)
    out: dict[str, Any] = {"kind": args.kind, "concurrency": args.concurrency, "runs": []}
    if args.warmup:
        out["warmup"] = await run_once(args, targets, args.seconds, args.warmup, rng)
    for _ in range(args.reps):
        out["runs"].append(await run_once(args, targets, args.seconds, args.count, rng))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--kind", required=True)
    p.add_argument("--targets", help="JSON file with practitioner_ids, families, patients, date_ge")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--count", type=int, default=100_000, help="requests per repetition (at most)")
    p.add_argument("--seconds", type=float, default=3.0, help="time limit of one repetition")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=0, help="requests sent first, not counted")
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--token-file", help="send Authorization: Bearer <the file's content> with every request")
    args = p.parse_args(argv)
    if args.token_file:
        _extra_headers[0] = f"Authorization: Bearer {Path(args.token_file).read_text().strip()}\r\n"
    print_result(main_async(args), (*RUN_ERRORS, ValueError))


if __name__ == "__main__":
    main()
