"""The ``x12_837`` sink: on ``claim.created``, write an ASC X12 837 claim file.

* A professional Claim becomes an 837P (005010X222A1, SV1 lines); an institutional one (the
  encounter is inpatient, PV1-2 I) an 837I (005010X223A2, SV2 lines with revenue codes; loop 2300
  and 2400 in :mod:`hms_ach.billing.x12_837i`).

* Billing provider, submitter, receiver and payers come from channels.yaml; the subscriber is the
  patient's Coverage (from IN1) and Patient record. ISA13/GS06 and ST02 come from persisted
  counters (table ``control_number``), so no two files share a control number, across restarts and
  instances.
* Every file is validated before it is released: pyx12 (``x12n_document``, which writes the 999),
  plus our own rules that pyx12 does not check: CLM02 equals the sum of SV102 / SV203, NPI check
  digits, ICD-10-CM, CPT/HCPCS and revenue code formats.
* A valid file goes to ``directory`` (and, with ``sftp:``, is uploaded; see
  :mod:`hms_ach.outbound.sftp_upload`) and a ``claim.file_written`` event follows. A file that fails
  goes to ``directory/rejected/`` with its 999 and the list of problems, and ``claim.file_rejected``
  tells the operator. A claim that cannot be built (payer not configured, no coverage...) writes no
  file at all and emits ``claim.error`` with the reason.
* A redelivered ``claim.created`` (crash after the file was written, or a failed upload) finds the
  file of that event, writes no second one, uploads it (again) and then emits ``claim.file_written``.
* What those three events carry is declared in ``mappings/events/claim_file_written.yaml``,
  ``claim_file_rejected.yaml`` and ``claim_error.yaml``, over the facts :func:`_followup` hands over
  (``resource`` and ``claim``: the Claim; ``file``, the control numbers, ``total``, ``problems``,
  ``reason``, ``sftp``; see :func:`hms_ach.outbound.events.payload_from`).
"""

from __future__ import annotations

import asyncio
import io
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field

from hms_ach.billing.x12_837i import REVENUE_CODE, attending, claim_loops
from hms_ach.mapping.functions import npi_is_valid
from hms_ach.outbound.events import payload_from
from hms_ach.outbound.sftp_upload import SftpDestination, upload
from hms_ach.outbound.sinks import Delivery, DeliveryResult, SinkSettings
from hms_ach.store import record_reads
from hms_ach.store.control_numbers import next_number
from hms_ach.store.db import Store
from hms_ach.store.port import Tx

