"""Test MQTT brokers: a private Mosquitto (own config: passwords, ACLs, TLS) or embedded amqtt.

A test asks for a broker; it gets a Mosquitto started on a free loopback port with a
config written for the test when the binary exists, else the embedded amqtt broker.
With ``CI=true`` a missing Mosquitto is an error, never a silent fallback.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.pki import Pki


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def mosquitto_binary() -> str | None:
    """Path of mosquitto, or None; in CI a missing binary fails the run."""
    found = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )
    if found is None and in_ci():
        raise RuntimeError("CI=true but mosquitto is not installed: CI must exercise it")
    return found


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@dataclass
class Users:
    """username → password, and username → ACL lines (Mosquitto acl_file syntax)."""

    passwords: dict[str, str] = field(default_factory=dict)
    acl: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class Mosquitto:
    """A private mosquitto process: plain port, optional TLS port, stop/start for outage tests."""

    binary: str
    workdir: Path
    users: Users | None = None
    pki: Pki | None = None
    port: int = field(default_factory=free_port)
    tls_port: int | None = None
    proc: subprocess.Popen[bytes] | None = None

    def write_config(self) -> Path:
        lines = [
            "persistence true",
            f"persistence_location {self.workdir}/",
            # Mosquitto's default of 1000 queued messages per client silently drops QoS 1
            # messages to slow subscribers (NOTES.md); size it explicitly.
            "max_queued_messages 100000",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            f"listener {self.port} 127.0.0.1",
        ]
        if self.users is None:
            lines.append("allow_anonymous true")
        else:
            pw = self.workdir / "passwd"
            pw.write_text("")
            pw.chmod(0o600)
            for user, password in self.users.passwords.items():
                subprocess.run(
                    ["mosquitto_passwd", "-b", str(pw), user, password],
                    check=True,
                    capture_output=True,
                )
            acl = self.workdir / "acl"
            acl.write_text(
                "\n".join(
                    f"user {user}\n" + "\n".join(rules) + "\n"
                    for user, rules in self.users.acl.items()
                )
            )
            lines += ["allow_anonymous false", f"password_file {pw}", f"acl_file {acl}"]
        if self.pki is not None:
            self.tls_port = self.tls_port or free_port()
            lines += [
                f"listener {self.tls_port} 127.0.0.1",
                f"cafile {self.pki.ca_cert}",
                f"certfile {self.pki.server_cert}",
                f"keyfile {self.pki.server_key}",
                "require_certificate false",
            ]
            if self.users is None:
                lines.append("allow_anonymous true")
            else:
                lines += [f"password_file {self.workdir / 'passwd'}"]
        conf = self.workdir / "mosquitto.conf"
        if os.geteuid() == 0:
            # Run as root (CI), mosquitto would drop to user "mosquitto", who cannot write
            # the test's temporary directory.
            lines.insert(0, "user root")
        conf.write_text("per_listener_settings false\n" + "\n".join(lines) + "\n")
        return conf

    def start(self) -> None:
        conf = self.write_config()
        log = self.workdir / "mosquitto.log"
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [self.binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=out
            )
        try:
            wait_port(self.port)
        except OSError:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"mosquitto did not start: {log.read_text()}") from None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@contextlib.contextmanager
def mosquitto(
    workdir: Path, *, users: Users | None = None, pki: Pki | None = None
) -> Iterator[Mosquitto]:
    binary = mosquitto_binary()
    if binary is None:
        raise RuntimeError("mosquitto binary not found")
    broker = Mosquitto(binary=binary, workdir=workdir, users=users, pki=pki)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
