"""Anti-replay window: accept each per-meter message id once, tolerate bounded reordering.

Modelled on the IPsec anti-replay sliding window (RFC 4303 §3.4.3): the state is the
highest id accepted so far and a bitmap of which of the ``WINDOW`` ids at and below it
were accepted. An id above the highest is new; an id inside the window is new unless
its bit is set (then it was already applied); an id below the window cannot be
judged and is refused as too old. The state is a small immutable value that
serialises to 12 bytes, so a meter can persist it atomically with its credit.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Final

from firmware_protocol.errors import AlreadyAppliedError, MalformedError, TooOldError

#: How many ids at and below the highest accepted id are remembered.
WINDOW: Final = 64
_MASK: Final = (1 << WINDOW) - 1
_STATE = struct.Struct(">IQ")
U32_MAX: Final = 2**32 - 1


class Verdict(enum.Enum):
    """What the window says about an id."""

    NEW = "new"
    ALREADY_APPLIED = "already_applied"
    TOO_OLD = "too_old"


@dataclass(frozen=True, slots=True)
class ReplayWindow:
    """``highest`` accepted id (0: none yet) and ``bitmap`` (bit k set: id highest-k accepted)."""

    highest: int = 0
    bitmap: int = 0

    def __post_init__(self) -> None:
        if type(self.highest) is not int or not 0 <= self.highest <= U32_MAX:
            raise MalformedError("replay window: highest must be a u32")
        if type(self.bitmap) is not int or not 0 <= self.bitmap <= _MASK:
            raise MalformedError("replay window: bitmap must be a u64")
        if (self.highest == 0) != (self.bitmap == 0) or (self.highest and not self.bitmap & 1):
            raise MalformedError("replay window: highest id must be marked in the bitmap")

    def verdict(self, msg_id: int) -> Verdict:
        """Classify ``msg_id`` (>= 1) without changing anything."""
        if msg_id > self.highest:
            return Verdict.NEW
        offset = self.highest - msg_id
        if offset >= WINDOW:
            return Verdict.TOO_OLD
        if self.bitmap >> offset & 1:
            return Verdict.ALREADY_APPLIED
        return Verdict.NEW

    def check(self, msg_id: int) -> None:
        """Raise :class:`AlreadyAppliedError` or :class:`TooOldError` unless ``msg_id`` is new."""
        verdict = self.verdict(msg_id)
        if verdict is Verdict.ALREADY_APPLIED:
            raise AlreadyAppliedError(f"message id {msg_id} was already applied")
        if verdict is Verdict.TOO_OLD:
            raise TooOldError(
                f"message id {msg_id} is below the window (highest {self.highest}, window {WINDOW})"
            )

    def accept(self, msg_id: int) -> ReplayWindow:
        """The state after accepting ``msg_id``; raises like :meth:`check` if it is not new."""
        if type(msg_id) is not int or not 1 <= msg_id <= U32_MAX:
            raise MalformedError(f"message id must be a u32 >= 1, got {msg_id!r}")
        self.check(msg_id)
        if msg_id > self.highest:
            shift = msg_id - self.highest
            bitmap = (self.bitmap << shift | 1) & _MASK if shift < WINDOW else 1
            return ReplayWindow(msg_id, bitmap)
        return ReplayWindow(self.highest, self.bitmap | 1 << (self.highest - msg_id))

    def to_bytes(self) -> bytes:
        """12-byte big-endian form: u32 highest, u64 bitmap."""
        return _STATE.pack(self.highest, self.bitmap)

    @classmethod
    def from_bytes(cls, data: bytes) -> ReplayWindow:
        """Inverse of :meth:`to_bytes`; wrong length or inconsistent state raises."""
        if len(data) != _STATE.size:
            raise MalformedError(f"replay window state is {_STATE.size} bytes, got {len(data)}")
        highest, bitmap = _STATE.unpack(data)
        return cls(highest, bitmap)
