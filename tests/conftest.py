"""Shared fixtures: private brokers and the PostgreSQL test database.

With ``CI=true`` a missing Mosquitto or PostgreSQL fails the run (CI must exercise
both); on a developer machine the tests that need them are skipped with a reason.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.broker import Mosquitto, Users, in_ci, mosquitto, mosquitto_binary
from tests.support.pki import Pki, make_pki

PG_DSN = os.environ.get("VOLTCREDIT_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def _require(what: str, why: str) -> None:
    if in_ci():
        pytest.fail(f"CI=true and {what} is unavailable: {why}")
    pytest.skip(f"{what} unavailable: {why}")


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path)


@pytest.fixture
def mosquitto_factory(tmp_path: Path) -> Iterator[object]:
    """Call with users/pki to get a started private Mosquitto; all are stopped after the test."""
    if mosquitto_binary() is None:
        _require("mosquitto", "binary not on PATH")
    started: list[Mosquitto] = []
    stack = []

    def start(*, users: Users | None = None, pki: Pki | None = None) -> Mosquitto:
        workdir = tmp_path / f"mosquitto{len(started)}"
        workdir.mkdir()
        cm = mosquitto(workdir, users=users, pki=pki)
        broker = cm.__enter__()
        stack.append(cm)
        started.append(broker)
        return broker

    yield start
    for cm in reversed(stack):
        cm.__exit__(None, None, None)


@pytest.fixture
def postgres_dsn() -> str:
    """DSN of the PostgreSQL test database, after checking that it answers."""
    host, port = "127.0.0.1", 5432
    try:
        with socket.create_connection((host, port), timeout=2):
            pass
    except OSError as exc:
        _require("PostgreSQL", str(exc))
    return PG_DSN
