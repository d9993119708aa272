"""Why the store refuses a read or a write: domain errors, never HTTP statuses.

The FHIR interactions of :mod:`hms_ach.store.resources` (and the checks that the FHIR write path
runs inside the writer's transaction) raise these; the HTTP layer (:mod:`hms_ach.fhir.outcomes`)
translates each class to a status and an OperationOutcome. ``code`` is the issue type of the FHIR
IssueType value set (``not-found``, ``duplicate``, ``business-rule``...) that names the problem;
``expression`` the element it concerns, when there is one::

    DomainError
    ├── NotFound           the record (or version) is not known
    ├── Gone               the record was deleted
    ├── Invalid            the request itself is malformed (a bad ETag, criterion or reference)
    ├── RuleViolation      the content breaks a rule (a missing reference target, an overlap)
    ├── VersionConflict    the expected version (If-Match) is not the current one
    ├── MultipleMatches    a conditional criterion matches more than one record
    └── Conflict           a business key is taken
        ├── AlreadyExists  a create names a business key that another record has
        └── UniqueViolation  a unique constraint of the database refused the write
    └── StoreUnavailable   the store cannot commit now (no connection, a lock held, a deadline passed)

``StoreUnavailable`` is transient: nothing of the job is half-stored, and the same request sent
again later is answered normally (or from the duplicate store, if the job committed after all).
"""

from __future__ import annotations

from hms_ach.core.errors import HmsAchError


class DomainError(HmsAchError):
    """The store (or a rule checked in the writer's transaction) refuses the interaction."""

    default_code = "processing"

    def __init__(self, message: str, *, code: str | None = None, expression: str | None = None):
        self.message = message
        self.code = code or self.default_code
        self.expression = expression
        super().__init__(message)


class NotFound(DomainError):
    """The record (``reference``, as ``Type/id``) is not known."""

    default_code = "not-found"

    def __init__(self, reference: str, message: str | None = None):
        self.reference = reference
        super().__init__(message or f"{reference} is not known")


class Gone(DomainError):
    """The record was deleted."""

    default_code = "deleted"


class Invalid(DomainError):
    """The request itself is malformed: a bad version precondition, criterion or reference."""

    default_code = "invalid"


class RuleViolation(DomainError):
    """The content is well formed but breaks a rule (a reference to no record, overlapping shifts)."""

    default_code = "business-rule"


class VersionConflict(DomainError):
    """The version the client expects is not the current version of ``reference`` (0: none yet)."""

    default_code = "conflict"

    def __init__(self, reference: str, expected: int, current: int):
        self.reference = reference
        self.expected = expected
        self.current = current
        super().__init__(f"{reference} is at version {current}, not {expected}")


class MultipleMatches(DomainError):
    """A conditional criterion matches ``count`` records of ``resource_type``; it must match one at most."""

    default_code = "multiple-matches"

    def __init__(self, resource_type: str, count: int):
        self.resource_type = resource_type
        self.count = count
        super().__init__(f"the criterion matches {count} {resource_type} records")


class Conflict(DomainError):
    """The write would give a business key to a second record."""

    default_code = "duplicate"


class AlreadyExists(Conflict):
    """A create carries the business key ``identifier`` (``system|value``) of the record ``reference``."""

    def __init__(self, reference: str, identifier: str):
        self.reference = reference
        self.identifier = identifier
        super().__init__(f"{reference} already has the identifier {identifier}")


class UniqueViolation(Conflict):
    """A unique constraint of the database refused the write (``error_type``: the driver's error class)."""

    default_code = "conflict"

    def __init__(self, error_type: str):
        self.error_type = error_type
        super().__init__(f"a unique constraint refused the write ({error_type})")


class StoreUnavailable(DomainError):
    """The group-commit writer could not commit the job: the connection failed, the database is
    locked, or the caller's deadline passed first. ``reason`` is a short text without field values
    (the stage and the driver's error class, or "deadline"); answer 503 / AE and let the caller resend."""

    default_code = "transient"

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(f"the store is unavailable ({reason}); try again later")


__all__ = [
    "AlreadyExists",
    "Conflict",
    "DomainError",
    "Gone",
    "Invalid",
    "MultipleMatches",
    "NotFound",
    "RuleViolation",
    "StoreUnavailable",
    "UniqueViolation",
    "VersionConflict",
]