_ICD10 = re.compile(r"^[A-TV-Z][0-9][0-9A-Z][0-9A-Z]{0,4}$")
_PROC = re.compile(r"^(\d{5}|\d{4}[FTU]|[A-V]\d{4})$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BillingProvider(_Strict):
    name: str = Field(description="Organisation name (NM103 of loop 2010AA)")
    npi: str = Field(description="Billing provider NPI (10 digits, valid check digit)")
    tax_id: str = Field(description="Employer identification number, 9 digits (REF*EI)")
    address: str = Field(description="Street address (N301)")
    city: str = Field(description="City (N401)")
    state: str = Field(description="State code (N402)")
    zip: str = Field(description="ZIP+4, 9 digits (N403)")


class Payer(_Strict):
    id: str = Field(description="The insurance company id received in IN1-3.1")
    name: str = Field(description="Payer name (NM103 of loop 2010BB)")
    payer_id: str = Field(description="Payer identifier the clearinghouse knows (NM109, qualifier PI)")
    filing_indicator: str = Field(
        "CI", description="SBR09 claim filing indicator (CI commercial, MB Medicare B...)"
    )


@dataclass
class Problem:
    where: str
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


@dataclass
class ClaimFile:
    text: str
    control_number: int
    st_number: int
    total: float
    problems: list[Problem] = field(default_factory=list)
    institutional: bool = False


class ClaimError(Exception):
    """The claim cannot be turned into a file (configuration or data missing)."""


def _clean(value: Any, limit: int = 60) -> str:
    text = re.sub(r"[*~:^>]", " ", str(value or "")).strip().upper()
    return text[:limit]


def _claim_type(claim: dict[str, Any]) -> str:
    return str(((claim.get("type") or {}).get("coding") or [{}])[0].get("code") or "professional")


def _money(value: float) -> str:
    text = f"{value:.2f}".rstrip("0").rstrip(".")
    return text or "0"


def _get(tx: Tx, reference: str | None) -> dict[str, Any] | None:
    record = record_reads.stored(tx, reference)
    return record.content if record is not None else None


class X12ClaimSink:
    class Config(SinkSettings):
        events: list[str] = Field(
            default_factory=lambda: ["claim.created"], description="Only claim.created is acted on"
        )
        directory: str = Field(
            "outbox/837", description="Where 837 files are written (rejected/ beside them)"
        )
        usage: str = Field("T", pattern="^[TP]$", description="ISA15: T test, P production")
        sender_id: str = Field(description="ISA06/GS02 interchange sender id")
        receiver_id: str = Field(description="ISA08/GS03 interchange receiver id")
        submitter_name: str = Field(description="Loop 1000A submitter name")
        submitter_contact: str = Field("BILLING OFFICE", description="PER02 contact name")
        submitter_phone: str = Field(description="PER04 telephone, digits only")
        receiver_name: str = Field(description="Loop 1000B receiver (clearinghouse) name")
        place_of_service: str = Field(
            "21", description="CLM05-1 place of service code (21 inpatient hospital)"
        )
        billing_provider: BillingProvider = Field(description="Loop 2010AA billing provider")
        payers: list[Payer] = Field(default_factory=list, description="Payers, matched on IN1-3.1")
        sftp: SftpDestination | None = Field(
            None,
            description="Also upload every valid file to this SFTP server (host key pinned by known_hosts)",
        )
        facility_type_code: str = Field(
            "11",
            pattern=r"^\d{2}$",
            description="837I CLM05-1: the first two digits of the type of bill (11 hospital inpatient)",
        )
        admission_type_code: str = Field(
            "1",
            pattern=r"^\d$",
            description="837I CL101 priority of admission (1 emergency, 2 urgent, 3 elective)",
        )
        admission_source_code: str = Field(
            "7",
            pattern="^[0-9A-Z]$",
            description="837I CL102 point of origin when PV1-14 has none (7 emergency room)",
        )
        patient_status_code: str = Field(
            "01", pattern=r"^\d{2}$", description="837I CL103 patient status (01 discharged home)"
        )
        revenue_codes: dict[str, str] = Field(
            default_factory=dict,
            description="837I SV201: CPT/HCPCS code -> 4-digit revenue code (99223: '0450')",
        )
        default_revenue_code: str | None = Field(
            None,
            pattern=r"^\d{4}$",
            description="837I SV201 for a procedure not in revenue_codes (none: such a claim is rejected)",
        )

    def __init__(self, settings: Config, store: Store):
        self.settings = settings
        self.store = store
        self.directory = Path(settings.directory)

    async def close(self) -> None:
        return None

    async def deliver(self, delivery: Delivery) -> DeliveryResult:
        if delivery.event != "claim.created":
            return DeliveryResult(response=f"ignored {delivery.event}")
        outcome = await asyncio.to_thread(self._deliver_sync, delivery)
        if isinstance(outcome, DeliveryResult):
            return outcome
        path, facts = outcome
        response = f"written {path.name}"
        if self.settings.sftp is not None:
            # A failed upload is retried; the next attempt finds the local file and uploads it again.
            facts["sftp"] = await upload(self.settings.sftp, path, self.settings.timeout_seconds)
            response += f", uploaded to {facts['sftp']}"
        return DeliveryResult(response=response, followups=[_followup("claim.file_written", facts)])

    # ------------------------------------------------------------------ the work (in a thread)
    def _deliver_sync(self, delivery: Delivery) -> DeliveryResult | tuple[Path, dict[str, Any]]:
        """A finished result (claim error, rejected file), or the valid file written and its event's facts."""
        claim_ref = str(delivery.payload.get("resource"))
        existing = sorted(self.directory.glob(f"837[PI]-e{delivery.event_id}-*.x12"))
        if existing:  # written by an attempt whose delivery was not confirmed (crash, failed upload)
            return existing[0], _payload_of(existing[0], claim_ref)
        try:
            with self.store.read() as conn:
                data = self._gather(conn, claim_ref)
        except ClaimError as exc:
            return DeliveryResult(
                response=f"claim error: {exc}",
                followups=[_followup("claim.error", {"claim": claim_ref, "reason": str(exc)})],
            )
        with self.store.transaction() as conn:
            isa = next_number(conn, "x12.isa13")
            st = next_number(conn, "x12.st02")
        built = self.render(data, isa, st)
        problems = built.problems + self.check(data, built)
        report, pyx12_ok, pyx12_errors = validate_with_pyx12(built.text)
        problems += [Problem("pyx12", e) for e in pyx12_errors]
        if not pyx12_ok and not pyx12_errors:
            problems.append(Problem("pyx12", "the document is not valid (see the 999)"))
        name = f"837{'I' if built.institutional else 'P'}-e{delivery.event_id}-{isa:09d}"
        facts = {
            "claim": claim_ref,
            "file": f"{name}.x12",
            "interchangeControlNumber": f"{isa:09d}",
            "transactionSetControlNumber": f"{st:04d}",
            "total": built.total,
        }
        if problems:
            rejected = self.directory / "rejected"
            rejected.mkdir(parents=True, exist_ok=True)
            _write(rejected / f"{name}.x12", built.text)
            _write(rejected / f"{name}.999", report)
            _write(rejected / f"{name}.errors.txt", "\n".join(map(str, problems)) + "\n")
            return DeliveryResult(
                response=f"rejected: {len(problems)} problem(s)",
                followups=[
                    _followup("claim.file_rejected", {**facts, "problems": [str(p) for p in problems][:20]})
                ],
            )
        self.directory.mkdir(parents=True, exist_ok=True)
        _write(self.directory / f"{name}.x12", built.text)
        return self.directory / f"{name}.x12", facts

    def _gather(self, conn: Tx, claim_ref: str) -> dict[str, Any]:
        claim = _get(conn, claim_ref)
        if claim is None:
            raise ClaimError(f"{claim_ref} does not exist")
        coverage_ref = ((claim.get("insurance") or [{}])[0].get("coverage") or {}).get("reference")
        coverage = _get(conn, coverage_ref)
        if coverage is None:
            raise ClaimError("the patient has no coverage (IN1) on file")
        payer_key = ((coverage.get("payor") or [{}])[0].get("identifier") or {}).get("value", "")
        payer = next((p for p in self.settings.payers if p.id == payer_key), None)
        if payer is None:
            raise ClaimError(
                f"payer {payer_key!r} (IN1-3) is not configured in the x12_837 sink "
                f"{self.settings.name!r}; add it under payers:"
            )
        relationship = ((coverage.get("relationship") or {}).get("coding") or [{}])[0].get("code")
        if relationship not in (None, "self"):
            raise ClaimError(
                f"subscriber relationship {relationship!r}: only self-insured patients are supported"
            )
        patient = _get(conn, (claim.get("patient") or {}).get("reference"))
        if patient is None:
            raise ClaimError("the claim's patient does not exist")
        care_team = {
            c["sequence"]: _get(conn, c["provider"].get("reference")) for c in claim.get("careTeam", [])
        }
        encounter = (
            _get(conn, ((claim.get("item") or [{}])[0].get("encounter") or [{}])[0].get("reference")) or {}
        )
        return {
            "claim": claim,
            "coverage": coverage,
            "payer": payer,
            "patient": patient,
            "care_team": care_team,
            "encounter": encounter,
            "attending": _get(conn, attending(encounter)),
        }

    # ------------------------------------------------------------------ rendering
    def render(self, data: dict[str, Any], isa: int, st: int) -> ClaimFile:
        s, bp = self.settings, self.settings.billing_provider
        claim, coverage, payer, patient = data["claim"], data["coverage"], data["payer"], data["patient"]
        problems: list[Problem] = []
        now = datetime.now(UTC)
        segs: list[str] = []

        def seg(*elements: Any) -> None:
            parts = [str(e) for e in elements]
            while len(parts) > 1 and parts[-1] == "":
                parts.pop()
            segs.append("*".join(parts))

        st_id = f"{st:04d}"
        institutional = _claim_type(claim) == "institutional"
        version = "005010X223A2" if institutional else "005010X222A1"
        seg("ST", "837", st_id, version)
        seg("BHT", "0019", "00", f"{isa:09d}", now.strftime("%Y%m%d"), now.strftime("%H%M"), "CH")
        seg("NM1", "41", "2", _clean(s.submitter_name), "", "", "", "", "46", _clean(s.sender_id, 80))
        seg("PER", "IC", _clean(s.submitter_contact), "TE", re.sub(r"\D", "", s.submitter_phone))
        seg("NM1", "40", "2", _clean(s.receiver_name), "", "", "", "", "46", _clean(s.receiver_id, 80))
        seg("HL", "1", "", "20", "1")
        seg("NM1", "85", "2", _clean(bp.name), "", "", "", "", "XX", bp.npi)
        seg("N3", _clean(bp.address, 55))
        seg("N4", _clean(bp.city, 30), _clean(bp.state, 2), re.sub(r"\D", "", bp.zip))
        seg("REF", "EI", re.sub(r"\D", "", bp.tax_id))
        seg("HL", "2", "1", "22", "0")
        group = next((c.get("value") for c in coverage.get("class", []) if c.get("value")), "")
        seg("SBR", "P", "18", _clean(group, 50), "", "", "", "", "", payer.filing_indicator)
        name = (patient.get("name") or [{}])[0]
        given = name.get("given") or [""]
        seg(
            "NM1",
            "IL",
            "1",
            _clean(name.get("family"), 60),
            _clean(given[0], 35),
            _clean(given[1] if len(given) > 1 else "", 25),
            "",
            "",
            "MI",
            _clean(coverage.get("subscriberId"), 80),
        )
        addr = (patient.get("address") or [{}])[0]
        if addr.get("line") and addr.get("city"):
            seg("N3", _clean(addr["line"][0], 55))
            seg(
                "N4",
                _clean(addr.get("city"), 30),
                _clean(addr.get("state"), 2),
                re.sub(r"\D", "", str(addr.get("postalCode", ""))),
            )
        gender = {"female": "F", "male": "M"}.get(str(patient.get("gender")), "U")
        if patient.get("birthDate"):
            seg("DMG", "D8", str(patient["birthDate"]).replace("-", ""), gender)
        else:
            problems.append(Problem("DMG", "the subscriber's birth date is missing"))
        seg("NM1", "PR", "2", _clean(payer.name), "", "", "", "", "PI", _clean(payer.payer_id, 80))
        items = claim.get("item", [])
        total = round(sum(float(i.get("net", {}).get("value", 0)) for i in items), 2)
        if institutional:
            claim_loops(seg, s, data, total, _clean, _money, problems, Problem)
            return self._envelope(segs, st_id, isa, version, now, total, problems, institutional)
        clm01 = _clean(claim["id"].replace("-", ""), 38)
        seg("CLM", clm01, _money(total), "", "", f"{s.place_of_service}:B:1", "Y", "A", "Y", "Y")
        codes = [
            d["diagnosisCodeableConcept"]["coding"][0]["code"].replace(".", "").upper()
            for d in claim.get("diagnosis", [])
        ][:12]
        if codes:
            seg("HI", *[("ABK" if i == 0 else "ABF") + ":" + c for i, c in enumerate(codes)])
        else:
            problems.append(Problem("HI", "the claim has no diagnosis"))
        rendering = data["care_team"].get(1)
        rendering_npi = ""
        if rendering:
            ident: dict[str, Any] = next(
                (
                    i
                    for i in rendering.get("identifier", [])
                    if i.get("system") == "http://hl7.org/fhir/sid/us-npi"
                ),
                {},
            )
            rendering_npi = str(ident.get("value", ""))
            rname = (rendering.get("name") or [{}])[0]
            if rendering_npi:
                seg(
                    "NM1",
                    "82",
                    "1",
                    _clean(rname.get("family")),
                    _clean((rname.get("given") or [""])[0], 35),
                    "",
                    "",
                    "",
                    "XX",
                    rendering_npi,
                )
        data["rendering_npi"] = rendering_npi
        for n, item in enumerate(items, start=1):
            code = item["productOrService"]["coding"][0].get("code", "")
            seg("LX", str(n))
            pointers = ":".join(str(p) for p in item.get("diagnosisSequence", [1])[:4] if p <= 12) or "1"
            seg(
                "SV1",
                f"HC:{_clean(code, 48)}",
                _money(float(item.get("net", {}).get("value", 0))),
                "UN",
                _money(float(item.get("quantity", {}).get("value", 1))),
                "",
                "",
                pointers,
            )
            seg("DTP", "472", "D8", str(item.get("servicedDate", "")).replace("-", ""))
        return self._envelope(segs, st_id, isa, version, now, total, problems, institutional)

    def _envelope(
        self,
        segs: list[str],
        st_id: str,
        isa: int,
        version: str,
        now: datetime,
        total: float,
        problems: list[Problem],
        institutional: bool,
    ) -> ClaimFile:
        s = self.settings
        segs.append(f"SE*{len(segs) + 1}*{st_id}")
        isa_date, isa_time = now.strftime("%y%m%d"), now.strftime("%H%M")
        header = [
            "ISA*00*" + " " * 10 + "*00*" + " " * 10 + f"*ZZ*{_clean(s.sender_id, 15):<15}*ZZ*"
            f"{_clean(s.receiver_id, 15):<15}*{isa_date}*{isa_time}*^*00501*{isa:09d}*0*{s.usage}*:",
            f"GS*HC*{_clean(s.sender_id, 15)}*{_clean(s.receiver_id, 15)}*{now:%Y%m%d}*{isa_time}*{isa}*X*{version}",
        ]
        trailer = [f"GE*1*{isa}", f"IEA*1*{isa:09d}"]
        text = "~\n".join(header + segs + trailer) + "~\n"
        return ClaimFile(text, isa, int(st_id), total, problems, institutional)

    def check(self, data: dict[str, Any], built: ClaimFile) -> list[Problem]:
        """Our own rules, on the rendered file: balancing, NPI check digits, code formats."""
        problems: list[Problem] = []
        segments = [s.strip().split("*") for s in built.text.split("~") if s.strip()]
        clm = next((s for s in segments if s[0] == "CLM"), None)
        # SV1: SV101 procedure, SV102 amount. SV2: SV201 revenue code, SV202 procedure, SV203 amount.
        line, amount_at, proc_at = ("SV2", 3, 2) if built.institutional else ("SV1", 2, 1)
        lines = [s for s in segments if s[0] == line]
        try:
            line_total = round(sum(float(s[amount_at]) for s in lines), 2)
        except (IndexError, ValueError):
            line_total = float("nan")
        if clm is None or round(float(clm[2]), 2) != line_total:
            problems.append(
                Problem(
                    "CLM02",
                    f"claim total {clm[2] if clm else '?'} is not the sum of the "
                    f"{line}{amount_at:02d} line amounts ({_money(line_total)})",
                )
            )
        for s in lines:
            if float(s[amount_at]) < 0:
                problems.append(Problem(f"{line}{amount_at:02d}", f"negative line amount {s[amount_at]}"))
            code = s[proc_at].split(":")[1] if ":" in s[proc_at] else ""
            if not _PROC.match(code):
                problems.append(Problem(f"{line}{proc_at:02d}-2", f"{code!r} is not a CPT or HCPCS code"))
            if line == "SV2" and not REVENUE_CODE.match(s[1]):
                problems.append(Problem("SV201", f"{s[1]!r} is not a 4-digit revenue code"))
        for s in segments:
            if s[0] == "NM1" and len(s) > 9 and s[8] == "XX" and not npi_is_valid(s[9]):
                problems.append(Problem(f"NM1*{s[1]}", f"NPI {s[9]} has a wrong check digit"))
            if s[0] == "HI":
                for composite in s[1:]:
                    code = composite.split(":")[1] if ":" in composite else ""
                    if not _ICD10.match(code):
                        problems.append(Problem("HI", f"{code!r} is not an ICD-10-CM code"))
        return problems


def validate_with_pyx12(text: str) -> tuple[str, bool, list[str]]:
    """Run pyx12 on ``text``: (999 report, valid, error texts)."""
    import logging

    import pyx12.error_handler
    import pyx12.params
    import pyx12.x12n_document

    logging.getLogger("pyx12").setLevel(logging.CRITICAL)
    params = pyx12.params.params()
    fd_999 = io.StringIO()
    fd_json = io.StringIO()
    try:
        ok = pyx12.x12n_document.x12n_document(params, io.StringIO(text), fd_999, None, None, fd_json)
    except Exception as exc:  # noqa: BLE001 - a crash of the validator is a failed validation
        return "", False, [f"pyx12 failed: {type(exc).__name__}: {exc}"]
    errors: list[str] = []
    raw = fd_json.getvalue().strip()
    if raw:
        try:
            errors = _collect_errors(orjson.loads(raw))
        except orjson.JSONDecodeError:
            errors = [line for line in raw.splitlines() if line.strip()]
    return fd_999.getvalue(), bool(ok) and not errors, errors


def _collect_errors(node: Any, where: str = "") -> list[str]:
    """Every entry of every ``errors`` list in pyx12's JSON report, with the segment it belongs to."""
    out: list[str] = []
    if isinstance(node, dict):
        here = str(node.get("seg_id") or node.get("segment") or where)
        for key, value in node.items():
            if key == "errors" and isinstance(value, list):
                for err in value:
                    if isinstance(err, dict):
                        code = err.get("code") or err.get("err_cde") or ""
                        msg = err.get("msg") or err.get("err_str") or err
                        out.append(f"{here} {code}: {msg}".strip())
                    else:
                        out.append(f"{here}: {err}")
            else:
                out.extend(_collect_errors(value, here))
    elif isinstance(node, list):
        for value in node:
            out.extend(_collect_errors(value, where))
    return out


def _followup(event: str, facts: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The event and its payload, as its mapping (mappings/events/) builds it from ``facts`` and the
    claim as ``resource``; ``facts`` themselves without an engine or a mapping."""
    return event, payload_from(event, {"resource": facts["claim"], **facts}, facts)


def _payload_of(path: Path, claim_ref: str) -> dict[str, Any]:
    """The claim.file_written facts of a file already written (its control numbers and CLM02)."""
    segments: dict[str, list[str]] = {}
    for raw in path.read_text().split("~"):
        parts = raw.strip().split("*")
        segments.setdefault(parts[0], parts)
    isa, st, clm = segments.get("ISA", []), segments.get("ST", []), segments.get("CLM", [])
    return {
        "claim": claim_ref,
        "file": path.name,
        "interchangeControlNumber": isa[13] if len(isa) > 13 else "",
        "transactionSetControlNumber": st[2] if len(st) > 2 else "",
        "total": float(clm[2]) if len(clm) > 2 else None,
    }


def _write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
