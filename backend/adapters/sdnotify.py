"""A tiny sd_notify(3) client for the backend: READY, STATUS, WATCHDOG and STOPPING.

This is a deliberate copy of ``gateway/sdnotify.py``: the backend must not import the
gateway (DESIGN §2), ``firmware_protocol`` is pure (no sockets), and forty lines do not
justify a fourth shared package. Keep the two in step if the protocol use changes.

systemd passes the socket's path in ``NOTIFY_SOCKET`` (read by :mod:`backend.config`); a
name starting with ``@`` is in the abstract namespace (a leading NUL byte). Each
notification is one datagram of ``KEY=value`` lines. Without a socket (not run by
systemd, or ``Type=`` other than ``notify``) every call does nothing. A failed send is
logged once and otherwise ignored: a missed keep-alive is systemd's to act on.
"""

from __future__ import annotations

import logging
import socket

log = logging.getLogger(__name__)


class Notifier:
    """Sends notifications to systemd's socket, if there is one."""

    def __init__(self, socket_path: str | None) -> None:
        self._address: str | None = None
        if socket_path:
            self._address = "\0" + socket_path[1:] if socket_path.startswith("@") else socket_path
        self._warned = False

    @property
    def enabled(self) -> bool:
        """True when there is a socket to talk to."""
        return self._address is not None

    def notify(self, **fields: str) -> bool:
        """Send ``KEY=value`` lines (``READY="1"`` → ``READY=1``); True if a datagram went out."""
        if self._address is None:
            return False
        text = "\n".join(f"{key}={value}" for key, value in fields.items())
        try:
            # A non-blocking send to a local datagram socket: it never waits on the loop.
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.setblocking(False)  # noqa: FBT003 - socket API
                sock.sendto(text.encode("utf-8"), self._address)
        except OSError as exc:
            if not self._warned:
                log.warning("sd_notify to %r failed: %s", self._address, exc)
                self._warned = True
            return False
        return True

    def ready(self, status: str) -> bool:
        """Start-up is complete (``Type=notify`` units are "started" now)."""
        return self.notify(READY="1", STATUS=status)

    def status(self, status: str) -> bool:
        """A one-line status for ``systemctl status``."""
        return self.notify(STATUS=status)

    def watchdog(self) -> bool:
        """Keep-alive: sent while the process is healthy, at least every ``WatchdogSec``."""
        return self.notify(WATCHDOG="1")

    def stopping(self, status: str = "stopping") -> bool:
        """A clean stop has begun."""
        return self.notify(STOPPING="1", STATUS=status)
