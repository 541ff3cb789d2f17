"""The shipped unit file: notify, watchdog, restart policy, hardening; systemd-analyze if there."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[3] / "systemd" / "voltcredit-gateway@.service"


def settings() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, value = line.split("=", 1)
            out.setdefault(key, []).append(value)
    return out


def test_unit_runs_the_gateway_under_systemds_watchdog() -> None:
    s = settings()
    assert s["Type"] == ["notify"]
    assert s["WatchdogSec"] == ["30"]
    assert s["Restart"] == ["always"]
    assert "gateway run --config /etc/voltcredit/gateway/%i.toml" in s["ExecStart"][0]
    for key, value in {
        "NoNewPrivileges": "true",
        "ProtectSystem": "strict",
        "PrivateTmp": "true",
        "ProtectHome": "true",
        "ReadWritePaths": "/var/lib/voltcredit/gateway/%i",
        "CapabilityBoundingSet": "",
    }.items():
        assert s[key] == [value], key


def test_systemd_analyze_finds_nothing_but_the_missing_install(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed")
    unit = tmp_path / "voltcredit-gateway@test.service"
    unit.write_text(UNIT.read_text())
    done = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, check=False
    )
    problems = [
        line
        for line in (done.stdout + done.stderr).splitlines()
        if line.strip() and "is not executable" not in line  # /opt/voltcredit is not installed here
    ]
    assert problems == []
