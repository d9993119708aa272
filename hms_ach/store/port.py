r"""The store port: the handles through which every other package reaches the store.

Only ``hms_ach/store`` imports SQLAlchemy (an import-linter contract in CI checks it). Everything
else reaches the database through the functions and classes of this package, which take one of
two handles:

* :data:`Tx`, a connection in a transaction. The group-commit writer (:mod:`hms_ach.store.writer`)
  opens one per batch and hands it to each job; :meth:`Store.transaction
  <hms_ach.store.db.Store.transaction>` opens one outside the writer (the outbox dispatcher, the
  837 sink, replay) and :meth:`Store.read <hms_ach.store.db.Store.read>` one of the reader pool.
  Code outside ``store/`` passes it on to store functions (message log, records, outbox, audit,
  job runs, :func:`~hms_ach.store.savepoint.savepoint`...) and never uses it itself.
* :class:`hms_ach.store.db.Store`, the database, for the store functions that read outside a write
  (FHIR reads and searches, the workforce API).

``Tx`` is a typed name for SQLAlchemy's ``Connection``, not a wrapper: the type checker does not
stop other code from calling its methods. What stops it is that nothing outside ``store/`` may
import SQLAlchemy to build a statement (the import-linter contract), and the rule above, which
review keeps (``grep -rn "begin_nested\|\.execute(" hms_ach | grep -v hms_ach/store/`` is empty).
"""

from __future__ import annotations

from typing import TypeAlias

from sqlalchemy import Connection

#: One write transaction of the group-commit writer (opaque outside ``hms_ach/store``).
Tx: TypeAlias = Connection

__all__ = ["Tx"]
