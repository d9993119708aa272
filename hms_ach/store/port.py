"""The store port: the handles through which every other package reaches the store.

Only ``hms_ach/store`` imports SQLAlchemy (an import-linter contract in CI checks it). Everything
else reaches the database through the functions and classes of this package, which take one of
two handles:

* :data:`Tx`, the writer's transaction. The group-commit writer (:mod:`hms_ach.store.writer`)
  opens it and hands it to each job; a job passes it on to store functions (message log, records,
  outbox, audit, job runs...) and never runs SQL on it itself. Outside ``store/`` it is opaque.
* :class:`hms_ach.store.db.Store`, the database: its reader pool serves reads that are not part of
  a write (FHIR reads and searches, the workforce API, the outbox dispatcher).
"""

from __future__ import annotations

from typing import TypeAlias

from sqlalchemy import Connection

#: One write transaction of the group-commit writer (opaque outside ``hms_ach/store``).
Tx: TypeAlias = Connection

__all__ = ["Tx"]
