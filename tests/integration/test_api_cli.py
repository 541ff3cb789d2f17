"""``voltcredit backend``: run as a real process (migrate, serve, stop on SIGINT), mint a key."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from pathlib import Path

import aiohttp
import pytest

pytestmark = pytest.mark.integration

COMMAND = [sys.executable, "-m", "backend.cli"]


def _config(tmp_path: Path, **extra: str) -> Path:
    path = tmp_path / "backend.toml"
    lines = [
        "[database]",
        f'url = "sqlite+aiosqlite:///{tmp_path / "state" / "vc.db"}"',
        "[http]",
        "port = 0",
        "[keys]",
        f'dir = "{tmp_path / "keys"}"',
    ]
    lines += [f"{k} = {v}" for k, v in extra.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


async def _run(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *COMMAND, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_run_serves_until_sigint(tmp_path: Path) -> None:
    config = _config(tmp_path)
    code, out, err = await _run("backend", "create-admin-key", "--config", str(config))
    assert code == 0, err
    key = out.strip()
    assert re.fullmatch(r"vck_[0-9a-f]{8}_[A-Za-z0-9_-]{43}", key)
    assert "shown only once" in err
    proc = await asyncio.create_subprocess_exec(
        *COMMAND,
        "backend",
        "run",
        "--config",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        match = re.search(r"listening on (http://[\d.]+:\d+)", line)
        assert match, line
        base = match[1]
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/healthz") as resp:
                assert resp.status == 200
                assert await resp.json() == {"status": "alive"}
            async with http.get(f"{base}/readyz") as resp:
                assert resp.status == 200
            headers = {"Authorization": f"Bearer {key}"}
            async with http.get(f"{base}/v1/tenants", headers=headers) as resp:
                assert resp.status == 200
                assert (await resp.json())["items"] == []
        assert (tmp_path / "keys").stat().st_mode & 0o777 == 0o700
        proc.send_signal(signal.SIGINT)
        rest, errors = await asyncio.wait_for(proc.communicate(), 20)
        assert proc.returncode == 0, errors.decode()
        assert b"stopping" in rest
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_bad_configuration_exits_2_naming_the_key(tmp_path: Path) -> None:
    config = _config(tmp_path)
    config.write_text(config.read_text().replace("port = 0", "port = 99999"))
    code, _, err = await _run("backend", "run", "--config", str(config))
    assert code == 2
    assert "http.port: must be an integer in 0..65535, got 99999" in err
