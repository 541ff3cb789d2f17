"""``voltcredit meter-sim`` as a technician runs it: separate processes, signals, restarts.

The simulator runs as its own process (the installed ``voltcredit`` console script) and is
read and topped up by further ``voltcredit meter-sim`` processes over Modbus. Its meters
draw nothing (``constant:0``) under a tariff without standing charge, so their credit
moves only when a token is applied, however long a test takes.
"""

from __future__ import annotations

import dataclasses
import json
import queue
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from firmware_protocol import messages
from firmware_protocol.messages import CreditToken, Ed25519Signer
from firmware_protocol.tariff import tariff_to_dict
from firmware_protocol.vectors import TEST_SEED
from tests.support.meters import TARIFF, credit_token, null_modem, voltcredit_command

pytestmark = pytest.mark.integration

METER: Final = 1_000_001  # the CLI's default first meter id
# Generous: CI machines have 2 cores and each CLI start imports the whole stack.
WAIT_S: Final = 60.0


def cli(*args: str | Path, cwd: Path, timeout: float = WAIT_S) -> subprocess.CompletedProcess[str]:
    """Run one ``voltcredit meter-sim`` command to completion."""
    return subprocess.run(
        [*voltcredit_command(), "meter-sim", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def cli_json(*args: str | Path, cwd: Path, code: int = 0) -> dict[str, Any]:
    """A ``--json`` command's output, after checking its exit code."""
    done = cli(*args, "--json", cwd=cwd)
    assert done.returncode == code, done.stderr
    out: dict[str, Any] = json.loads(done.stdout)
    return out


class Simulator:
    """A running ``meter-sim run --json`` process and the lines it prints."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        self.err_path = cwd / f"sim-{id(self)}.err"
        with self.err_path.open("w") as err:
            self.proc = subprocess.Popen(
                [*voltcredit_command(), "meter-sim", "run", "--json", "--status-every", "0", *args],
                cwd=cwd,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.out: list[str] = []
        self._reader = threading.Thread(target=self._read, name="meter-sim-stdout", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def event(self, name: str) -> dict[str, Any]:
        """Wait for the JSON event ``name`` (fails if the process ends first)."""
        while True:
            try:
                line = self.lines.get(timeout=WAIT_S)
            except queue.Empty:
                pytest.fail(f"meter-sim printed no {name!r} event in {WAIT_S} s")
            if line is None:
                pytest.fail(f"meter-sim ended before {name!r}: {self.stderr()}")
            self.out.append(line)
            if line.startswith("{"):
                data: dict[str, Any] = json.loads(line)
                if data.get("event") == name:
                    return data

    def stop(self, sig: signal.Signals) -> int:
        """Send ``sig``, wait for the exit, collect the rest of the output; the exit code."""
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=WAIT_S)
        self._reader.join(timeout=WAIT_S)
        while (line := self.lines.get_nowait()) is not None:
            self.out.append(line)
        return code

    def stderr(self) -> str:
        return self.err_path.read_text()

    def close(self) -> None:
        """Kill the process if a test left it running; release its pipe."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=WAIT_S)
        self._reader.join(timeout=WAIT_S)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


Start = Callable[..., Simulator]


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Start]:
    """``start(*args)`` runs a simulator in tmp_path; all are stopped after the test."""
    started: list[Simulator] = []

    def run(*args: str | Path) -> Simulator:
        sim = Simulator([str(a) for a in args], tmp_path)
        started.append(sim)
        return sim

    yield run
    for sim in started:
        sim.close()


@dataclasses.dataclass(frozen=True)
class Keys:
    """A key pair made by ``meter-sim keygen``."""

    seed: Path
    pub: Path
    keygen: subprocess.CompletedProcess[str]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    where = tmp_path_factory.mktemp("keys")
    done = cli("keygen", "--out", where / "test-key", "--key-id", "3", cwd=where)
    return Keys(where / "test-key.seed", where / "test-key.pub", done)


@pytest.fixture
def run_args(tmp_path: Path, keys: Keys) -> list[str]:
    """``run`` options for one meter with 1.00 EUR whose credit only tokens change."""
    tariff = dataclasses.replace(TARIFF, tariff_id=1, standing_charge_milli_per_day=0)
    path = tmp_path / "tariff.json"
    path.write_text(json.dumps(tariff_to_dict(tariff)))
    return [
        "--port", "0", "--trusted-key", str(keys.pub), "--state-dir", str(tmp_path / "state"),
        "--tariff", str(path), "--profile", "constant:0", "--credit", "1.00",
    ]  # fmt: skip


def without(args: list[str], *options: str) -> list[str]:
    """``args`` without the named options and their values."""
    out: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg in options:
            skip = True
        else:
            out.append(arg)
    return out


def signer(keys: Keys) -> Ed25519Signer:
    """The keygen'd private key, to sign in the test as make-token does."""
    seed = bytes.fromhex(keys.seed.read_text().strip())
    return Ed25519Signer(3, messages.load_private_key(seed))


def trusted(keys: Keys) -> dict[int, Ed25519PublicKey]:
    """The meters' view of the keygen'd key: the .pub line."""
    key_id, pub_hex = keys.pub.read_text().split()
    return {int(key_id): messages.load_public_key(bytes.fromhex(pub_hex))}


def make_token(keys: Keys, msg_id: int, amount: str, cwd: Path) -> str:
    """``meter-sim make-token`` for METER; the hex it prints."""
    done = cli(
        "make-token", "--seed-file", keys.seed, "--key-id", "3", "--meter", str(METER),
        "--msg-id", str(msg_id), "--amount", amount, cwd=cwd,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def status(port: int, cwd: Path, *extra: str) -> dict[str, Any]:
    return cli_json("status", "--port", str(port), *extra, cwd=cwd)


def token(port: int, hex_token: str, cwd: Path, code: int = 0) -> dict[str, Any]:
    return cli_json("token", "--port", str(port), hex_token, cwd=cwd, code=code)


# ----------------------------------------------------------------------- the tests


def test_keygen_writes_a_private_seed_and_a_trusted_key_line(keys: Keys) -> None:
    assert keys.keygen.returncode == 0, keys.keygen.stderr
    assert stat.S_IMODE(keys.seed.stat().st_mode) == 0o600
    key_id, pub_hex = keys.pub.read_text().split()
    assert (int(key_id), bytes.fromhex(pub_hex)) == (3, signer(keys).public_key_bytes())


def test_run_status_token_stop_and_restart(
    start: Start, run_args: list[str], keys: Keys, tmp_path: Path
) -> None:
    sim = start(*run_args)
    hex_token = make_token(keys, 1, "5.00", tmp_path)  # while the simulator starts
    data = bytes.fromhex(hex_token)
    header = messages.decode_unverified(data).header
    msg = messages.verify(data, trusted(keys), meter_id=METER, now=header.issued_at)
    assert isinstance(msg, CreditToken)
    assert (msg.header.msg_id, msg.amount_minor, msg.currency.code) == (1, 500, "EUR")
    assert msg.header.expires_at - msg.header.issued_at == 7 * 86_400  # --valid-days 7

    ready = sim.event("ready")
    assert ready["meters"] == [METER]
    (port,) = ready["ports"]
    assert port > 0
    before = status(port, tmp_path)
    assert (before["meter"], before["unit"], before["currency"]) == (METER, 1, "EUR")
    assert (before["credit_milli"], before["relay"]) == (100_000, "closed")
    assert before["last_token"] == {"seq": 0, "status": "none", "message_id": 0}

    assert token(port, hex_token, tmp_path) == {
        "status": "accepted", "message_id": 1, "credit_milli": 600_000, "relay": "closed",
    }  # fmt: skip
    # The same token again changes nothing, and that is a success for whoever sent it.
    assert token(port, hex_token, tmp_path)["status"] == "already_applied"
    # Key id 3 as the meter trusts it, signed with another private key: refused, exit 1.
    forger = Ed25519Signer(3, messages.load_private_key(TEST_SEED))
    forged = credit_token(METER, 2, 500, now=header.issued_at, signer=forger)
    assert token(port, forged.hex(), tmp_path, code=1) == {
        "status": "bad_signature", "message_id": 1, "credit_milli": 600_000, "relay": "closed",
    }  # fmt: skip

    assert sim.stop(signal.SIGINT) == 0
    assert any("stopped; state saved" in line for line in sim.out)
    assert "Traceback" not in sim.stderr()
    saved = json.loads((tmp_path / "state" / f"{METER}.json").read_text())
    assert saved["credit_milli"] == 600_000

    # Power back: no --trusted-key, no --credit; the meter remembers keys, credit, tokens.
    sim = start(*without(run_args, "--trusted-key", "--credit"))
    (port,) = sim.event("ready")["ports"]
    after = status(port, tmp_path, "--events")
    assert after["credit_milli"] == 600_000
    assert after["last_token"] == {"seq": 3, "status": "bad_signature", "message_id": 1}
    codes = [e["code"] for e in after["events"]]
    assert codes[:2] == ["power_up", "power_down"]  # newest first: a clean stop, then up
    assert codes.count("token_accepted") == 1
    assert token(port, hex_token, tmp_path) == {
        "status": "already_applied", "message_id": 1, "credit_milli": 600_000, "relay": "closed",
    }  # fmt: skip
    assert sim.stop(signal.SIGTERM) == 0


def test_sigkill_right_after_a_token_loses_nothing_and_applies_it_once(
    start: Start, run_args: list[str], keys: Keys, tmp_path: Path
) -> None:
    sim = start(*run_args)
    now = int(time.time())
    hex_token = credit_token(METER, 7, 250, now=now, signer=signer(keys)).hex()
    (port,) = sim.event("ready")["ports"]
    assert token(port, hex_token, tmp_path)["credit_milli"] == 350_000
    assert sim.stop(signal.SIGKILL) == -signal.SIGKILL  # a power cut: no clean shutdown

    sim = start(*run_args)  # the same options again: the saved state wins over --credit
    (port,) = sim.event("ready")["ports"]
    after = status(port, tmp_path, "--events")
    assert after["credit_milli"] == 350_000
    assert after["last_token"] == {"seq": 1, "status": "accepted", "message_id": 7}
    codes = [e["code"] for e in after["events"]]
    assert codes[0] == "power_up"
    assert "power_down" not in codes  # the cut left no record, as on a real meter
    assert codes.count("token_accepted") == 1
    again = token(port, hex_token, tmp_path)
    assert (again["status"], again["credit_milli"]) == ("already_applied", 350_000)
    assert sim.stop(signal.SIGINT) == 0


def test_fleet_on_an_rtu_line(start: Start, run_args: list[str], tmp_path: Path) -> None:
    with null_modem() as (server_end, client_end):
        sim = start(*without(run_args, "--port"), "--rtu", server_end, "--meters", "2")
        assert sim.event("ready") == {"event": "ready", "ports": [], "meters": [METER, METER + 1]}
        second = cli_json("status", "--rtu", client_end, "--unit", "2", cwd=tmp_path)
        assert (second["meter"], second["unit"], second["credit_milli"]) == (METER + 1, 2, 100_000)
        assert sim.stop(signal.SIGINT) == 0
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == [
        f"{METER}.json",
        f"{METER + 1}.json",
    ]


# ----------------------------------------------------------------------- bad arguments


def test_bad_arguments_are_clear_errors(run_args: list[str], tmp_path: Path) -> None:
    key_files = {"binary.txt": b"\xff\xfe not text\n", "short.txt": b"1 abcd\n"}
    for name, content in key_files.items():
        (tmp_path / name).write_bytes(content)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        cases: dict[str, tuple[list[str], str]] = {
            "port in use": (
                [*without(run_args, "--port"), "--port", port],
                f"TCP port {port} on 127.0.0.1 is in use",
            ),
            "missing serial device": (
                [*run_args, "--rtu", "/dev/does-not-exist"],
                "serial device /dev/does-not-exist does not exist",
            ),
        }
        for name, message in [
            ("missing.txt", f"cannot read key file {tmp_path / 'missing.txt'}: [Errno 2]"),
            ("binary.txt", f"cannot read key file {tmp_path / 'binary.txt'}: 'ascii' codec"),
            ("short.txt", f"{tmp_path / 'short.txt'}:1: bad key line: an Ed25519 public key"),
        ]:
            args = [*without(run_args, "--trusted-key"), "--trusted-key", str(tmp_path / name)]
            cases[f"key file {name}"] = (args, message)
        for spec in ["25:00-08:00", "18:60-08:00", "1800-0800", "18:00", "08:00-08:00", ""]:
            usage = f"bad --friendly-night {spec!r}: use HH:MM-HH:MM (00:00-23:59)"
            cases[f"friendly {spec!r}"] = ([*run_args, "--friendly-night", spec], usage)
        # Four at a time: each is a process start, and they are independent.
        results = {}
        items = list(cases.items())
        for first in range(0, len(items), 4):
            procs = {
                what: subprocess.Popen(
                    [*voltcredit_command(), "meter-sim", "run", *args],
                    cwd=tmp_path,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                for what, (args, _) in items[first : first + 4]
            }
            for what, proc in procs.items():
                try:
                    results[what] = (*proc.communicate(timeout=WAIT_S), proc.returncode)
                finally:
                    if proc.poll() is None:  # it started serving: the test fails below
                        proc.kill()
                        proc.communicate()
    for what, (_, message) in cases.items():
        out, err, code = results[what]
        assert code == 1, (what, out, err)
        assert err.startswith(f"voltcredit meter-sim: error: {message}"), (what, err)
        assert "Traceback" not in err, what
    # Nothing ran, so nothing was saved: a corrected start takes its options afresh.
    assert not (tmp_path / "state" / f"{METER}.json").exists()
