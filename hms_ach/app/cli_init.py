"""``hms-ach init DIR``: scaffold a deployment (docs/deployment.md).

It writes, in ``DIR``:

* ``channels.yaml``, the shipped configuration (every setting commented; environment overrides);
* ``mappings/``, the default mappings, to be kept in git and edited there;
* ``data/``, the data directory (mode 0700) with its two keys: the audit key (``audit.key``, which
  chains the audit trail) and the local issuer's token signing key (``token_signing_key.pem``).

The defaults come from the installed package (``share/hms-ach`` under the installation prefix, where
the wheel puts them) or, in a source checkout (an editable install), from the repository itself. A
``DIR`` that already holds a ``channels.yaml`` is left alone unless ``--force``.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Annotated

import typer

#: Where the wheel installs the default configuration and mappings (pyproject ``data-files``).
SHARE = Path("share") / "hms-ach"


def defaults_dir() -> Path | None:
    """The folder holding the default ``channels.yaml`` and ``mappings/``: the installed share
    folder, else the source tree this package runs from; None when neither has them."""
    source_tree = Path(__file__).resolve().parents[2]
    for candidate in (Path(sys.prefix) / SHARE, source_tree):
        if (candidate / "channels.yaml").is_file() and (candidate / "mappings").is_dir():
            return candidate
    return None


def init(
    directory: Annotated[
        Path, typer.Argument(help="the deployment folder (made if missing)", file_okay=False)
    ],
    force: Annotated[bool, typer.Option("--force", help="overwrite channels.yaml and the mappings")] = False,
) -> None:
    """Scaffold a deployment in DIRECTORY: channels.yaml, the default mappings, the data directory
    with the audit key and the token signing key."""
    from hms_ach.auth.local_issuer import load_or_create_key
    from hms_ach.store.audit_keys import create_key, ensure_data_dir
    from hms_ach.store.audit_keys import key_path as audit_key_path
    from hms_ach.store.audit_settings import AuditSettings

    source = defaults_dir()
    if source is None:
        typer.echo("the default channels.yaml and mappings are not installed with this package", err=True)
        raise typer.Exit(2)
    config = directory / "channels.yaml"
    if config.exists() and not force:
        typer.echo(
            f"{config} exists: nothing written (give --force to overwrite it and the mappings)", err=True
        )
        raise typer.Exit(1)
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source / "channels.yaml", config)
    shutil.copytree(source / "mappings", directory / "mappings", dirs_exist_ok=True)
    data = directory / "data"
    ensure_data_dir(data)  # 0700
    audit_key = audit_key_path(AuditSettings(), data)
    if not audit_key.exists():
        create_key(audit_key)
    load_or_create_key(data)  # the local issuer's EC P-256 key
    typer.echo(
        f"wrote {config}, {directory / 'mappings'}/ and the keys in {data}/ (keep them out of git and "
        "backed up)\n"
        f"next: cd {directory} && hms-ach check && hms-ach run"
    )
