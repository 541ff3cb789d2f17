"""The root ``voltcredit`` command finds its sub-commands as plugins."""

from __future__ import annotations

import pytest

from backend import cli


def test_no_command_prints_help_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    assert "meter-sim" in capsys.readouterr().out


def test_plugins_are_registered() -> None:
    parser = cli.build_parser()
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["meter-sim", "--help"])
    assert info.value.code == 0


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["no-such-command"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_a_command_returns_its_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    # keygen without --out is a usage error; with a bad path it fails cleanly with 1.
    assert cli.main(["meter-sim", "keygen", "--out", "/nonexistent-dir/k"]) == 1
    assert "cannot write key files" in capsys.readouterr().err
