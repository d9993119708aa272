"""Who may do what in the console: one table, page or action -> the roles that may.

The roles come from the login token (``hms-ach console --role``, or the OIDC provider's roles claim):

* ``operator`` runs the engine: dashboard, messages, replay, outbox retry, channel pause/resume,
  mapping reload;
* ``analyst`` works on mappings: dashboard, messages (read), replay dry runs, the mapping workbench;
* ``auditor`` reads the audit trails and the dashboard, no message content.
"""

from __future__ import annotations

from collections.abc import Iterable

CONSOLE_ROLES = ("operator", "analyst", "auditor")

#: permission -> the roles that hold it.
PERMISSIONS: dict[str, frozenset[str]] = {
    "dashboard.read": frozenset(CONSOLE_ROLES),
    "messages.read": frozenset({"operator", "analyst"}),
    "messages.replay_preview": frozenset({"operator", "analyst"}),
    "messages.replay_apply": frozenset({"operator"}),
    "outbox.read": frozenset({"operator"}),
    "outbox.retry": frozenset({"operator"}),
    "workbench.use": frozenset({"operator", "analyst"}),
    "channels.control": frozenset({"operator"}),
    "audit.read": frozenset({"auditor"}),
}


def allowed(roles: Iterable[str], permission: str) -> bool:
    """Whether any of ``roles`` holds ``permission``; KeyError for a permission not in the table."""
    holders = PERMISSIONS[permission]
    return any(role in holders for role in roles)
