"""THE mapping language: one schema, as pydantic models.

Everything about the language comes from here: the loader validates files against these models
(with ``file:line:col`` errors), ``hms-ach schema mapping`` writes their JSON Schema, and
``hms-ach docs`` generates docs/mapping-language.md from their descriptions.

These kinds of file live under ``mappings/``:

* ``kind: message``  (mappings/messages/) which message it handles and which records it yields;
* ``kind: resource`` (mappings/resources/) how one canonical record is built, and its business key;
* ``kind: datatype`` (mappings/datatypes/) how one HL7 datatype (XPN, CX, XAD...) becomes a FHIR
  element, reused by every resource mapping;
* ``kind: table``    (mappings/tables/) a code table: HL7 codes to FHIR codes;
* ``kind: event``    (mappings/events/) what the payload of one outbound event carries;
* ``kind: hl7``      (mappings/hl7/) an outbound HL7 v2 transform: fields set, copied or mapped
  through a code table, segments dropped (run by the ``mllp`` sink, hms_ach/mapping/hl7_transform.py).
* ``kind: notification`` (mappings/notifications/) the message to people a ``notify`` sink sends.
* ``kind: workflow`` (mappings/workflows/) a case type on FHIR Task: its states, transitions, roles,
  form, assignment and SLAs (run by hms_ach/cases/, docs/review-cases.md).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from hms_ach.mapping.fhir_structure import COMPLETED_CODES


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Condition(_Strict):
    """A test on a source or parameter; the rule runs only when it holds.

    Give ``source`` (an HL7 path) or ``param``, and one test. With no test, the condition is
    "the source is not empty".
    """

    source: str | None = Field(None, description="HL7 path whose first non-empty value is tested, e.g. PV1-2")
    param: str | None = Field(None, description="Parameter of this mapping whose value is tested")
    exists: bool | None = Field(
        None, description="true: holds when the value is not empty; false: when it is"
    )
    equals: str | None = Field(None, description="Holds when the value equals this text")
    not_equals: str | None = Field(None, description="Holds when the value differs from this text")
    in_: list[str] | None = Field(None, alias="in", description="Holds when the value is one of these")
    not_in: list[str] | None = Field(None, description="Holds when the value is none of these")


class ValueSpec(_Strict):
    """How one value is produced. Exactly one of ``source``, ``sources``, ``value``, ``param``
    (or, in a rule, ``use``, ``record``, ``ref``, ``rules``) gives the value; ``function``,
    ``table``, ``default`` and ``required`` then apply in that order."""

    source: str | list[str] | None = Field(
        None, description="HL7 path (PID-5.1, PID-3[CX.5=MR].1, XCN.1); a list means the first non-empty one"
    )
    sources: list[str] | None = Field(
        None, description="Several HL7 paths whose values go together to the function (concat, format, join)"
    )
    value: Any = Field(None, description="A constant: text, number, true/false, or a whole JSON object")
    param: str | None = Field(None, description="A parameter of this mapping (see params and with)")
    function: str | None = Field(None, description="Name of a registered function applied to the value")
    args: dict[str, Any] = Field(default_factory=dict, description="Arguments of the function")
    table: str | None = Field(
        None, description="Name of a code table (mappings/tables) the value is looked up in"
    )
    default: Any = Field(None, description="Used when the value is empty")
    required: bool | str = Field(
        False,
        description="An empty value is an error (AE, table 0357 code 101); text here is the error message",
    )


class Rule(ValueSpec):
    """Set one target element of the record being built."""

    target: str = Field(
        description="Where the value goes, in FHIR element names: gender, name[], period.start, "
        "location[0].location; [] appends to a list"
    )
    when: Condition | list[Condition] | None = Field(
        None, description="Run only when this (or all of these) holds"
    )
    for_each: str | None = Field(
        None,
        description="HL7 path of repeating values or segments (PID-3, NK1); the rule runs once per "
        "repetition with it as context; the target must end with []",
    )
    use: str | None = Field(
        None, description="A datatype mapping that builds the value from the source (or context)"
    )
    record: str | None = Field(
        None,
        description="A resource mapping run on the source (or context); the value is a reference to that record",
    )
    ref: str | None = Field(
        None, description="A reference to the record the message mapping named with `as:`"
    )
    with_: dict[str, Any] = Field(
        default_factory=dict,
        alias="with",
        description="Parameters passed to the `record:` mapping: a constant, or "
        "{param: NAME} to pass on this mapping's own parameter NAME",
    )
    rules: list[Rule] | None = Field(None, description="Nested rules that build an object value")
    remove: bool = Field(
        False, description="Remove the target from the stored record (e.g. period.end on A13)"
    )
    critical: bool = Field(
        True,
        description="false: when this rule fails on a message (an unknown code, a bad value, a required "
        "value missing), the target is left unset, the rest of the message is stored, and the failure "
        "is a warning (ACK AA with an ERR of severity W)",
    )


class KeySpec(_Strict):
    """The business identifier the record is upserted on (a database unique constraint)."""

    system: ValueSpec = Field(description="The identifier system (URI) of the key")
    value: ValueSpec = Field(description="The identifier value of the key")
    fallback: KeySpec | None = Field(
        None,
        description="Another key used when this one's value is empty (e.g. MRN + admit time when "
        "PV1-19 has no visit number); `required` applies to the last one only",
    )


class ParamSpec(_Strict):
    description: str = Field("", description="What the parameter means")
    default: Any = Field(None, description="Value when the caller gives none")


class ResourceMapping(_Strict):
    """Build one canonical record (a FHIR R4 resource) from a message, a segment or one datatype value."""

    kind: Literal["resource"] = Field(description="resource")
    name: str | None = Field(None, description="Name other mappings use; defaults to the file name")
    description: str = Field("", description="What this mapping is for")
    resource: str = Field(description="Record type: Patient, Encounter, Location, Practitioner, ...")
    input: Literal["hl7v2", "csv", "fhir"] = Field(
        "hl7v2",
        description="What the mapping reads: HL7 v2 paths, CSV column headers, or FHIRPath expressions",
    )
    context: str | None = Field(
        None,
        description="HL7 v2: datatype the mapping reads (e.g. XCN, PL): its paths are then XCN.1...; "
        "empty: the message",
    )
    params: dict[str, ParamSpec] = Field(
        default_factory=dict, description="Parameters callers set with `with:`"
    )
    key: KeySpec | None = Field(
        None, description="Business key; without one every message creates a new record"
    )
    mode: Literal["merge", "replace", "fill"] = Field(
        "merge",
        description="merge: update the elements this mapping sets; replace: the record becomes exactly "
        "this; fill: set only elements the stored record does not have yet (e.g. doctors named in ADT "
        "must not overwrite the staff master file)",
    )
    without_key: Literal["error", "skip", "create"] = Field(
        "error",
        description="When the key value is empty: error (AE, code 101, if the key is `required`), "
        "skip the record (references to it are dropped), or create a new record each time",
    )
    create: bool = Field(True, description="false: only update a record that already exists with this key")
    rules: list[Rule] = Field(default_factory=list, description="The rules, applied in order")


class DatatypeMapping(_Strict):
    """Turn one HL7 datatype value (one repetition) into a FHIR element; reused by resource mappings."""

    kind: Literal["datatype"] = Field(description="datatype")
    name: str | None = Field(None, description="Name other mappings use; defaults to the file name")
    description: str = Field("", description="What this mapping is for")
    datatype: str = Field(description="The HL7 datatype read (XPN, CX, XAD, XTN, CWE, PL, XCN...)")
    produces: str = Field(
        "", description="The FHIR datatype produced (HumanName, Identifier...), for the docs"
    )
    rules: list[Rule] = Field(default_factory=list, description="The rules, applied in order")


class RecordEntry(_Strict):
    """One record (or one per repetition) that a message yields."""

    record: str = Field(description="The resource mapping to run")
    as_: str | None = Field(None, alias="as", description="Alias other rules use with `ref:`")
    context: str | None = Field(
        None, description="HL7 path whose value is the mapping's context (skipped if empty)"
    )
    for_each: str | None = Field(None, description="HL7 path: run once per repetition / segment")
    when: Condition | list[Condition] | None = Field(
        None, description="Run only when this (or all of these) holds"
    )
    with_: dict[str, Any] = Field(
        default_factory=dict, alias="with", description="Parameters for the mapping"
    )
    create: bool | None = Field(
        None, description="false: only update a record that already exists (overrides the resource mapping)"
    )
    mode: Literal["merge", "replace", "fill"] | None = Field(
        None,
        description="Overrides the resource mapping's mode for this message: e.g. `fill` for a message "
        "that only refers to a record another feed owns (a charge names the visit but must not move it)",
    )
    critical: bool = Field(
        True,
        description="false: when this record cannot be built (e.g. a visit without a visit number or "
        "admit time), it is left out, the message's other records are stored, and the failure is a "
        "warning (ACK AA with an ERR of severity W); references to it are dropped",
    )


class ActionEntry(_Strict):
    """A store operation beyond upserts, run after the records are written."""

    action: Literal["merge_patient"] = Field(
        description="merge_patient: mark `source` replaced-by `target` and move its encounters to `target`"
    )
    args: dict[str, str] = Field(default_factory=dict, description="Aliases the action works on")


class MessageMatch(_Strict):
    """What the mapping handles: give `message` (HL7 v2), `csv` (rows of a CSV channel) or
    `resource` (FHIR REST writes)."""

    message: str | None = Field(None, description="HL7 v2: MSH-9.1 message code, e.g. ADT")
    events: list[str] = Field(default_factory=list, description="HL7 v2: MSH-9.2 trigger events; empty: any")
    csv: str | None = Field(
        None,
        description="CSV: the dataset name a CSV channel gives its rows (e.g. staff_roster); sources are "
        "column headers",
    )
    resource: str | None = Field(
        None,
        description="FHIR: the resourceType received (e.g. Practitioner); sources are FHIRPath expressions",
    )

    @property
    def input(self) -> str:
        return "csv" if self.csv else "fhir" if self.resource else "hl7v2"


class MessageMapping(_Strict):
    """Which records a message type yields."""

    kind: Literal["message"] = Field(description="message")
    name: str | None = Field(None, description="Name of the mapping; defaults to the file name")
    description: str = Field("", description="What this mapping is for")
    match: MessageMatch = Field(description="Which messages (MSH-9) this mapping handles")
    records: list[RecordEntry] = Field(
        default_factory=list, description="The records the message yields, in order"
    )
    actions: list[ActionEntry] = Field(
        default_factory=list, description="Store actions run after the records"
    )


class CodeTable(_Strict):
    """A code table: source code -> target value (a code, or a whole object such as a Coding)."""

    kind: Literal["table"] = Field(description="table")
    name: str | None = Field(None, description="Name rules use with `table:`; defaults to the file name")
    description: str = Field("", description="What the table translates")
    source_system: str = Field("", description="Where the codes come from, e.g. HL7 table 0001")
    target_system: str = Field("", description="The FHIR code system of the results")
    map: dict[str, Any] = Field(description="source code -> target value")
    unmapped: Literal["error", "default", "keep"] = Field(
        "error", description="A code not in the map: error (AE, code 103), use `default`, or keep the code"
    )
    default: Any = Field(None, description="The value for unmapped codes when unmapped is default")
    case_sensitive: bool = Field(False, description="Whether codes are matched case-sensitively")


class EventMapping(_Strict):
    """The payload of one outbound event (mappings/events/), built from the record change that caused it.

    WHEN the event fires (a status transition...) is decided in code (hms_ach/outbound/events.py);
    this file says WHAT its payload carries. Sources are FHIRPath expressions over the change:
    `resource` (the record's reference, e.g. Encounter/123), `versionId`, `action` (create, update
    or delete), `after` (the new content) and `before` (the previous content; absent on a create),
    e.g. `after.subject.reference`. An event a job or a sink emits (credential.expiring,
    claim.file_written...) has no record change: its sources are `resource` (the record it is about)
    and the facts its code hands over, named in the mapping's description (e.g. `days_left`). An
    element named like a FHIRPath time unit (hours, days...) is quoted in backticks. Each rule's target is one payload element; its top-level name is always in
    the payload, null when the value is empty, in the order of the rules. `use:`, `record:` and
    `ref:` are not allowed. Payloads carry FHIR references and codes, never names, birth dates or
    identifiers: a receiver that needs more reads the record through the API.
    """

    kind: Literal["event"] = Field(description="event")
    name: str | None = Field(None, description="Name of the mapping; defaults to the file name")
    description: str = Field("", description="What the event announces")
    event: str = Field(description="The event name, e.g. encounter.admitted")
    input: Literal["fhir"] = Field("fhir", description="Sources are FHIRPath expressions over the change")
    rules: list[Rule] = Field(default_factory=list, description="The payload elements, in order")


class Hl7Edit(_Strict):
    """One edit of an outbound HL7 v2 message. Give ``set`` (a field, component or subcomponent:
    PID-8, MSH-5.1, PV1-3.1.2) or ``drop`` (a segment name: every such segment goes). A ``set`` takes
    its new value from ``value`` (a constant) or ``copy`` (another path of the message as it is at
    this rule), or, with ``table`` alone, from the target's own value mapped through the code table;
    ``table`` also maps a ``copy``. A ``set`` changes every occurrence of the segment and the first
    repetition of the field."""

    set: str | None = Field(None, description="Path to write, e.g. MSH-5, PID-8, PV1-3.1")
    drop: str | None = Field(None, description="Segment to remove (every occurrence), e.g. NK1")
    value: str | None = Field(None, description="A constant: the new value, as ER7 text")
    copy_from: str | None = Field(None, alias="copy", description="Path whose value is written, e.g. MSH-3")
    table: str | None = Field(
        None,
        description="Code table (mappings/tables) the value (or the target's own value) is mapped through",
    )
    when: Condition | None = Field(None, description="The edit runs only when this holds")
    description: str = Field("", description="Why the edit is there")


class Hl7RecordRead(_Strict):
    """A record a generated message reads besides the one its event is about."""

    reference: str = Field(
        description="FHIRPath over the event's record giving the reference to read, e.g. subject.reference"
    )
    required: bool = Field(
        False, description="true: no message without it (the row is dead-lettered); false: read as empty"
    )


class Hl7Field(_Strict):
    """One field (component, subcomponent) of a generated message: where its value comes from.
    Give exactly one of ``value`` (a constant), ``fhirpath`` (an expression; its first result) or
    ``components`` (one expression per component, "" for an empty one). The context of the
    expressions is the event's record (at the version the event names), or each item of
    ``for_each``; the other records are ``%name`` (see ``records``), ``%now`` is the message's time
    (DTM) and ``%event`` the event's name. Values are escaped as ER7 text; trailing empty components
    are dropped."""

    set: str = Field(description="Path written, e.g. PID-8, PV1-3, MSH-5.1")
    value: str | None = Field(None, description="A constant, as ER7 text (not escaped)")
    fhirpath: str | None = Field(None, description="FHIRPath whose first result is the value, e.g. gender")
    components: list[str] | None = Field(
        None, description="One FHIRPath per component, in order; '' leaves a component empty"
    )
    for_each: str | None = Field(
        None,
        description="FHIRPath giving a list: the field repeats once per item (~), the expressions are "
        "evaluated on each item; no item: the field stays empty",
    )
    table: str | None = Field(None, description="Code table (mappings/tables) the value is mapped through")
    format: Literal["text", "dtm"] = Field(
        "text", description="dtm: a FHIR date or dateTime written as an HL7 DTM (YYYYMMDD[HHMMSS+ZZZZ])"
    )
    description: str = Field("", description="Where the value comes from, in words")


class Hl7Generate(_Strict):
    """How a message is built from a record event: its type, its segments in order (after MSH) and
    its fields. MSH is built by the engine: MSH-3/4 the sink's sending application and facility,
    MSH-7 the time, MSH-9 ``message_type``, MSH-10 ``HMS`` + the event id (the same on every
    attempt), MSH-11 P, MSH-12 2.5.1."""

    events: list[str] = Field(
        description="Record events the message is built from, e.g. [encounter.admitted]"
    )
    message_type: str = Field(description="MSH-9, e.g. ADT^A01^ADT_A01")
    segments: list[str] = Field(description="The segments after MSH, in order, e.g. [EVN, PID, PV1]")
    records: dict[str, Hl7RecordRead] = Field(
        default_factory=dict,
        description="Further records read, by the name expressions use (%patient), at their current version",
    )
    fields: list[Hl7Field] = Field(default_factory=list, description="The fields filled, in order")


class Hl7TransformMapping(_Strict):
    """An outbound HL7 v2 transform (mappings/hl7/): the edits made, in order, to a message an
    ``mllp`` sink routes or generates (``transform:`` of a route). Preview it with
    ``hms-ach mapping preview --transform NAME``; golden cases give ``transform:`` and
    ``expect: hl7:`` (the message after the edits). With ``generate:``, the file also builds the
    message from a record event (the sink's ``events:``), before its ``rules``; its preview and
    golden cases take the records as JSON (``generated:``)."""

    kind: Literal["hl7"] = Field(description="hl7")
    name: str | None = Field(None, description="Name routes use with `transform:`; defaults to the file name")
    description: str = Field("", description="What the transform is for (which receiver)")
    rules: list[Hl7Edit] = Field(default_factory=list, description="The edits, applied in order")
    generate: Hl7Generate | None = Field(
        None, description="Build the message from a record event (then apply `rules`); none: a transform only"
    )


#: The recipient rules a notification may name (besides fixed addresses).
RECIPIENT_RULES = ("employee", "managers", "peers", "operators", "requester", "notify_role")


class NotificationExample(_Strict):
    """A golden case of a notification: a sample event payload and what the message must say."""

    name: str = Field(description="Name of the case, shown when it fails")
    payload: dict[str, Any] = Field(description="The event payload (and `employee:` facts) to render with")
    subject: str | None = Field(None, description="The exact subject expected")
    text_contains: list[str] = Field(
        default_factory=list, description="Pieces of text the rendered text body must contain"
    )
    html_contains: list[str] = Field(
        default_factory=list, description="Pieces of text the rendered html body must contain"
    )


class NotificationMapping(_Strict):
    """A message to people for one outbound event (mappings/notifications/), sent by a `notify` sink.

    `subject`, `text` and `html` are Jinja2 templates, rendered in a sandbox (html with autoescape)
    over the event payload (`payload.days_left`, `payload.credential`...), the `employee` the event
    is about (`employee.name`, `employee.given`; empty when it names none) and the `recipient`
    (`recipient.name`, `recipient.rule`). `recipients` says who gets it: `employee` (the
    Practitioner's telecom), `managers` (the practitioners whose PractitionerRole in the same
    Organization has a manager role code), `peers` (the others with the employee's role there),
    `role:<code>` (every holder of an active PractitionerRole with that code), `notify_role` (the
    holders of the role the payload names in `notifyRole`, e.g. a late case's supervisor),
    `operators` (the addresses in the sink's `operators:` setting, e.g. for alerts), `requester` (the
    case's requester the payload names, e.g. a complainant: the contact of the stored RelatedPerson or
    Patient, by their preferred channel) or a fixed address. `examples` are its golden tests, run by
    `hms-ach notify test` and CI.
    """

    kind: Literal["notification"] = Field(description="notification")
    name: str | None = Field(None, description="Name of the notification; defaults to the file name")
    description: str = Field("", description="When it is sent and to whom")
    event: str = Field(description="The event it is sent for, e.g. credential.expiring")
    subject: str = Field(min_length=1, description="Jinja2 template of the subject (one line)")
    text: str = Field(min_length=1, description="Jinja2 template of the plain-text body")
    html: str | None = Field(None, description="Jinja2 template of an HTML body (autoescaped); optional")
    recipients: list[str] = Field(
        default_factory=lambda: ["employee"],
        min_length=1,
        description="employee | managers | peers | operators (the sink's `operators:`) | role:<code> (the "
        "holders of an active PractitionerRole with that code, e.g. role:supervisor) | notify_role (the "
        "holders of the role the payload names in `notifyRole`) | requester (the payload's `requester`: a "
        "RelatedPerson or Patient) | a fixed address (name@host, or +phone for http)",
    )
    examples: list[NotificationExample] = Field(
        default_factory=list, description="Golden cases: a sample payload and the expected message"
    )

    @field_validator("subject", "text", "html")
    @classmethod
    def _template_syntax(cls, value: str | None) -> str | None:
        if value is None:
            return value
        from jinja2 import TemplateSyntaxError
        from jinja2.sandbox import SandboxedEnvironment

        try:
            SandboxedEnvironment().parse(value)
        except TemplateSyntaxError as exc:
            raise ValueError(
                f"Jinja2 syntax error on line {exc.lineno} of the template: {exc.message}"
            ) from exc
        return value

    @field_validator("recipients")
    @classmethod
    def _recipient_rules(cls, value: list[str]) -> list[str]:
        for rule in value:
            role = rule.startswith("role:") and len(rule) > len("role:")
            if rule not in RECIPIENT_RULES and not role and "@" not in rule and not rule.startswith("+"):
                raise ValueError(
                    f"unknown recipient {rule!r}: expected one of {', '.join(RECIPIENT_RULES)}, role:<code>, "
                    "an e-mail address or a +phone number"
                )
        return value


#: FHIR R4 Task.status codes (required binding TaskStatus; the R4B model cuts it short).
TASK_STATUSES = tuple(sorted(COMPLETED_CODES[("Task", "status")]))
#: FHIR R4 Task.priority codes (required binding RequestPriority).
TASK_PRIORITIES = ("routine", "urgent", "asap", "stat")


class WorkflowSla(_Strict):
    """How long a case may stay in a state, by the case's priority, and where it goes when late."""

    minutes: dict[str, int] = Field(
        description="Task.priority (routine | urgent | asap | stat) -> minutes allowed in the state; a "
        "priority not listed has no timer",
    )
    escalate_to: str = Field(description="The state a late case moves to, e.g. escalated")
    notify_role: str | None = Field(None, description="The role whose queue the late case appears in")

    @field_validator("minutes")
    @classmethod
    def _priorities(cls, value: dict[str, int]) -> dict[str, int]:
        for priority, minutes in value.items():
            if priority not in TASK_PRIORITIES:
                raise ValueError(
                    f"unknown priority {priority!r}: expected one of {', '.join(TASK_PRIORITIES)}"
                )
            if minutes <= 0:
                raise ValueError(f"the SLA of priority {priority!r} is {minutes} minutes: expected > 0")
        return value


class WorkflowState(_Strict):
    """One business state of a case: the FHIR Task.status it implies and its SLA."""

    name: str = Field(
        min_length=1, pattern=r"^[a-z][a-z0-9-]*$", description="Task.businessStatus code, e.g. in-review"
    )
    status: str = Field(description="The Task.status a case in this state has, e.g. in-progress")
    description: str = Field("", description="What the state means")
    sla: WorkflowSla | None = Field(None, description="The SLA timer of the state; none: no timer")
    final: bool = Field(False, description="The case is closed in this state (no SLA, not open)")

    @field_validator("status")
    @classmethod
    def _task_status(cls, value: str) -> str:
        if value not in TASK_STATUSES:
            raise ValueError(f"unknown Task.status {value!r}: expected one of {', '.join(TASK_STATUSES)}")
        return value


class WorkflowTransition(_Strict):
    """A move a case may make from one state to another, and who may make it."""

    from_state: str = Field(alias="from", description="The state the case is in")
    to: str = Field(description="The state it moves to")
    roles: list[str] = Field(
        min_length=1, description="Roles allowed to make the move (docs/security.md), e.g. reviewer"
    )
    description: str = Field("", description="When the move is made")


class WorkflowAssignment(_Strict):
    """Who a new case is assigned to: the next available reviewer (docs/review-cases.md)."""

    role: str = Field(
        min_length=1,
        description="The PractitionerRole.code code a reviewer holds, e.g. reviewer (practitioner-role)",
    )
    credentials: list[str] = Field(
        default_factory=list,
        description="Practitioner.qualification codes every reviewer must hold, valid on the day",
    )
    shift_window_minutes: int = Field(
        0, ge=0, le=1440, description="A reviewer whose shift starts within this many minutes also qualifies"
    )


class WorkflowCategory(_Strict):
    """One category of case (a complaint's subject) and the department that handles it."""

    code: str = Field(
        min_length=1,
        max_length=64,
        pattern=r"^[a-z][a-z0-9-]*$",
        description="The category code, e.g. billing",
    )
    display: str = Field("", description="What the category covers")
    department: str | None = Field(
        None,
        min_length=1,
        max_length=64,
        description="The department that handles it: the department text the staff records carry "
        "(a Practitioner's department extension, an Organization identifier such as PRIVACY); "
        "none: the routing's default_department",
    )
    priority: str | None = Field(
        None, description="Task.priority of its cases when the request names none (default: routine)"
    )

    @field_validator("priority")
    @classmethod
    def _priority(cls, value: str | None) -> str | None:
        if value is not None and value not in TASK_PRIORITIES:
            raise ValueError(f"unknown priority {value!r}: expected one of {', '.join(TASK_PRIORITIES)}")
        return value


class WorkflowRouting(_Strict):
    """Which department a new case goes to, by its category (a complaint's subject); its officer is
    then chosen among that department's holders of the assignment role."""

    default_department: str = Field(
        min_length=1, max_length=64, description="The department of a category that names none"
    )
    categories: list[WorkflowCategory] = Field(
        min_length=1, description="The categories a case may name, each with its department"
    )

    @field_validator("categories")
    @classmethod
    def _unique(cls, value: list[WorkflowCategory]) -> list[WorkflowCategory]:
        seen: set[str] = set()
        for category in value:
            if category.code in seen:
                raise ValueError(f"category {category.code!r} is listed twice: expected unique codes")
            seen.add(category.code)
        return value

    def category(self, code: str) -> WorkflowCategory | None:
        """The category ``code``; None when the routing has none."""
        return next((c for c in self.categories if c.code == code), None)


class WorkflowPolicy(_Strict):
    """A rule the findings of a case must keep: a FHIRPath over the QuestionnaireResponse that is
    true when the rule holds (docs/review-cases.md, "Findings and policies")."""

    id: str = Field(
        min_length=1, pattern=r"^[a-z][a-z0-9-]*$", description="The rule's code, e.g. signature-required"
    )
    description: str = Field("", description="What the rule checks")
    expression: str = Field(
        min_length=1,
        description="FHIRPath over the QuestionnaireResponse that must be true, e.g. "
        "item.where(linkId = 'score').answer.valueInteger <= 10",
    )
    severity: Literal["error", "warning", "information"] = Field(
        "error", description="error: the case moves to on_violation; warning, information: reported only"
    )
    message: str = Field(min_length=1, description="What a violation says (no patient data)")


class WorkflowMapping(_Strict):
    """A case workflow on FHIR Task (mappings/workflows/): the case type, its states (Task.status
    with a business status), the allowed transitions and the roles that may move them, the form
    findings answer (a Questionnaire id), who a new case is assigned to, and the SLA of each state
    per priority with its escalation target. hms_ach/cases/ runs it; docs/review-cases.md."""

    kind: Literal["workflow"] = Field(description="workflow")
    name: str | None = Field(None, description="The case type code (Task.code); defaults to the file name")
    description: str = Field("", description="What kind of case it is")
    display: str = Field("", description="The case type's display text (Task.code.text)")
    form: str = Field(
        min_length=1,
        description="The id of the Questionnaire the findings answer: a form file forms/<id>.json beside "
        "the workflow (an R4 Questionnaire, published as Questionnaire/<id>)",
    )
    initial: str = Field(description="The state of a new case")
    assignment: WorkflowAssignment = Field(description="Who a new case is assigned to")
    states: list[WorkflowState] = Field(min_length=1, description="The business states, in order")
    transitions: list[WorkflowTransition] = Field(
        default_factory=list, description="The moves allowed between states"
    )
    routing: WorkflowRouting | None = Field(
        None, description="Department by category (complaints); none: the request names the department"
    )
    policies: list[WorkflowPolicy] = Field(
        default_factory=list, description="The rules the findings must keep, run on every submission"
    )
    on_findings: str | None = Field(
        None, description="The state a case moves to when its findings break no error rule, e.g. resolved"
    )
    on_violation: str | None = Field(
        None, description="The state a case moves to when its findings break an error rule, e.g. escalated"
    )


MappingFile = Annotated[
    ResourceMapping
    | DatatypeMapping
    | MessageMapping
    | CodeTable
    | EventMapping
    | Hl7TransformMapping
    | NotificationMapping
    | WorkflowMapping,
    Field(discriminator="kind"),
]

KINDS: dict[str, type[BaseModel]] = {
    "message": MessageMapping,
    "resource": ResourceMapping,
    "datatype": DatatypeMapping,
    "table": CodeTable,
    "event": EventMapping,
    "hl7": Hl7TransformMapping,
    "notification": NotificationMapping,
    "workflow": WorkflowMapping,
}

Rule.model_rebuild()
KeySpec.model_rebuild()
