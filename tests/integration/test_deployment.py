"""Deployment (issue 19 item 3): ``hms-ach init``, the image's entry script, the compose file's
configuration and the systemd unit, each run with the same commands outside Docker (``docker build``
cannot run here): the entry script starts a real engine that ``hms-ach send`` feeds over MLLP; the
compose environment passes ``hms-ach check``; ``systemd-analyze verify`` takes the unit."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from ruamel.yaml import YAML
from typer.testing import CliRunner

from hms_ach.app.cli import app
from tests.conftest import PG_URL
from tests.integration.engine_helpers import wait_until_live

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def bin_dir(tmp_path: Path) -> Path:
    """A folder with an ``hms-ach`` command that runs this checkout's code with this interpreter (the
    venv's console script may belong to another checkout), first on PATH for the scripts."""
    folder = tmp_path / "bin"
    folder.mkdir()
    command = folder / "hms-ach"
    command.write_text(f'#!/bin/sh\nPYTHONPATH="{ROOT}" exec "{sys.executable}" -m hms_ach.app.cli "$@"\n')
    command.chmod(0o755)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_init_scaffolds_a_deployment_that_checks(tmp_path: Path) -> None:
    home = tmp_path / "site"
    result = CliRunner().invoke(app, ["init", str(home)])
    assert result.exit_code == 0, result.output
    assert (home / "channels.yaml").read_text() == (ROOT / "channels.yaml").read_text()
    shipped = sorted(p.relative_to(ROOT / "mappings") for p in (ROOT / "mappings").rglob("*.yaml"))
    assert sorted(p.relative_to(home / "mappings") for p in (home / "mappings").rglob("*.yaml")) == shipped
    data = home / "data"
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert (data / "audit.key").is_file() and (data / "token_signing_key.pem").is_file()
    checked = CliRunner().invoke(app, ["check", "--config", str(home / "channels.yaml")])
    assert checked.exit_code == 0, checked.output
    again = CliRunner().invoke(app, ["init", str(home)])
    assert again.exit_code == 1 and "exists" in again.output  # never overwritten by accident


def test_every_mappings_folder_is_installed_with_the_wheel() -> None:
    data_files = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["data-files"]
    listed = {k.removeprefix("share/hms-ach/mappings/") for k in data_files if "/mappings/" in k}
    folders = {  # mapping folders, and the forms (R4 Questionnaire JSON) of the workflows
        p.relative_to(ROOT / "mappings").as_posix()
        for p in (ROOT / "mappings").rglob("*")
        if p.is_dir() and (any(p.glob("*.yaml")) or any(p.glob("*.json")))
    }
    assert listed == folders
    assert not list((ROOT / "mappings").glob("*.yaml")) and not list((ROOT / "mappings").glob("*/*/*.yaml"))


def test_the_entry_script_runs_the_engine_and_drains_on_sigterm(tmp_path: Path, bin_dir: Path) -> None:
    """What the container runs, outside it: a fresh HMS_ACH_HOME is scaffolded, checked and run; an
    A01 is ACKed; SIGTERM (docker stop) ends it with 0."""
    home, http, mllp = tmp_path / "home", free_port(), free_port()
    env = os.environ | {
        "HMS_ACH_HOME": str(home),
        "HMS_ACH_HTTP_HOST": "127.0.0.1",
        "HMS_ACH_HTTP_PORT": str(http),
        "HMS_ACH_MLLP_HOST": "127.0.0.1",
        "HMS_ACH_MLLP_PORT": str(mllp),
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    env.pop("HMS_ACH_DATABASE_URL", None)
    proc = subprocess.Popen(
        [str(ROOT / "scripts" / "docker-entrypoint.sh")],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        stdout = proc.stdout
        assert stdout is not None
        wait_until_live(f"http://127.0.0.1:{http}", proc, lambda: stdout.read().decode(), 60)
        sent = subprocess.run(
            [str(bin_dir / "hms-ach"), "send", str(ROOT / "samples" / "hl7" / "adt_a01.hl7")],
            env=env, cwd=home, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert sent.returncode == 0 and "ACK AA" in sent.stdout, sent.stdout + sent.stderr
        assert (home / "hms_ach.db").exists()  # the embedded store, in the deployment folder
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _compose_environment() -> dict[str, str]:
    compose = YAML(typ="safe").load((ROOT / "compose.yaml").read_text())
    return {str(k): str(v) for k, v in compose["services"]["hms-ach"]["environment"].items()}


def test_the_compose_configuration_checks_outside_docker(tmp_path: Path, bin_dir: Path) -> None:
    """The hms-ach service's environment, with the service names replaced by this machine's
    PostgreSQL and RabbitMQ, passes `hms-ach check` on a scaffolded folder, and every variable it
    sets is one the shipped channels.yaml reads."""
    shipped = (ROOT / "channels.yaml").read_text()
    env_vars = _compose_environment()
    assert [n for n in env_vars if "${" + n not in shipped and n != "HMS_ACH_DATABASE_URL"] == []
    home = tmp_path / "home"
    assert CliRunner().invoke(app, ["init", str(home)]).exit_code == 0
    env = dict(env_vars)
    env["HMS_ACH_DATABASE_URL"] = PG_URL or f"sqlite:///{tmp_path / 'compose.db'}"
    env["HMS_ACH_RABBITMQ_URL"] = "amqp://guest:guest@127.0.0.1:5672/"
    env["HMS_ACH_TIMEZONE"] = "UTC"
    checked = subprocess.run(
        [str(bin_dir / "hms-ach"), "check", "--config", str(home / "channels.yaml")],
        env=os.environ | env, cwd=home, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "scripts/docker-entrypoint.sh" in dockerfile and "USER hms-ach" in dockerfile


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_the_systemd_unit_verifies(tmp_path: Path, bin_dir: Path) -> None:
    unit = (ROOT / "docs" / "deploy" / "hms-ach.service").read_text()
    local = unit.replace("/opt/hms-ach/bin/hms-ach", str(bin_dir / "hms-ach")).replace(
        "/srv/hms-ach", str(tmp_path)
    )
    path = tmp_path / "hms-ach.service"
    path.write_text(local)
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and "Unknown" not in done.stderr, done.stderr
