"""channels.yaml: interpolation, typed channel settings, and file:line:col errors from `hms-ach check`."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hms_ach.app.cli import app
from hms_ach.app.config import load_config
from hms_ach.core.errors import ConfigErrors

ROOT = Path(__file__).resolve().parents[3]


def test_shipped_channels_yaml_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HMS_ACH_MLLP_PORT", raising=False)
    cfg = load_config(ROOT / "channels.yaml")
    assert cfg.channels[0].type == "mllp" and cfg.channels[0].port == 2575
    assert cfg.http.port == 8080


def test_interpolation_with_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "c.yaml").write_text(
        "http:\n  port: ${MY_PORT:-9090}\nchannels:\n  - name: a\n    type: mllp\n    port: ${MLLP_P}\n"
    )
    monkeypatch.setenv("MLLP_P", "3000")
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.http.port == 9090 and cfg.channels[0].port == 3000
    monkeypatch.delenv("MLLP_P")
    with pytest.raises(ConfigErrors) as info:
        load_config(tmp_path / "c.yaml")
    assert "c.yaml:6:" in str(info.value) and "MLLP_P" in str(info.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("channels:\n  - name: a\n    type: mlp\n", ["c.yaml:3:5", "did you mean 'mllp'"]),
        (
            "channels:\n  - name: a\n    type: mllp\n    prot: 1\n",
            ["c.yaml:4:5", "unknown key 'prot'", "did you mean 'port'"],
        ),
        ("http:\n  port: lots\n", ["c.yaml:2:3", "port"]),
        ("engine:\n  database_url: [\n", ["c.yaml:", "YAML syntax error"]),
        (
            "channels:\n  - name: a\n    type: mllp\n  - name: a\n    type: mllp\n    port: 2\n",
            ["used twice"],
        ),
    ],
)
def test_config_errors_name_file_line_col(tmp_path: Path, text: str, expected: list[str]) -> None:
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigErrors) as info:
        load_config(tmp_path / "c.yaml")
    for part in expected:
        assert part in str(info.value)


def test_check_command(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "mappings", tmp_path / "mappings")
    shutil.copy(ROOT / "channels.yaml", tmp_path / "channels.yaml")
    runner = CliRunner()
    ok = runner.invoke(app, ["check", "--config", str(tmp_path / "channels.yaml")])
    assert ok.exit_code == 0, ok.output
    broken = tmp_path / "mappings" / "resources" / "patient.yaml"
    broken.write_text(
        broken.read_text()
        .replace("table: administrative_sex", "table: administrative_sexx")
        .replace("function: hl7_date\n", "function: hl7_dat\n")
    )
    bad = runner.invoke(app, ["check", "--config", str(tmp_path / "channels.yaml")])
    assert bad.exit_code == 1
    lines = [line for line in bad.output.splitlines() if "patient.yaml:" in line]
    assert any(
        "unknown table 'administrative_sexx'" in line and "did you mean 'administrative_sex'" in line
        for line in lines
    ), bad.output
    assert any("unknown function 'hl7_dat'" in line for line in lines), bad.output
    assert all(line.split(":")[1].isdigit() for line in lines)
