"""The institutional part of an 837I (005010X223A2): loop 2300 (the claim) and loop 2400 (the lines).

The envelope and the loops before 2300 (submitter, receiver, billing provider, subscriber, payer)
are the same as the 837P's and are written by :class:`hms_ach.billing.x12_837.X12ClaimSink`; it
calls :func:`claim_loops` for a Claim of type ``institutional`` (an inpatient encounter, PV1-2 I).

Each service line is an SV2: the revenue code (from the sink's ``revenue_codes`` by procedure
code, else ``default_revenue_code``), the CPT/HCPCS procedure, the amount, UN and the units.
Inpatient claims also carry the admission date and hour (DTP*435), the discharge hour (DTP*096),
the CL1 admission type, source and patient status, the admitting diagnosis (ABJ) and the
attending provider (loop 2310A, NM1*71) from the encounter's ATND participant.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime
from typing import Any, Protocol

NPI_SYSTEM = "http://hl7.org/fhir/sid/us-npi"
REVENUE_CODE = re.compile(r"^\d{4}$")


class InstitutionalSettings(Protocol):
    facility_type_code: str
    admission_type_code: str
    admission_source_code: str
    patient_status_code: str
    revenue_codes: dict[str, str]
    default_revenue_code: str | None


def _datetime(value: Any) -> datetime | None:
    try:
        return datetime.fromisoformat(str(value))
    except ValueError:
        return None


def _npi_of(practitioner: dict[str, Any] | None) -> str:
    if not practitioner:
        return ""
    ident: dict[str, Any] = next(
        (i for i in practitioner.get("identifier", []) if i.get("system") == NPI_SYSTEM), {}
    )
    return str(ident.get("value", ""))


def attending(encounter: dict[str, Any]) -> str | None:
    """The reference of the encounter's attending (ATND) practitioner."""
    for part in encounter.get("participant", []):
        codes = [c.get("code") for t in part.get("type", []) for c in t.get("coding", [])]
        if "ATND" in codes:
            ref = (part.get("individual") or {}).get("reference")
            return ref if isinstance(ref, str) else None
    return None


def revenue_code(settings: InstitutionalSettings, procedure: str) -> str | None:
    return settings.revenue_codes.get(procedure) or settings.default_revenue_code


def claim_loops(
    seg: Callable[..., None],
    settings: InstitutionalSettings,
    data: dict[str, Any],
    total: float,
    clean: Callable[..., str],
    money: Callable[[float], str],
    problems: list[Any],
    problem: Callable[[str, str], Any],
) -> None:
    """Write loops 2300, 2310A and 2400 of an 837I through ``seg``; add what is missing to ``problems``."""
    claim, encounter = data["claim"], data.get("encounter") or {}
    items = claim.get("item", [])
    clm01 = clean(claim["id"].replace("-", ""), 38)
    seg("CLM", clm01, money(total), "", "", f"{settings.facility_type_code}:A:1", "", "A", "Y", "Y")
    period = encounter.get("period") or {}
    start, end = _datetime(period.get("start")), _datetime(period.get("end"))
    dates = sorted(str(i.get("servicedDate", "")).replace("-", "") for i in items if i.get("servicedDate"))
    first = start.strftime("%Y%m%d") if start else (dates[0] if dates else "")
    last = end.strftime("%Y%m%d") if end else (dates[-1] if dates else first)
    if end is not None:
        seg("DTP", "096", "TM", end.strftime("%H%M"))
    if first:
        seg("DTP", "434", "RD8", f"{first}-{max(first, last)}")
    else:
        problems.append(
            problem("DTP*434", "the statement period is unknown (no encounter period, no service date)")
        )
    if start is not None:
        seg("DTP", "435", "DT", start.strftime("%Y%m%d%H%M"))
    else:
        problems.append(problem("DTP*435", "the admission date (PV1-44) is missing"))
    source = str(
        ((encounter.get("hospitalization") or {}).get("admitSource") or {}).get("coding", [{}])[0].get("code")
        or ""
    )
    if not re.fullmatch(r"[0-9A-Z]", source):
        source = settings.admission_source_code
    seg("CL1", settings.admission_type_code, source, settings.patient_status_code)
    codes = [
        d["diagnosisCodeableConcept"]["coding"][0]["code"].replace(".", "").upper()
        for d in claim.get("diagnosis", [])
    ][:25]
    if codes:
        seg("HI", f"ABK:{codes[0]}")
        seg("HI", f"ABJ:{codes[0]}")
        if len(codes) > 1:
            seg("HI", *[f"ABF:{c}" for c in codes[1:12]])
    else:
        problems.append(problem("HI", "the claim has no diagnosis"))
    doctor = data.get("attending")
    npi = _npi_of(doctor)
    if doctor and npi:
        name = (doctor.get("name") or [{}])[0]
        seg(
            "NM1",
            "71",
            "1",
            clean(name.get("family")),
            clean((name.get("given") or [""])[0], 35),
            "",
            "",
            "",
            "XX",
            npi,
        )
    else:
        problems.append(problem("NM1*71", "the encounter has no attending practitioner (PV1-7) with an NPI"))
    for n, item in enumerate(items, start=1):
        code = str(item["productOrService"]["coding"][0].get("code", ""))
        revenue = revenue_code(settings, code)
        if not revenue:
            problems.append(
                problem(
                    "SV201",
                    f"no revenue code for procedure {code!r}: add it under "
                    "revenue_codes or set default_revenue_code",
                )
            )
            revenue = ""
        seg("LX", str(n))
        seg(
            "SV2",
            revenue,
            f"HC:{clean(code, 48)}",
            money(float(item.get("net", {}).get("value", 0))),
            "UN",
            money(float(item.get("quantity", {}).get("value", 1))),
        )
        if item.get("servicedDate"):
            seg("DTP", "472", "D8", str(item["servicedDate"]).replace("-", ""))
