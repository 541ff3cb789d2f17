"""Named child processes for system runs: start with a log file, watch, read /proc, stop all.

:class:`Processes` starts each component (``voltcredit backend run``, ``meter-sim run``,
``gateway run``, …) as its own OS process, as production runs them, with stdout and
stderr in ``<logdir>/<name>.log``. Leaving its ``with`` block stops every process it
started, newest first (SIGTERM, then SIGKILL after a grace period), also when the block
raises, so no process outlives the run. Processes started elsewhere (a
:class:`tests.support.broker.Mosquitto`) can be :meth:`~Processes.track`-ed for
:func:`proc_stat` and the liveness check without being owned.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class ProcStat:
    """Memory and CPU time of one process, from /proc."""

    rss_kib: int  #: VmRSS: resident now
    hwm_kib: int  #: VmHWM: peak resident since the process started
    cpu_s: float  #: user + system CPU time since the process started


def proc_stat(pid: int) -> ProcStat:
    """Read ``/proc/<pid>/status`` (VmRSS, VmHWM) and ``/proc/<pid>/stat`` (utime, stime)."""
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(rest.split()[0])  # "  12345 kB"
    # The command name (field 2) may hold spaces and parentheses: split after the last ")".
    stat = Path(f"/proc/{pid}/stat").read_text()
    after = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(after[11]), int(after[12])  # fields 14 and 15 of proc(5)
    return ProcStat(
        rss_kib=fields["VmRSS"],
        hwm_kib=fields["VmHWM"],
        cpu_s=(utime + stime) / _CLOCK_TICKS,
    )


class ProcessDiedError(RuntimeError):
    """A component process exited while the run still needed it."""


@dataclass
class _Child:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    stop_signal: signal.Signals


class Processes:
    """The component processes of one run (see the module docstring)."""

    def __init__(self, logdir: Path, *, grace_s: float = 20.0) -> None:
        self.logdir = logdir
        self.grace_s = grace_s
        self._children: list[_Child] = []
        self._tracked: dict[str, int] = {}
        #: Exit codes of the processes this object stopped, by name (after :meth:`stop_all`).
        self.exit_codes: dict[str, int] = {}

    def __enter__(self) -> Self:
        self.logdir.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()

    def start(
        self,
        name: str,
        argv: list[str],
        *,
        stop_signal: signal.Signals = signal.SIGTERM,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` as ``name``; stdout and stderr go to ``<logdir>/<name>.log``."""
        if name in self._tracked:
            raise ValueError(f"a process named {name!r} is already running")
        log = self.logdir / f"{name}.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
        self._children.append(_Child(name, proc, log, stop_signal))
        self._tracked[name] = proc.pid
        return proc

    def track(self, name: str, pid: int) -> None:
        """Watch a process this object does not own (stats and liveness; never stopped here)."""
        self._tracked[name] = pid

    @property
    def pids(self) -> dict[str, int]:
        """Every started or tracked process, by name."""
        return dict(self._tracked)

    def log_text(self, name: str) -> str:
        path = self.logdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def tail(self, name: str, lines: int = 30) -> str:
        return "\n".join(self.log_text(name).splitlines()[-lines:])

    def check(self) -> None:
        """Raise :class:`ProcessDiedError` if a started process has exited."""
        for child in self._children:
            code = child.proc.poll()
            if code is not None:
                raise ProcessDiedError(
                    f"{child.name} exited with {code}; last lines of {child.log}:\n"
                    f"{self.tail(child.name)}"
                )

    def wait_for_line(self, name: str, prefix: str, timeout_s: float) -> str:
        """The first line of ``name``'s log starting with ``prefix`` (polled; it must not die)."""
        deadline = time.monotonic() + timeout_s
        while True:
            for line in self.log_text(name).splitlines():
                if line.startswith(prefix):
                    return line
            self.check()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} printed no line {prefix!r} in {timeout_s} s")
            time.sleep(0.1)

    def stop(self, name: str) -> int:
        """Stop one started process: its stop signal, then SIGKILL after the grace period."""
        for child in self._children:
            if child.name == name:
                self._children.remove(child)
                del self._tracked[name]
                code = self._stop(child)
                self.exit_codes[name] = code
                return code
        raise KeyError(name)

    def stop_all(self) -> dict[str, int]:
        """Stop every started process, newest first; their exit codes by name."""
        while self._children:
            self.stop(self._children[-1].name)
        self._tracked.clear()
        return dict(self.exit_codes)

    def _stop(self, child: _Child) -> int:
        if child.proc.poll() is None:
            child.proc.send_signal(child.stop_signal)
            try:
                return child.proc.wait(self.grace_s)
            except subprocess.TimeoutExpired:
                child.proc.kill()
        return child.proc.wait()
