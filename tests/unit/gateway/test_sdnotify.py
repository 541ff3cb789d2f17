"""sd_notify over a real unix datagram socket (path and abstract namespace)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from gateway.sdnotify import Notifier


def test_notifications_arrive_as_key_value_lines(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(path)
        n = Notifier(path)
        assert n.enabled
        assert n.ready("up")
        assert n.watchdog()
        assert n.status("fine")
        assert n.stopping()
        got = [server.recv(4096) for _ in range(4)]
    assert got == [b"READY=1\nSTATUS=up", b"WATCHDOG=1", b"STATUS=fine", b"STOPPING=1"]


def test_abstract_namespace_socket() -> None:
    name = f"voltcredit-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind("\0" + name)
        assert Notifier("@" + name).watchdog()
        assert server.recv(64) == b"WATCHDOG=1"


def test_without_systemd_nothing_happens_and_failures_are_not_fatal(tmp_path: Path) -> None:
    assert not Notifier(None).enabled
    assert not Notifier(None).ready("x")
    gone = Notifier(str(tmp_path / "nobody-listens"))
    assert not gone.watchdog()
    assert not gone.watchdog()
