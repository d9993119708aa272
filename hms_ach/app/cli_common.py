"""What the ``hms-ach`` sub-command modules share: the ``--config`` option, loading channels.yaml with
one clear line on error, the store of a config, the ``--since`` parser and the progress bar."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from hms_ach.app.config import Config, load_config
from hms_ach.core.errors import ConfigError, ConfigErrors

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="channels.yaml to use")]


class MessageStatus(StrEnum):
    """The statuses a stored message can have."""

    received = "received"
    processed = "processed"
    error = "error"
    rejected = "rejected"
    duplicate = "duplicate"


def load_or_exit(config: Path) -> Config:
    """channels.yaml, or one line per error and exit 2."""
    try:
        return load_config(config)
    except (ConfigErrors, ConfigError) as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from exc


def parse_since(text: str | None) -> datetime | None:
    """An ISO time, or an age (30m, 2h, 7d) before now; None for none."""
    if not text:
        return None
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text[-1] in units and text[:-1].isdigit():
        return datetime.now(UTC) - timedelta(seconds=int(text[:-1]) * units[text[-1]])
    try:
        value = datetime.fromisoformat(text)
    except ValueError as exc:
        raise typer.BadParameter(f"{text!r}: expected an ISO date/time or an age like 30m, 2h, 7d") from exc
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def store_of(config: Path) -> Any:
    """The store of ``config`` (its audit key installed, so what a command writes is chained)."""
    from hms_ach.store import audit
    from hms_ach.store.db import Store, database_url

    cfg = load_or_exit(config) if config.exists() else Config()
    store = Store(database_url(cfg.engine.database_url))
    try:  # what this process writes (replay) is chained with the engine's audit key, if it has one
        audit.install(store, cfg.audit, cfg.data_dir, create=False)
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from exc
    return store


@contextmanager
def progress(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """A progress bar on stderr for a long command (replay, corpus-check...): yields ``advance(n)``.
    Shown on a terminal only, so pipes and logs get none; ``HMS_ACH_PROGRESS=1`` forces it, ``0``
    turns it off."""
    wanted = os.environ.get("HMS_ACH_PROGRESS", "")
    show = wanted == "1" or (wanted != "0" and sys.stderr.isatty())
    if not show or total <= 0:

        def nothing(_n: int = 1) -> None:
            return None

        yield nothing
        return
    console = Console(stderr=True, force_terminal=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(description, total=total)

        def advance(n: int = 1) -> None:
            bar.advance(task, n)

        yield advance
