"""``hms-ach token``: prints a token of the local issuer that the engine's verifier accepts."""

from __future__ import annotations

import shutil
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hms_ach.app.cli import app
from hms_ach.app.config import load_config
from hms_ach.auth import create_authenticator, with_environment
from hms_ach.auth.local_issuer import KEY_FILE_NAME

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    shutil.copy(ROOT / "channels.yaml", tmp_path / "channels.yaml")
    shutil.copytree(ROOT / "mappings", tmp_path / "mappings")
    for name in ("HMS_ACH_AUTH_MODE", "HMS_ACH_AUTH_ISSUER", "HMS_ACH_AUTH_AUDIENCE", "HMS_ACH_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def token(workdir: Path, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["token", *args, "--config", str(workdir / "channels.yaml")])
    return result.exit_code, result.stdout, result.stderr


async def test_round_trip(workdir: Path) -> None:
    code, out, err = token(
        workdir,
        "--scope",
        "patient/*.read launch/patient",
        "--patient",
        "pat-9",
        "--sub",
        "dr-who",
        "--role",
        "scheduler",
        "--role",
        "employee",
        "--employee-id",
        "E-9",
        "--department",
        "ICU",
        "--department",
        "ER",
        "--ttl",
        "15m",
    )
    assert code == 0, err
    printed = out.strip()
    assert printed.count(".") == 2 and "\n" not in printed  # the token alone on stdout
    key_file = workdir / "data" / KEY_FILE_NAME  # engine.data_dir defaults to data/ next to channels.yaml
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert key_file.read_text() not in out + err  # the key is never printed

    cfg = load_config(workdir / "channels.yaml")
    authenticator = create_authenticator(with_environment(cfg.auth, {}), cfg.data_dir)
    caller = await authenticator.authenticate(f"Bearer {printed}", "127.0.0.1")
    assert (caller.sub, caller.patient, caller.employee_id) == ("dr-who", "pat-9", "E-9")
    assert caller.roles == {"scheduler", "employee"} and caller.departments == {"ICU", "ER"}
    assert caller.policy.patient_compartment("Observation", "search") == "pat-9"
    assert caller.expires_at is not None


async def test_a_token_with_roles_only(workdir: Path) -> None:
    """No --scope: a token for /api/v1 or /metrics carries roles and grants nothing under /fhir."""
    code, out, err = token(workdir, "--role", "operator", "--sub", "prometheus")
    assert code == 0, err
    cfg = load_config(workdir / "channels.yaml")
    authenticator = create_authenticator(with_environment(cfg.auth, {}), cfg.data_dir)
    caller = await authenticator.authenticate(f"Bearer {out.strip()}", "127.0.0.1")
    assert caller.roles == {"operator"} and caller.grant("metrics.read").allowed
    assert not caller.scopes.texts  # no /fhir access


def test_the_data_dir_variable_is_honoured(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HMS_ACH_DATA_DIR", str(workdir / "secrets"))
    code, _, err = token(workdir, "--scope", "system/*.rs")
    assert code == 0, err
    assert (workdir / "secrets" / KEY_FILE_NAME).exists() and not (workdir / "data").exists()


def test_refusals(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, err = token(workdir, "--scope", "user/*.rs", "--ttl", "1w")
    assert code == 2 and "expected a lifetime" in err
    code, _, err = token(workdir, "--scope", "user/*.rs", "--ttl", "30d")
    assert code == 2 and "1 to 604800 seconds" in err
    code, _, err = token(workdir, "--scope", "user/*.rs", "--role", "root")
    assert code == 2 and "unknown role root" in err
    code, _, err = token(workdir, "--scope", " ")
    assert code == 2 and "at least one scope" in err
    monkeypatch.setenv("HMS_ACH_AUTH_MODE", "oidc")
    monkeypatch.setenv("HMS_ACH_AUTH_ISSUER", "https://idp.example")
    monkeypatch.setenv("HMS_ACH_AUTH_AUDIENCE", "hms-ach")
    code, out, err = token(workdir, "--scope", "user/*.rs")
    assert code == 2 and out == "" and "local issuer only" in err
    assert not (workdir / "data").exists()
