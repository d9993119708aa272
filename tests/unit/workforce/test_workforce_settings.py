"""The ``workforce:`` section of channels.yaml: typed, with defaults, refused with its place when wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from hms_ach.app.config import load_config
from hms_ach.core.errors import ConfigErrors
from hms_ach.workforce import settings
from hms_ach.workforce.settings import WorkforceSettings

ROOT = Path(__file__).resolve().parents[3]


def write(tmp_path: Path, section: str) -> Path:
    path = tmp_path / "channels.yaml"
    path.write_text(f"engine:\n  mappings: {ROOT / 'mappings'}\n{section}")
    return path


def test_the_section_is_optional_and_typed(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")).workforce == WorkforceSettings()
    cfg = load_config(
        write(
            tmp_path,
            "workforce:\n  role_credentials: {RN: [RN, BLS]}\n  overtime:\n    rule_set: 8/80\n"
            "    department_timezones: {ICU: America/Chicago}\n    period_start: 2026-01-05\n",
        )
    )
    assert cfg.workforce.required_credentials("RN") == ["RN", "BLS"]
    assert cfg.workforce.required_credentials("LPN") == []
    assert cfg.workforce.overtime.rule_set == "8/80"
    assert cfg.workforce.overtime.period_start.isoformat() == "2026-01-05"
    assert str(cfg.workforce.overtime.timezone("ICU")) == "America/Chicago"
    assert str(cfg.workforce.overtime.timezone("ER")) == "UTC"


@pytest.mark.parametrize(
    ("section", "where"),
    [
        (
            "workforce:\n  overtime:\n    default_timezone: Mars/Olympus\n",
            "workforce.overtime.default_timezone",
        ),
        ("workforce:\n  max_shift_hours: 0\n", "workforce.max_shift_hours"),
        ("workforce:\n  overtime:\n    rule_set: monthly\n", "workforce.overtime.rule_set"),
        ("workforce:\n  max_shift_hour: 12\n", "did you mean 'max_shift_hours'"),
    ],
)
def test_a_wrong_value_is_refused_with_its_place(tmp_path: Path, section: str, where: str) -> None:
    with pytest.raises(ConfigErrors) as err:
        load_config(write(tmp_path, section))
    text = str(err.value)
    assert "channels.yaml:" in text and where in text, text


def test_the_settings_in_force() -> None:
    custom = WorkforceSettings(max_shift_hours=10)
    settings.use(custom)
    try:
        assert settings.current() is custom
    finally:
        settings.use(WorkforceSettings())
