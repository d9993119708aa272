"""Name -> "module:attr" registries with lazy import and "did you mean" errors.

Components register in one visible place (a line in a registry dict), never by import side effects.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any


class Registry:
    def __init__(self, kind: str, entries: dict[str, str]):
        self.kind = kind
        self.entries = dict(entries)

    def names(self) -> list[str]:
        return sorted(self.entries)

    def suggest(self, name: str) -> str:
        hint = difflib.get_close_matches(name, self.entries, n=1)
        return f"; did you mean {hint[0]!r}?" if hint else ""

    def load(self, name: str) -> Any:
        target = self.entries.get(name)
        if target is None:
            raise KeyError(
                f"unknown {self.kind} {name!r}{self.suggest(name)} (known: {', '.join(self.names())})"
            )
        module, _, attr = target.partition(":")
        return getattr(importlib.import_module(module), attr)
