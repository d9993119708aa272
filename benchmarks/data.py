"""Seeded generator of realistic, varied test data.

* HL7 v2 ER7 messages: ADT^A01 (admit), ADT^A08 (update), ADT^A03 (discharge) following a
  simulated census (a visit is admitted before it is updated or discharged, patients come back),
  and MFN^M02 staff master files. Names, MRNs, visit numbers, beds, doctors (with valid NPIs:
  Luhn check digit over the ``80840`` prefix), addresses and diagnoses vary from message to message.
* FHIR R4-shaped Practitioner, Patient, Encounter and Location records, shaped like those the
  shipped mappings write, for bulk-loading the store behind the API benchmarks.
* HR staff roster CSV files (dataset ``staff_roster``, the columns of samples/csv/staff_roster.csv)
  with unique employee numbers and valid NPIs, for the SFTP CSV benchmark.

Everything comes from ``random.Random(seed)``: the same seed gives the same bytes.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

# ---------------------------------------------------------------------------------------- vocabularies
GIVEN_FEMALE = (
    "Maria Elena Aisha Sofia Mei Priya Olga Fatima Grace Hannah Ingrid Julia Keiko Laila Nadia Noor "
    "Paula Rosa Sarah Tamar Ursula Valentina Wanjiru Ximena Yara Zoe Amara Beatriz Chloe Dana Esther "
    "Farah Gabriela Hye-jin Ines Joanna Kateryna Lucia Mariam Nkechi Oksana Pilar Qiu Rania Siobhan "
    "Thandiwe Uma Vera Wiktoria Yuki Zainab Adaeze Brigid Camila Dolores"
).split()
GIVEN_MALE = (
    "James Arjun Mohammed Tomas Daniel Wei Kwame Luca Mateo Nikolai Omar Pedro Rafael Samuel Tariq "
    "Viktor William Yusuf Zhang Andre Bjorn Carlos Dmitri Emeka Felipe Gustav Hiroshi Ibrahim Jonas "
    "Kenji Liam Marek Nils Oluwaseun Pavel Quentin Ravi Santiago Tobias Uriel Vikram Xavier Yosef "
    "Abdul Benedikt Ciaran Diego Eitan Florin Goran"
).split()
FAMILY_COMMON = (
    "Smith Johnson Williams Brown Jones Garcia Miller Davis Rodriguez Martinez Hernandez Lopez "
    "Gonzalez Wilson Anderson Thomas Taylor Moore Jackson Martin Lee Perez Thompson White Harris "
    "Sanchez Clark Ramirez Lewis Robinson Walker Young Allen King Wright Scott Torres Nguyen Hill "
    "Flores Green Adams Nelson Baker Hall Rivera Campbell Mitchell Carter Roberts Chen Patel Novak "
    "Kowalski Okafor Mensah Haddad Nakamura Kim Park Singh Kumar Ivanova Petrov Muller Schmidt "
    "Rossi Bianchi Silva Santos Costa Dubois Moreau Lindqvist Johansson Nielsen Osei Mwangi Abebe "
    "Yilmaz Demir Cohen Levi Murphy Kelly O'Brien Byrne Walsh Fischer Weber Novotny Horvat Kovacs "
    "Nowak Wojcik Tanaka Suzuki Sato Watanabe Ito Huang Zhao Wu Zhou Sun Ali Khan Hussain Rahman "
    "Ahmed Begum Das Reddy Rao Iyer Mendoza Castillo Ortiz Morales Gutierrez Ruiz Alvarez Romero "
    "Jimenez Vargas Castro Herrera Medina Aguilar Vega Fernandez Gomez Diaz Reyes Cruz Ward Price "
    "Bennett Wood Barnes Ross Henderson Coleman Jenkins Perry Powell Long Patterson Hughes Foster"
).split()
_SURNAME_HEADS = (
    "Al Ber Cal Dor El Fen Gar Hal Is Jor Kal Lin Mar Nor Ol Per Quin Ros Sal Tor Ul Val Wes Yar "
    "Zel Bran Cor Dal Ever Frost Gold Hart Kirk Lang Mor Pren Stan Thorn Wick Ash"
).split()
_SURNAME_TAILS = (
    "berg stein ford field wood worth ton ley man son sen quist vik dottir ez ini elli escu ovic "
    "enko ski sky ard ier eau ant ani aki oto ura aro ino ell ham by well mont ridge brook"
).split()
STREETS = (
    "Maple Ave",
    "Oak St",
    "Birchwood Ct",
    "High St",
    "Elm Dr",
    "Cedar Ln",
    "Park Blvd",
    "Lakeview Rd",
    "Washington St",
    "Main St",
    "Sycamore Way",
    "River Rd",
    "Hillcrest Dr",
    "Mill Pond Rd",
    "Chestnut St",
)
CITIES = (
    ("Columbus", "OH", "432"),
    ("Dublin", "OH", "430"),
    ("Westerville", "OH", "430"),
    ("Cleveland", "OH", "441"),
    ("Dayton", "OH", "454"),
    ("Toledo", "OH", "436"),
    ("Akron", "OH", "443"),
    ("Cincinnati", "OH", "452"),
    ("Pittsburgh", "PA", "152"),
    ("Indianapolis", "IN", "462"),
)
WARDS = (
    ("4W", "4 West Medical", "MED"),
    ("5E", "5 East Surgical", "SUR"),
    ("ICU", "Intensive Care", "MED"),
    ("3N", "3 North Cardiology", "CAR"),
    ("PEDS", "Paediatrics", "PED"),
    ("MAT", "Maternity", "OBS"),
    ("ONC", "Oncology", "MED"),
    ("ORTH", "Orthopaedics", "SUR"),
)
FACILITIES = ("GENHOSP", "STMARY", "NORTHCL")
DIAGNOSES = (
    ("J18.9", "Pneumonia, unspecified organism"),
    ("I21.4", "Non-ST elevation myocardial infarction"),
    ("K35.80", "Unspecified acute appendicitis"),
    ("N39.0", "Urinary tract infection, site not specified"),
    ("I50.9", "Heart failure, unspecified"),
    ("J44.1", "COPD with acute exacerbation"),
    ("S72.001A", "Fracture of unspecified part of neck of right femur"),
    ("O80", "Encounter for full-term uncomplicated delivery"),
    ("E11.65", "Type 2 diabetes with hyperglycemia"),
    ("A41.9", "Sepsis, unspecified organism"),
)
REASONS = (
    "Fever, productive cough and low oxygen saturation",
    "Chest pain \\T\\ shortness of breath",
    "Abdominal pain, right lower quadrant",
    "Fall at home; hip pain",
    "Confusion and fever",
    "Elective admission for surgery",
    "Labour",
    "Worsening dyspnoea",
    "Dysuria and flank pain",
    "Hyperglycaemia \\T\\ dehydration",
)
ALLERGENS = (("70618", "Penicillin"), ("2670", "Codeine"), ("10180", "Sulfamethoxazole"), ("1191", "Aspirin"))
PAYERS = (
    ("GHPPO1", "Blue Cross Blue Shield of Ohio"),
    ("MCARE", "Medicare Part A"),
    ("AETNA2", "Aetna Choice POS II"),
    ("UHC5", "UnitedHealthcare Options PPO"),
    ("MCAID", "Ohio Medicaid"),
)
STAFF_TYPES = (("MD", "DO", "PHY"), ("RN", "LPN", "NP"), ("RPH",))
SPECIALTIES = (
    "Internal Medicine",
    "General Surgery",
    "Cardiology",
    "Paediatrics",
    "Obstetrics",
    "Oncology",
    "Orthopaedic Surgery",
    "Medical-Surgical Nursing",
    "Critical Care Nursing",
    "Clinical Pharmacy",
)
NPI_SYSTEM = "http://hl7.org/fhir/sid/us-npi"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
EPOCH = datetime(2026, 11, 1, 6, 0, tzinfo=UTC)
_EST = timezone(timedelta(hours=-5))  # the senders' local time in the messages


# ---------------------------------------------------------------------------------------- identifiers
def luhn_check_digit(payload: str) -> str:
    """The Luhn digit that makes ``payload + digit`` pass the Luhn check."""
    total = 0
    for i, ch in enumerate(reversed(payload)):
        d = int(ch)
        if i % 2 == 0:  # these digits are doubled once the check digit is appended
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return str((10 - total % 10) % 10)


def npi_from_base(base9: int) -> str:
    """A valid NPI from a 9-digit base: the check digit is Luhn over ``80840`` + base."""
    digits = f"{base9:09d}"
    return digits + luhn_check_digit("80840" + digits)


def is_valid_npi(npi: str) -> bool:
    return len(npi) == 10 and npi.isdigit() and luhn_check_digit("80840" + npi[:9]) == npi[9]


_NPI_SPAN = 200_000_000  # bases 100000000..299999999: NPIs start with 1 or 2, as real ones do
_NPI_STEP = 387_420_489  # 3**18: coprime with 2 * 10**8, so i -> i * step mod span is a bijection


def nth_npi(i: int, offset: int = 0) -> str:
    """The ``i``-th NPI of a sequence with no repeats (for millions of distinct practitioners)."""
    return npi_from_base(100_000_000 + ((i + offset) * _NPI_STEP) % _NPI_SPAN)


def seeded_uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def hl7_ts(when: datetime) -> str:
    """HL7 DTM with a -0500 offset (the sending system's local time)."""
    local = when.astimezone(_EST)
    return local.strftime("%Y%m%d%H%M%S") + "-0500"


def fhir_ts(when: datetime) -> str:
    return when.astimezone(_EST).isoformat()


# ---------------------------------------------------------------------------------------- people
@dataclass
class Person:
    family: str
    given: str
    middle: str
    sex: str  # F / M
    birth: datetime
    prefix: str = ""


@dataclass
class Doctor:
    npi: str
    person: Person
    staff_type: str
    employee_id: str
    specialty: str
    ward: str


@dataclass
class PatientInfo:
    mrn: str
    facility: str
    person: Person
    ssn: str
    street: str
    city: tuple[str, str, str]
    zip: str
    phone: str


@dataclass
class Visit:
    number: str
    patient: PatientInfo
    patient_class: str
    ward: tuple[str, str, str]
    room: str
    bed: str
    attending: Doctor
    referring: Doctor
    admitting: Doctor
    admitted: datetime
    diagnosis: tuple[str, str]
    reason: str
    updates: int = 0


class Generator:
    """All the seeded choices; one instance per stream of data."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.seed = seed
        self._synth = [h + t for h in _SURNAME_HEADS for t in _SURNAME_TAILS]
        n = len(FAMILY_COMMON)
        # common names: a flattened Zipf-like weighting (Smith is likelier than Foster, not 100x likelier)
        self._common_weights = [1.0 / (rank + 8) for rank in range(n)]
        self._cum_common = _cumulative(self._common_weights)

    # -------------------------------------------------------------------------- primitives
    def family(self) -> str:
        """60 % from common surnames (skewed), 40 % from a long tail of ~1,600 composed ones."""
        if self.rng.random() < 0.6:
            return FAMILY_COMMON[_pick_cumulative(self.rng, self._cum_common)]
        return self.rng.choice(self._synth)

    def person(self, adult: bool = True) -> Person:
        sex = self.rng.choice("FM")
        names = GIVEN_FEMALE if sex == "F" else GIVEN_MALE
        given, middle = self.rng.choice(names), self.rng.choice(names)
        age_days = self.rng.randint(18 * 365 if adult else 0, 95 * 365)
        birth = EPOCH - timedelta(days=age_days)
        return Person(self.family(), given, middle if self.rng.random() < 0.6 else "", sex, birth)

    def phone(self) -> str:
        return (
            f"({self.rng.choice(('614', '380', '937', '216', '513'))})555-{self.rng.randint(100, 9999):04d}"
        )

    # -------------------------------------------------------------------------- staff
    def doctor(self, i: int, npi_offset: int = 0) -> Doctor:
        p = self.person()
        kind = self.rng.choices(STAFF_TYPES, weights=(6, 3, 1))[0]
        staff_type = self.rng.choice(kind)
        if staff_type in ("MD", "DO", "PHY"):
            p.prefix = "Dr"
        ward = self.rng.choice(WARDS)[0]
        return Doctor(
            nth_npi(i, npi_offset),
            p,
            staff_type,
            f"E{self.rng.randint(10000, 99999)}",
            self.rng.choice(SPECIALTIES),
            ward,
        )

    def staff(self, count: int, npi_offset: int = 0) -> list[Doctor]:
        return [self.doctor(i, npi_offset) for i in range(count)]


def _cumulative(weights: list[float]) -> list[float]:
    out, acc = [], 0.0
    total = sum(weights)
    for w in weights:
        acc += w / total
        out.append(acc)
    return out


def _pick_cumulative(rng: random.Random, cum: list[float]) -> int:
    import bisect

    return min(bisect.bisect_left(cum, rng.random()), len(cum) - 1)


# ---------------------------------------------------------------------------------------- HL7 v2
def _xcn(d: Doctor) -> str:
    p = d.person
    return f"{d.npi}^{p.family}^{p.given}^^^{p.prefix}^^^NPI&2.16.840.1.113883.4.6&ISO^L^^^NPI"


def _msh(control_id: str, when: datetime, code: str, event: str, structure: str, facility: str) -> str:
    return (
        f"MSH|^~\\&|ADTSYS|{facility}|HMSACH|{facility}|{hl7_ts(when)}||{code}^{event}^{structure}|"
        f"{control_id}|P|2.5.1"
    )


RACES = (
    "2106-3^White^HL70005",
    "2054-5^Black or African American^HL70005",
    "2028-9^Asian^HL70005",
    "2131-1^Other Race^HL70005",
    "1002-5^American Indian or Alaska Native^HL70005",
)
ETHNICITIES = ("N^Not Hispanic or Latino^HL70189", "H^Hispanic or Latino^HL70189", "U^Unknown^HL70189")


def _marital(p: Person) -> str:
    if (EPOCH - p.birth).days < 18 * 365:
        return "S^Single^HL70002"
    return ("M^Married^HL70002", "S^Single^HL70002", "D^Divorced^HL70002", "W^Widowed^HL70002")[
        p.birth.day % 4
    ]


def _pid(pt: PatientInfo) -> str:
    p = pt.person
    city, state, _zip3 = pt.city
    race = RACES[pt.person.birth.month % len(RACES)]
    ethnicity = ETHNICITIES[pt.person.birth.day % len(ETHNICITIES)]
    return (
        f"PID|1||{pt.mrn}^^^{pt.facility}^MR~{pt.ssn}^^^SSA^SS||{p.family}^{p.given}^{p.middle}^^^^L||"
        f"{p.birth:%Y%m%d}|{p.sex}||{race}|{pt.street}^^{city}^{state}^{pt.zip}^USA^H||"
        f"{pt.phone}^PRN^PH^^1^{pt.phone[1:4]}^{pt.phone[5:].replace('-', '')}|||{_marital(p)}||"
        f"A{pt.mrn}^^^{pt.facility}^AN||||{ethnicity}"
    )


def _pv1(v: Visit, discharged: datetime | None = None, disposition: str = "") -> str:
    ward = v.ward[0]
    fields = [
        "PV1",
        "1",
        v.patient_class,
        f"{ward}^{v.room}^{v.bed}^{v.patient.facility}^^N^MAIN^4",
        "E",
        "",
        "",
        _xcn(v.attending),
        _xcn(v.referring),
        "",
        v.ward[2],
        "",
        "",
        "",
        "7",
        "",
        "",
        _xcn(v.admitting),
        "",
        f"{v.number}^^^{v.patient.facility}^VN",
    ]
    fields += [""] * (36 - len(fields)) + [disposition]
    fields += [""] * (39 - len(fields)) + [v.patient.facility]
    fields += [""] * (44 - len(fields)) + [hl7_ts(v.admitted)]
    if discharged is not None:
        fields.append(hl7_ts(discharged))
    return "|".join(fields)


class AdtStream:
    """A census of one sending connection: admits, updates, discharges and the odd staff file.

    ``tag`` makes control ids, MRNs and visit numbers unique across streams and runs, so that no
    message is a duplicate of one sent before to the same store.
    """

    def __init__(
        self,
        seed: int,
        tag: str,
        staff: list[Doctor] | None = None,
        mix: tuple[float, float, float, float] = (0.50, 0.25, 0.23, 0.02),
    ):
        self.gen = Generator(seed)
        self.tag = tag
        self.staff = staff if staff is not None else Generator(7).staff(300)
        self.mix = mix
        self.open: list[Visit] = []
        self.patients: list[PatientInfo] = []
        self.seq = 0
        self.clock = EPOCH
        self._mrn = 0
        self._visit = 0
        self.counts: dict[str, int] = {}

    def _next_id(self) -> str:
        self.seq += 1
        return f"{self.tag}-{self.seq:07d}"

    def new_patient(self) -> PatientInfo:
        g = self.gen
        self._mrn += 1
        city = g.rng.choice(CITIES)
        return PatientInfo(
            mrn=f"{self.tag}M{self._mrn:06d}",
            facility=g.rng.choice(FACILITIES),
            person=g.person(adult=False),
            ssn=f"9{g.rng.randint(10, 99)}-{g.rng.randint(10, 99)}-{g.rng.randint(1000, 9999)}",
            street=f"{g.rng.randint(1, 9999)} {g.rng.choice(STREETS)}",
            city=city,
            zip=f"{city[2]}{g.rng.randint(1, 99):02d}",
            phone=g.phone(),
        )

    def new_visit(self) -> Visit:
        g = self.gen
        if self.patients and g.rng.random() < 0.2:
            patient = g.rng.choice(self.patients)  # a returning patient
        else:
            patient = self.new_patient()
            self.patients.append(patient)
            if len(self.patients) > 5000:
                self.patients.pop(0)
        self._visit += 1
        ward = g.rng.choice(WARDS)
        return Visit(
            number=f"{self.tag}V{self._visit:06d}",
            patient=patient,
            patient_class=g.rng.choices("IEO", weights=(7, 2, 1))[0],
            ward=ward,
            room=f"{g.rng.randint(1, 40):02d}{g.rng.randint(0, 9)}",
            bed=g.rng.choice("AB"),
            attending=g.rng.choice(self.staff),
            referring=g.rng.choice(self.staff),
            admitting=g.rng.choice(self.staff),
            admitted=self.clock,
            diagnosis=g.rng.choice(DIAGNOSES),
            reason=g.rng.choice(REASONS),
        )

    def _tick(self) -> datetime:
        self.clock += timedelta(seconds=self.gen.rng.randint(5, 240))
        return self.clock

    # -------------------------------------------------------------------------- messages
    def a01(self, v: Visit) -> str:
        when = self._tick()
        allergen = self.gen.rng.choice(ALLERGENS)
        segs = [
            _msh(self._next_id(), when, "ADT", "A01", "ADT_A01", v.patient.facility),
            f"EVN|A01|{hl7_ts(when)}|||REG{self.gen.rng.randint(1, 99):03d}^Clerk^Admitting|{hl7_ts(v.admitted)}|"
            f"{v.patient.facility}",
            _pid(v.patient),
            f"NK1|1|{v.patient.person.family}^{self.gen.rng.choice(GIVEN_MALE + GIVEN_FEMALE)}^^^^^L|"
            f"SPO^Spouse^HL70063||{self.gen.phone()}^PRN^PH",
            _pv1(v),
            f"PV2|||^{v.reason}",
            f"AL1|1|DA^Drug allergy^HL70127|{allergen[0]}^{allergen[1]}^RXNORM|MO^Moderate^HL70128",
            f"DG1|1||{v.diagnosis[0]}^{v.diagnosis[1]}^I10||{hl7_ts(v.admitted)}|A",
            self._in1(v),
        ]
        return "\r".join(segs) + "\r"

    def _in1(self, v: Visit) -> str:
        p, pt = v.patient.person, v.patient
        city, state, _zip3 = pt.city
        plan, payer = self.gen.rng.choice(PAYERS)
        return (
            f"IN1|1|{plan}^{payer} plan^L|{plan}01^^^{pt.facility}^NIIP|{payer}|PO Box "
            f"{self.gen.rng.randint(1000, 9999)}^^{city}^{state}^{pt.zip}^USA^B||{self.gen.phone()}^WPN^PH|"
            f"GRP-{self.gen.rng.randint(10000, 99999)}||||20260101|20261231||PPO|{p.family}^{p.given}^^^^^L|"
            f"SEL^Self^HL70063|{p.birth:%Y%m%d}|{pt.street}^^{city}^{state}^{pt.zip}^USA^H|||1||||||||||||||"
            f"X{self.gen.rng.randint(10**8, 10**9 - 1)}|||||||{p.sex}"
        )

    def a08(self, v: Visit) -> str:
        when = self._tick()
        v.updates += 1
        if self.gen.rng.random() < 0.5:  # a new address or phone number
            v.patient.street = f"{self.gen.rng.randint(1, 9999)} {self.gen.rng.choice(STREETS)}"
            v.patient.phone = self.gen.phone()
        segs = [
            _msh(self._next_id(), when, "ADT", "A08", "ADT_A01", v.patient.facility),
            f"EVN|A08|{hl7_ts(when)}|||REG{self.gen.rng.randint(1, 99):03d}^Clerk^Admitting||{v.patient.facility}",
            _pid(v.patient),
            _pv1(v),
        ]
        return "\r".join(segs) + "\r"

    def a03(self, v: Visit) -> str:
        when = self._tick()
        disposition = self.gen.rng.choice(("01", "01", "01", "03", "06", "62", "20"))
        segs = [
            _msh(self._next_id(), when, "ADT", "A03", "ADT_A03", v.patient.facility),
            f"EVN|A03|{hl7_ts(when)}|||UC{self.gen.rng.randint(100, 999)}^Clerk^Unit|{hl7_ts(when)}|"
            f"{v.patient.facility}",
            _pid(v.patient),
            _pv1(v, discharged=when, disposition=disposition),
            f"DG1|1||{v.diagnosis[0]}^{v.diagnosis[1]}^I10||{hl7_ts(v.admitted)}|F",
        ]
        return "\r".join(segs) + "\r"

    def m02(self, doctors: list[Doctor]) -> str:
        when = self._tick()
        segs = [
            _msh(self._next_id(), when, "MFN", "M02", "MFN_M02", "GENHOSP"),
            f"MFI|PRA^Practitioner master file^HL70175||UPD|{hl7_ts(when)}|{hl7_ts(when)}|AL",
        ]
        for i, d in enumerate(doctors):
            p = d.person
            event = self.gen.rng.choice(("MAD", "MUP", "MUP", "MUP"))
            segs += [
                f"MFE|{event}|{self.tag}-MFE{self.seq}-{i}|{hl7_ts(when)}|{d.npi}^^NPI|CE",
                f"STF|{d.npi}^^NPI|{d.npi}^^^NPI&2.16.840.1.113883.4.6&ISO^NPI~{d.employee_id}^^^GENHOSP^EI|"
                f"{p.family}^{p.given}^^^{p.prefix}^^L|{d.staff_type}|{p.sex}|{p.birth:%Y%m%d}|A|"
                f"{d.ward}^{d.ward}^L|MED^Medicine^HL70069|{self.gen.phone()}^WPN^PH|"
                f"300 Hospital Way^^Columbus^OH^43210^USA^O|20150801^GENHOSP&General Hospital&L|||"
                f"{p.given.lower()}.{p.family.lower().replace(chr(39), '')}@genhosp.example",
                f"PRA|{d.npi}^^NPI|{d.ward}^{d.ward} staff^L|{d.staff_type}|P|{d.specialty}|"
                f"RN-{self.gen.rng.randint(100000, 999999)}^SL^OH^20281231",
            ]
        return "\r".join(segs) + "\r"

    def next_message(self) -> str:
        """The next message of the census, as ER7 text with CR segment ends."""
        r = self.gen.rng.random()
        a01, a08, a03, _m02 = self.mix
        if not self.open or r < a01:
            kind = "A01"
        elif r < a01 + a08:
            kind = "A08"
        elif r < a01 + a08 + a03:
            kind = "A03"
        else:
            kind = "M02"
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if kind == "A01":
            v = self.new_visit()
            self.open.append(v)
            if len(self.open) > 2000:  # visits nobody discharges stay in the store, not in memory
                self.open.pop(0)
            return self.a01(v)
        if kind == "M02":
            return self.m02(self.gen.rng.sample(self.staff, self.gen.rng.randint(1, 3)))
        v = self.open[self.gen.rng.randrange(len(self.open))]
        if kind == "A03":
            self.open.remove(v)
            return self.a03(v)
        return self.a08(v)

    def messages(self, count: int) -> list[bytes]:
        return [self.next_message().encode("utf-8") for _ in range(count)]


def a01_messages(count: int, seed: int = 1, tag: str = "A") -> list[bytes]:
    """``count`` distinct ADT^A01 messages (different patients, visits, beds and doctors)."""
    stream = AdtStream(seed, tag)
    return [stream.a01(stream.new_visit()).encode("utf-8") for _ in range(count)]


# ---------------------------------------------------------------------------------------- FHIR records
@dataclass
class RecordSet:
    """FHIR-shaped records for bulk loading, with what the load driver needs to query them."""

    practitioners: int
    patients: int
    encounters: int
    locations: int
    sample_ids: dict[str, list[str]] = field(default_factory=dict)
    families: list[str] = field(default_factory=list)


def _meta(version: int, when: datetime) -> dict[str, Any]:
    return {"versionId": str(version), "lastUpdated": when.isoformat().replace("+00:00", "Z")}


def practitioner(g: Generator, i: int, rid: str, when: datetime) -> tuple[dict[str, Any], str]:
    """One Practitioner shaped like ``practitioner_stf`` writes; returns (resource, NPI)."""
    d = g.doctor(i)
    p = d.person
    name: dict[str, Any] = {
        "family": p.family,
        "given": [p.given] + ([p.middle] if p.middle else []),
        "use": "official",
    }
    if p.prefix:
        name["prefix"] = [p.prefix]
    resource = {
        "resourceType": "Practitioner",
        "id": rid,
        "meta": _meta(1, when),
        "identifier": [
            {
                "value": d.npi,
                "system": NPI_SYSTEM,
                "type": {
                    "coding": [{"system": V2_0203, "code": "NPI", "display": "National provider identifier"}]
                },
            },
            {
                "value": d.employee_id,
                "system": "urn:hms-ach:id:GENHOSP",
                "type": {"coding": [{"system": V2_0203, "code": "EI", "display": "Employee number"}]},
            },
        ],
        "active": g.rng.random() < 0.95,
        "name": [name],
        "gender": "female" if p.sex == "F" else "male",
        "birthDate": f"{p.birth:%Y-%m-%d}",
        "telecom": [
            {"value": g.phone(), "system": "phone", "use": "work"},
            {"system": "email", "value": f"{p.given.lower()}.{i}@genhosp.example", "use": "work"},
        ],
        "address": [
            {
                "line": ["300 Hospital Way"],
                "city": "Columbus",
                "state": "OH",
                "postalCode": "43210",
                "country": "USA",
                "use": "work",
            }
        ],
        "qualification": [
            {
                "identifier": [{"value": f"MD-{g.rng.randint(10000, 99999)}"}],
                "code": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/v2-0338",
                            "code": "SL",
                            "display": "State license number",
                        }
                    ],
                    "text": "SL",
                },
                "issuer": {"display": "OH"},
                "period": {"end": "2027-12-31"},
            }
        ],
    }
    return resource, d.npi


def locations(facility: str = "GENHOSP") -> list[tuple[str, dict[str, Any]]]:
    """Wards, rooms and beds as (business key, resource without id/meta); rooms point at wards."""
    out: list[tuple[str, dict[str, Any]]] = []
    phys = "http://terminology.hl7.org/CodeSystem/location-physical-type"
    for ward, _long, _svc in WARDS:
        wkey = f"{facility}/{ward}"
        out.append(
            (
                wkey,
                {
                    "resourceType": "Location",
                    "identifier": [{"system": "urn:hms-ach:location", "value": wkey}],
                    "name": ward,
                    "status": "active",
                    "mode": "instance",
                    "physicalType": {"coding": [{"system": phys, "code": "wa", "display": "Ward"}]},
                },
            )
        )
        for room in range(1, 41):
            rkey = f"{wkey}/{room:03d}"
            out.append(
                (
                    rkey,
                    {
                        "resourceType": "Location",
                        "identifier": [{"system": "urn:hms-ach:location", "value": rkey}],
                        "name": f"{ward} {room:03d}",
                        "status": "active",
                        "mode": "instance",
                        "physicalType": {"coding": [{"system": phys, "code": "ro", "display": "Room"}]},
                        "partOf": {"reference": f"@{wkey}"},
                    },
                )
            )
            for bed in "AB":
                bkey = f"{rkey}/{bed}"
                out.append(
                    (
                        bkey,
                        {
                            "resourceType": "Location",
                            "identifier": [{"system": "urn:hms-ach:location", "value": bkey}],
                            "name": f"{ward} {room:03d} {bed}",
                            "status": "active",
                            "mode": "instance",
                            "physicalType": {"coding": [{"system": phys, "code": "bd", "display": "Bed"}]},
                            "operationalStatus": {
                                "system": "http://terminology.hl7.org/CodeSystem/v2-0116",
                                "code": "O",
                                "display": "Occupied",
                            },
                            "partOf": {"reference": f"@{rkey}"},
                        },
                    )
                )
    return out


def patient(g: Generator, i: int, rid: str, when: datetime) -> tuple[dict[str, Any], str]:
    p = g.person(adult=False)
    city = g.rng.choice(CITIES)
    mrn = f"{100000 + i}"
    resource = {
        "resourceType": "Patient",
        "id": rid,
        "meta": _meta(1, when),
        "identifier": [
            {
                "value": mrn,
                "system": "urn:hms-ach:id:GENHOSP",
                "type": {"coding": [{"system": V2_0203, "code": "MR", "display": "Medical record number"}]},
            }
        ],
        "active": True,
        "name": [
            {"family": p.family, "given": [p.given] + ([p.middle] if p.middle else []), "use": "official"}
        ],
        "gender": "female" if p.sex == "F" else "male",
        "birthDate": f"{p.birth:%Y-%m-%d}",
        "address": [
            {
                "line": [f"{g.rng.randint(1, 9999)} {g.rng.choice(STREETS)}"],
                "city": city[0],
                "state": city[1],
                "postalCode": f"{city[2]}{g.rng.randint(1, 99):02d}",
                "country": "USA",
                "use": "home",
            }
        ],
        "telecom": [{"value": g.phone(), "system": "phone", "use": "home"}],
    }
    return resource, mrn


def encounter(
    g: Generator,
    i: int,
    rid: str,
    when: datetime,
    patient_id: str,
    bed_id: str,
    doctor_ids: list[str],
    start: datetime,
    end: datetime | None,
) -> tuple[dict[str, Any], str]:
    visit = f"V{1000000 + i}"
    period: dict[str, str] = {"start": fhir_ts(start)}
    if end is not None:
        period["end"] = fhir_ts(end)
    part = []
    for code, display, did in zip(
        ("ATND", "REF", "ADM"), ("attender", "referrer", "admitter"), doctor_ids, strict=False
    ):
        part.append(
            {
                "type": [
                    {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                                "code": code,
                                "display": display,
                            }
                        ]
                    }
                ],
                "individual": {"reference": f"Practitioner/{did}"},
            }
        )
    diag = g.rng.choice(DIAGNOSES)
    resource = {
        "resourceType": "Encounter",
        "id": rid,
        "meta": _meta(1, when),
        "identifier": [
            {
                "value": visit,
                "system": "urn:hms-ach:id:GENHOSP",
                "type": {"coding": [{"system": V2_0203, "code": "VN", "display": "Visit number"}]},
            }
        ],
        "status": "finished" if end is not None else "in-progress",
        "class": {
            "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
            "code": "IMP",
            "display": "inpatient encounter",
        },
        "subject": {"reference": f"Patient/{patient_id}"},
        "period": period,
        "reasonCode": [{"coding": [{"display": diag[1]}], "text": diag[1]}],
        "location": [
            {
                "location": {"reference": f"Location/{bed_id}"},
                "status": "completed" if end is not None else "active",
            }
        ],
        "participant": part,
    }
    return resource, visit


def record_iter(kind: str, count: int, seed: int) -> Iterator[tuple[str, dict[str, Any], str]]:
    """(id, resource, business key) for ``count`` records of ``kind`` (Practitioner or Patient)."""
    g = Generator(seed)
    id_rng = random.Random(seed * 7919 + 1)
    when = EPOCH
    for i in range(count):
        rid = seeded_uuid(id_rng)
        if kind == "Practitioner":
            res, key = practitioner(g, i, rid, when)
        else:
            res, key = patient(g, i, rid, when)
        yield rid, res, key


# ---------------------------------------------------------------------------------------- roster CSV
ROSTER_COLUMNS = (
    "employee_id",
    "npi",
    "family_name",
    "given_name",
    "gender",
    "birth_date",
    "role",
    "department",
    "email",
    "phone",
    "license_number",
    "license_type",
    "license_state",
    "license_expires",
    "active",
)


def roster_csv(count: int, seed: int, npi_offset: int = 5_000_000) -> bytes:
    """A staff roster CSV of ``count`` rows (plus the header): employee numbers and NPIs unique and valid.

    Most rows are complete; some have no e-mail, phone or licence, a few are inactive, and names with
    an apostrophe are quoted, as HR exports write them. ``npi_offset`` keeps these NPIs apart from the
    ones the other figures generate.
    """
    import csv
    import io

    g = Generator(seed)
    buf = io.StringIO()
    out = csv.writer(buf, lineterminator="\r\n")
    out.writerow(ROSTER_COLUMNS)
    for i in range(count):
        p = g.person()
        role = g.rng.choice(g.rng.choices(STAFF_TYPES, weights=(6, 3, 1))[0])
        ward = g.rng.choice(WARDS)[0]
        family = p.family if g.rng.random() > 0.02 else f"O'{p.family}"
        email = (
            f"{p.given}.{family}.{i}@genhosp.example".lower().replace("'", "") if g.rng.random() < 0.9 else ""
        )
        phone = f"614-555-{g.rng.randint(0, 9999):04d}" if g.rng.random() < 0.85 else ""
        licensed = g.rng.random() < 0.8
        expires = EPOCH + timedelta(days=g.rng.randint(30, 4 * 365))
        out.writerow(
            (
                f"E{1_000_000 + i}",
                nth_npi(i, npi_offset),
                family,
                p.given,
                p.sex,
                f"{p.birth:%Y-%m-%d}",
                role,
                ward,
                email,
                phone,
                f"{role}-{g.rng.randint(10_000, 999_999)}" if licensed else "",
                "SL" if licensed else "",
                g.rng.choice(("OH", "OH", "OH", "KY", "IN", "PA")) if licensed else "",
                f"{expires:%Y-%m-%d}" if licensed else "",
                "Y" if g.rng.random() < 0.97 else "N",
            )
        )
    return buf.getvalue().encode("utf-8")
