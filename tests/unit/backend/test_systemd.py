"""The backend's systemd side: environment, notifier, watchdog loop, and the shipped unit files."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from backend.adapters.sdnotify import Notifier
from backend.api.cli import watchdog
from backend.api.routes.system import DatabaseHealth
from backend.config import ConfigError, SystemdEnv, systemd_env

SYSTEMD = Path(__file__).resolve().parents[3] / "systemd"
UNITS = (
    "voltcredit-backend.service",
    "voltcredit-gateway@.service",
    "voltcredit-meter-sim.service",
)


# ------------------------------------------------------------------ environment


def test_systemd_env_reads_the_socket_and_the_watchdog_of_this_process() -> None:
    env = {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "30000000"}
    assert systemd_env(env, pid=42) == SystemdEnv(
        notify_socket="/run/systemd/notify", watchdog_usec=30_000_000
    )
    assert systemd_env({**env, "WATCHDOG_PID": "42"}, pid=42).watchdog_usec == 30_000_000
    # The watchdog is for another process (a parent's): not ours to feed.
    assert systemd_env({**env, "WATCHDOG_PID": "7"}, pid=42).watchdog_usec is None
    assert systemd_env({}, pid=42) == SystemdEnv()
    assert systemd_env({"NOTIFY_SOCKET": ""}, pid=42) == SystemdEnv()


# The last is a full-width 3 (str.isdigit says yes): systemd writes ASCII digits only.
@pytest.mark.parametrize("bad", ["0", "-5", "1e6", "abc", "\uff13"])
def test_systemd_env_refuses_a_bad_watchdog_interval(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"environment: WATCHDOG_USEC: not a positive integer"):
        systemd_env({"WATCHDOG_USEC": bad}, pid=1)


# ------------------------------------------------------------------ notifier


@contextlib.contextmanager
def bound(address: str) -> Iterator[socket.socket]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        sock.settimeout(2)
        yield sock


def drain(sock: socket.socket) -> list[bytes]:
    got = []
    sock.setblocking(False)  # noqa: FBT003 - socket API
    with contextlib.suppress(BlockingIOError):
        while True:
            got.append(sock.recv(4096))
    return got


def test_notifier_sends_key_value_lines_to_a_path_or_an_abstract_socket(tmp_path: Path) -> None:
    with bound(str(tmp_path / "notify")) as sock:
        assert Notifier(str(tmp_path / "notify")).ready("serving x")
        assert sock.recv(4096) == b"READY=1\nSTATUS=serving x"
    name = f"voltcredit-test-{uuid.uuid4().hex}"
    with bound("\0" + name) as sock:
        notifier = Notifier("@" + name)
        assert notifier.enabled
        assert notifier.watchdog()
        assert notifier.stopping()
        assert sock.recv(4096) == b"WATCHDOG=1"
        assert sock.recv(4096) == b"STOPPING=1\nSTATUS=stopping"


def test_notifier_without_socket_does_nothing_and_a_dead_socket_is_not_fatal(
    tmp_path: Path,
) -> None:
    assert not Notifier(None).enabled
    assert not Notifier(None).ready("x")
    assert not Notifier(str(tmp_path / "nobody-listens")).watchdog()


# ------------------------------------------------------------------ watchdog loop


class ScriptedCheck:
    """Answers the health probes from a script (then repeats the last answer)."""

    def __init__(self, *answers: DatabaseHealth | Exception, rounds: int) -> None:
        self.answers = list(answers)
        self.timeouts: list[float] = []
        self.rounds = rounds
        #: Set once ``rounds`` probes were made.
        self.done = asyncio.Event()

    async def __call__(self, timeout_s: float) -> DatabaseHealth:
        self.timeouts.append(timeout_s)
        if len(self.timeouts) >= self.rounds:
            self.done.set()
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


OK = DatabaseHealth(answered=True)
DOWN = DatabaseHealth(answered=False, problem="database unreachable: refused")
OLD_SCHEMA = DatabaseHealth(
    answered=True, problem="database schema at ['0007'], this code expects 0006"
)


async def run_watchdog(
    tmp_path: Path, check: ScriptedCheck, watchdog_usec: int | None
) -> list[bytes]:
    """What the watchdog loop sends until ``check`` has been asked ``check.rounds`` times."""
    got: list[bytes] = []
    loop = asyncio.get_running_loop()
    with bound(str(tmp_path / "notify")) as sock:
        sock.setblocking(False)  # noqa: FBT003 - socket API

        async def read() -> None:
            # Read as systemd does, at once: an unread socket holds only a few datagrams.
            while True:
                got.append(await loop.sock_recv(sock, 4096))

        reader = asyncio.create_task(read())
        task = asyncio.create_task(
            watchdog(
                check,
                Notifier(str(tmp_path / "notify")),
                watchdog_usec=watchdog_usec,
                serving="serving http://h:1",
            )
        )
        await asyncio.wait_for(check.done.wait(), 10)
        for running in (task, reader):
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running
        return got + drain(sock)


async def test_watchdog_is_fed_only_while_the_database_answers(tmp_path: Path) -> None:
    check = ScriptedCheck(OK, OK, DOWN, RuntimeError("boom"), DOWN, OK, OLD_SCHEMA, OK, rounds=9)
    got = await run_watchdog(tmp_path, check, watchdog_usec=20_000)
    # One WATCHDOG per answering round; a STATUS only when it changes.
    assert got[:13] == [
        b"WATCHDOG=1",
        b"STATUS=serving http://h:1; ready",
        b"WATCHDOG=1",
        b"STATUS=serving http://h:1; database unreachable: refused",
        b"STATUS=serving http://h:1; database check failed: RuntimeError('boom')",
        b"STATUS=serving http://h:1; database unreachable: refused",
        b"WATCHDOG=1",
        b"STATUS=serving http://h:1; ready",
        # Another schema revision (a rolling upgrade): alive, so fed; not ready, says why.
        b"WATCHDOG=1",
        b"STATUS=serving http://h:1; database schema at ['0007'], this code expects 0006",
        b"WATCHDOG=1",
        b"STATUS=serving http://h:1; ready",
        b"WATCHDOG=1",
    ]
    # Half of WATCHDOG_USEC between rounds, and a probe never waits longer than half that.
    assert set(check.timeouts) == {0.005}


async def test_without_a_watchdog_only_the_status_is_kept(tmp_path: Path) -> None:
    check = ScriptedCheck(OK, rounds=1)
    assert await run_watchdog(tmp_path, check, watchdog_usec=None) == [
        b"STATUS=serving http://h:1; ready"
    ]
    assert check.timeouts == [2.0]  # /readyz's timeout; the next round is 30 s away


# ------------------------------------------------------------------ unit files


def settings(name: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in (SYSTEMD / name).read_text().splitlines():
        if line and not line.startswith(("#", "[", " ")) and "=" in line:
            key, value = line.split("=", 1)
            out.setdefault(key, []).append(value)
    return out


def test_backend_unit_is_a_watched_notify_service() -> None:
    s = settings("voltcredit-backend.service")
    assert s["Type"] == ["notify"]
    assert s["NotifyAccess"] == ["main"]
    assert s["WatchdogSec"] == ["30"]
    assert s["Restart"] == ["always"]
    assert s["StartLimitIntervalSec"] == ["0"]
    assert s["ExecStart"] == ["/opt/voltcredit/.venv/bin/voltcredit -v backend run"]
    assert s["Environment"] == [
        "PYTHONUNBUFFERED=1",
        "VOLTCREDIT_CONFIG=/etc/voltcredit/backend.toml",
    ]
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "MemoryDenyWriteExecute": "yes",
        "CapabilityBoundingSet": "",
        # sd_notify needs AF_UNIX.
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        # The key store must be 0700 (backend.keys.store refuses anything looser).
        "StateDirectoryMode": "0700",
    }.items():
        assert s[key] == [value], key


def test_meter_sim_unit_restarts_but_claims_no_watchdog() -> None:
    # meter_sim does not speak sd_notify: a WatchdogSec would kill it every interval.
    sources = (SYSTEMD.parent / "meter_sim").rglob("*.py")
    assert not any("NOTIFY_SOCKET" in path.read_text() for path in sources)
    s = settings("voltcredit-meter-sim.service")
    assert s["Type"] == ["simple"]
    assert "WatchdogSec" not in s
    assert s["Restart"] == ["always"]
    assert s["NoNewPrivileges"] == ["yes"]
    assert s["ProtectSystem"] == ["strict"]


@pytest.mark.parametrize("name", UNITS)
def test_systemd_analyze_verifies_the_unit(name: str, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed")
    # The installed path /opt/voltcredit does not exist here: point at this venv's command.
    command = Path(sys.executable).parent / "voltcredit"
    assert command.exists()
    unit = tmp_path / name.replace("@.", "@test.")
    unit.write_text(
        (SYSTEMD / name).read_text().replace("/opt/voltcredit/.venv/bin/voltcredit", str(command))
    )
    done = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, check=False
    )
    assert (done.returncode, done.stdout + done.stderr) == (0, "")
