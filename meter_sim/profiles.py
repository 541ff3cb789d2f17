"""Load profiles: what a simulated meter's household draws at a given instant, in integer W.

A profile is a pure function of time: ``power_w(t)`` for Unix seconds ``t`` returns
integer watts >= 0, and the same ``t`` always gives the same value, so a meter that
restarts after a power loss replays exactly the load it would have seen. Nothing here
holds random state or reads a clock. The meter core integrates the watts into integer
Wh (DESIGN §3: integer energy, no floats), and so does :func:`energy_wh_between`.

Implementations:

- :class:`ConstantProfile` — a fixed draw.
- :class:`HouseholdProfile` — a typical household's day in *local* time: night base
  load, a morning peak, a midday plateau, the evening peak (the largest), weekends
  later and flatter, plus seeded noise derived from a hash of ``(seed, t // 60)``.
  Integer arithmetic only.
- :class:`CsvProfile` — replay of a measured load curve, held step-wise and looped.

:func:`profile_from_spec` builds one from a CLI string (``constant:1500``, ``household``,
``household:seed=3``, ``csv:/path/file.csv``). Every refusal is a :class:`ProfileError`.
:meth:`CsvProfile.from_path` is the module's one I/O helper (it reads a file); the rest
is pure.
"""

from __future__ import annotations

import bisect
import csv
import hashlib
import io
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, tzinfo
from itertools import pairwise
from pathlib import Path
from typing import Final, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from meter_sim.clock import unix_seconds

#: Upper bound on any power value: 1 MW. A household meter tops out near 70 kW
#: (3 x 100 A x 230 V); the bound only catches garbage such as a Wh column pasted as W.
MAX_POWER_W: Final = 1_000_000
#: Most data rows a CSV curve may have (a year at 1-minute resolution is 525,600).
MAX_CSV_ROWS: Final = 1_000_000
#: Upper bound on the household noise amplitude, so power can never reach zero by noise.
MAX_NOISE_PCT: Final = 50
#: The sample curve shipped with the package (one day at 15-minute resolution).
EXAMPLE_CSV: Final = Path(__file__).with_name("profiles") / "household_example.csv"

_SECONDS_PER_DAY: Final = 86_400
_INT_RE: Final = re.compile(r"-?[0-9]+")


class ProfileError(ValueError):
    """A load profile that cannot be built: bad parameters, a bad spec or a bad CSV.

    ``source`` names the file (or ``<string>``) and ``line`` the 1-based physical line
    for CSV errors; both are also in the message.
    """

    def __init__(self, message: str, *, source: str | None = None, line: int | None = None) -> None:
        if source is not None and line is not None:
            message = f"{source}, line {line}: {message}"
        elif source is not None:
            message = f"{source}: {message}"
        super().__init__(message)
        self.source = source
        self.line = line


class LoadProfile(Protocol):
    """Instantaneous power as a pure function of time."""

    def power_w(self, t: int) -> int:
        """Integer watts >= 0 drawn at Unix second ``t``; the same ``t`` gives the same value."""
        ...


def _check_int(name: str, value: object, lo: int, hi: int) -> int:
    # type() rather than isinstance(): bool is an int subclass and True watts is a bug.
    if type(value) is not int:
        raise ProfileError(f"{name} must be an int, got {value!r}")
    if not lo <= value <= hi:
        raise ProfileError(f"{name} must be in {lo}..{hi}, got {value}")
    return value


# --------------------------------------------------------------------------- constant


@dataclass(frozen=True, slots=True)
class ConstantProfile:
    """The same draw at every instant."""

    watts: int

    def __post_init__(self) -> None:
        _check_int("watts", self.watts, 0, MAX_POWER_W)

    def power_w(self, t: int) -> int:  # noqa: ARG002 - LoadProfile's signature; time is ignored
        """``watts``, whatever ``t``."""
        return self.watts


# -------------------------------------------------------------------------- household

# The daily shape, as anchors (seconds since local midnight, morning share, evening
# share) with shares in permille: power at an anchor is
#   base_w + (m * (morning_peak_w - base_w) + e * (evening_peak_w - base_w)) // 1000
# and power between anchors is integer piecewise-linear. Morning share 1000 is the morning
# peak, evening share 1000 the evening peak; the midday plateau is 35 % of the morning
# excess on weekdays (fridge, standby, some cooking) and ~50-75 % at weekends (people at
# home). Shapes follow the usual residential load curves (e.g. the German BDEW H0
# standard profile): an early-morning peak, a flat day, the evening peak the largest,
# weekends starting later and flatter. Both tables start and end at the same value
# so the curve is continuous across every midnight, weekday or not.
_Anchor = tuple[int, int, int]


def _hm(hours: int, minutes: int = 0) -> int:
    return hours * 3600 + minutes * 60


_WEEKDAY: Final[tuple[_Anchor, ...]] = (
    (_hm(0), 0, 60),
    (_hm(1), 0, 0),
    (_hm(5, 30), 0, 0),
    (_hm(6, 30), 800, 0),
    (_hm(7, 15), 1000, 0),  # morning peak: 06:30-08:30
    (_hm(8, 30), 700, 0),
    (_hm(9, 30), 350, 0),
    (_hm(16), 350, 0),  # midday plateau
    (_hm(17), 200, 250),
    (_hm(18), 0, 650),
    (_hm(19), 0, 950),
    (_hm(20), 0, 1000),  # evening peak: 18:00-22:00
    (_hm(21), 0, 900),
    (_hm(22), 0, 550),
    (_hm(23), 0, 250),
    (_hm(24), 0, 60),
)
_WEEKEND: Final[tuple[_Anchor, ...]] = (
    (_hm(0), 0, 60),
    (_hm(1), 0, 30),  # later nights
    (_hm(2), 0, 0),
    (_hm(7, 30), 0, 0),
    (_hm(8, 30), 600, 0),
    (_hm(9, 30), 850, 0),  # later, flatter morning peak
    (_hm(11), 750, 0),
    (_hm(12, 30), 600, 0),
    (_hm(16), 500, 0),
    (_hm(17, 30), 300, 150),
    (_hm(18, 30), 0, 450),
    (_hm(19, 30), 0, 750),
    (_hm(20, 30), 0, 900),  # later, flatter evening peak
    (_hm(22), 0, 900),
    (_hm(23), 0, 550),
    (_hm(24), 0, 60),
)
_WEEKDAY_AT: Final = tuple(a[0] for a in _WEEKDAY)
_WEEKEND_AT: Final = tuple(a[0] for a in _WEEKEND)


@dataclass(frozen=True, slots=True)
class HouseholdProfile:
    """A typical household's daily load in local time, with seeded deterministic noise.

    ``noise_pct`` scales the shape by a factor drawn uniformly (in permille steps) from
    ``[1 - noise_pct/100, 1 + noise_pct/100]``; the factor is a function of
    ``blake2b(seed, t // 60)``, so it changes once a minute and is the same on every run.
    """

    timezone: str
    base_w: int = 110
    morning_peak_w: int = 650
    evening_peak_w: int = 1100
    seed: int = 0
    noise_pct: int = 15
    _zone: tzinfo = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if type(self.timezone) is not str:
            raise ProfileError(f"timezone must be an IANA name, got {self.timezone!r}")
        try:
            zone = ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            # ZoneInfo raises ValueError for malformed keys such as "../etc" or "".
            raise ProfileError(f"unknown timezone {self.timezone!r}") from exc
        _check_int("base_w", self.base_w, 0, MAX_POWER_W)
        _check_int("morning_peak_w", self.morning_peak_w, self.base_w, MAX_POWER_W)
        _check_int("evening_peak_w", self.evening_peak_w, self.base_w, MAX_POWER_W)
        _check_int("seed", self.seed, 0, 2**64 - 1)
        _check_int("noise_pct", self.noise_pct, 0, MAX_NOISE_PCT)
        # frozen: the one write, at construction, goes through object.__setattr__.
        object.__setattr__(self, "_zone", zone)

    @classmethod
    def default(cls, timezone: str, seed: int = 0) -> HouseholdProfile:
        """A typical EU household: about 10 kWh a day (8-12 kWh), ~110 W at night."""
        return cls(timezone, seed=seed)

    def shape_w(self, t: int) -> int:
        """The noiseless daily shape at ``t`` (integer W), following local wall-clock time.

        On DST days the shape follows the wall clock: the skipped hour is skipped and
        the repeated hour is drawn twice, as a household's routine would be.
        """
        local = datetime.fromtimestamp(t, self._zone)
        second = local.hour * 3600 + local.minute * 60 + local.second
        weekend = local.weekday() >= 5
        table, at = (_WEEKEND, _WEEKEND_AT) if weekend else (_WEEKDAY, _WEEKDAY_AT)
        # at[0] == 0 and at[-1] == 86_400 > second, so 0 <= i < len(table) - 1.
        i = bisect.bisect_right(at, second) - 1
        s0, p0 = table[i][0], self._anchor_w(table[i])
        s1, p1 = table[i + 1][0], self._anchor_w(table[i + 1])
        return p0 + (p1 - p0) * (second - s0) // (s1 - s0)

    def _anchor_w(self, anchor: _Anchor) -> int:
        _, morning, evening = anchor
        excess = morning * (self.morning_peak_w - self.base_w) + evening * (
            self.evening_peak_w - self.base_w
        )
        return self.base_w + excess // 1000

    def noise_permille(self, t: int) -> int:
        """The noise factor at ``t`` in permille (1000 = none), constant within a minute."""
        span = self.noise_pct * 10
        if span == 0:
            return 1000
        digest = hashlib.blake2b(
            f"{self.seed}:{t // 60}".encode(), digest_size=8, person=b"vc-household"
        ).digest()
        # 2**64 is not a multiple of (2*span + 1); the modulo bias is below 1e-15.
        return 1000 - span + int.from_bytes(digest, "big") % (2 * span + 1)

    def power_w(self, t: int) -> int:
        """Shape times noise, floored to integer watts (>= 0 as noise is at most 50 %)."""
        return self.shape_w(t) * self.noise_permille(t) // 1000


# -------------------------------------------------------------------------------- CSV


@dataclass(frozen=True, slots=True)
class CsvProfile:
    """A measured load curve, held step-wise and repeated forever.

    Sample ``i`` holds ``powers_w[i]`` from ``offsets_s[i]`` until the next offset
    (interval-*start* stamping: a row is the power of the interval that begins at it).
    The curve's period is ``offsets_s[-1] + step_s`` and it is anchored at Unix second
    ``start``: ``power_w(t)`` looks up ``(t - start) mod period``, for ``t`` before
    ``start`` too.
    """

    offsets_s: tuple[int, ...]
    powers_w: tuple[int, ...]
    step_s: int
    start: int = 0
    source: str = field(default="<string>", compare=False)

    def __post_init__(self) -> None:
        if type(self.offsets_s) is not tuple or type(self.powers_w) is not tuple:
            raise ProfileError("offsets_s and powers_w must be tuples")
        if not self.offsets_s:
            raise ProfileError("a CSV profile needs at least one sample")
        if len(self.offsets_s) != len(self.powers_w):
            raise ProfileError(
                f"{len(self.offsets_s)} offsets but {len(self.powers_w)} power values"
            )
        if len(self.offsets_s) > MAX_CSV_ROWS:
            raise ProfileError(f"more than {MAX_CSV_ROWS} samples")
        if type(self.offsets_s[0]) is not int or self.offsets_s[0] != 0:
            raise ProfileError(f"the first offset must be 0, got {self.offsets_s[0]!r}")
        for a, b in pairwise(self.offsets_s):
            if type(b) is not int or b <= a:
                raise ProfileError(f"offsets must be strictly ascending ints, got {b!r} after {a}")
        for p in self.powers_w:
            _check_int("power_w", p, 0, MAX_POWER_W)
        _check_int("step_s", self.step_s, 1, 10 * 366 * _SECONDS_PER_DAY)
        if type(self.start) is not int:
            raise ProfileError(f"start must be an int (Unix seconds), got {self.start!r}")

    @property
    def period_s(self) -> int:
        """Length of one loop of the curve, in seconds."""
        return self.offsets_s[-1] + self.step_s

    def power_w(self, t: int) -> int:
        """The held sample at ``t``, looping every :attr:`period_s`."""
        # Python's % with a positive divisor is never negative, so t < start loops too.
        phase = (t - self.start) % self.period_s
        return self.powers_w[bisect.bisect_right(self.offsets_s, phase) - 1]

    @classmethod
    def parse(
        cls,
        text: str,
        *,
        source: str = "<string>",
        start: int | None = None,
        step_s: int | None = None,
        max_rows: int = MAX_CSV_ROWS,
    ) -> CsvProfile:
        """Parse a load curve from CSV text (the caller has read the file).

        The header is ``offset_s,power_w`` (integer seconds from the start of the curve,
        the first 0, strictly ascending) or ``timestamp,power_w`` (ISO-8601 with a UTC
        offset or ``Z``, whole seconds, strictly ascending). ``power_w`` is an integer
        0..:data:`MAX_POWER_W`. Blank lines are ignored; anything else that does not
        fit raises :class:`ProfileError` naming ``source`` and the line.

        ``start`` anchors the curve (Unix seconds); it defaults to 0 for offsets (a
        one-day curve then starts at 00:00 UTC) and to the first timestamp for
        timestamps. ``step_s`` (how long the last sample holds) defaults to the gap
        between the last two samples; a one-sample curve is constant and gets 1 s.
        ``max_rows`` (at most :data:`MAX_CSV_ROWS`) bounds the data rows accepted.
        """
        _check_int("max_rows", max_rows, 1, MAX_CSV_ROWS)
        rows = csv.reader(io.StringIO(text.removeprefix("\ufeff")), strict=True)

        def fail(message: str) -> ProfileError:
            return ProfileError(message, source=source, line=max(rows.line_num, 1))

        header: list[str] | None = None
        offsets: list[int] = []
        powers: list[int] = []
        first_ts: int | None = None
        try:
            for row in rows:
                cells = [c.strip() for c in row]
                if not any(cells):
                    continue
                if header is None:
                    header = [c.lower() for c in cells]
                    if header not in (["offset_s", "power_w"], ["timestamp", "power_w"]):
                        raise fail(
                            "expected the header 'offset_s,power_w' or 'timestamp,power_w', "
                            f"got {','.join(cells)!r}"
                        )
                    continue
                if len(offsets) == max_rows:
                    raise fail(f"more than {max_rows} data rows")
                if len(cells) != 2:
                    raise fail(f"expected 2 fields, got {len(cells)}: {','.join(cells)!r}")
                if header[0] == "offset_s":
                    offset = _parse_int(cells[0], "offset_s", fail)
                    if not offsets and offset != 0:
                        raise fail(f"the first offset_s must be 0, got {offset}")
                else:
                    ts = _parse_timestamp(cells[0], fail)
                    if first_ts is None:
                        first_ts = ts
                    offset = ts - first_ts
                if offsets and offset <= offsets[-1]:
                    raise fail(f"{header[0]} must be strictly ascending, got {cells[0]!r}")
                power = _parse_int(cells[1], "power_w", fail)
                if power > MAX_POWER_W:
                    raise fail(f"power_w must be at most {MAX_POWER_W}, got {power}")
                offsets.append(offset)
                powers.append(power)
        except csv.Error as exc:
            raise fail(f"not valid CSV: {exc}") from exc
        if header is None:
            raise fail("empty CSV: expected the header 'offset_s,power_w' or 'timestamp,power_w'")
        if not offsets:
            raise fail("no data rows after the header")
        if step_s is None:
            step_s = offsets[-1] - offsets[-2] if len(offsets) > 1 else 1
        if start is None:
            start = first_ts if first_ts is not None else 0
        try:
            return cls(tuple(offsets), tuple(powers), step_s, start, source)
        except ProfileError as exc:
            # Only step_s/start can still be wrong here; the rows were checked above.
            raise ProfileError(str(exc), source=source) from exc

    @classmethod
    def from_path(
        cls,
        path: str | os.PathLike[str],
        *,
        start: int | None = None,
        step_s: int | None = None,
    ) -> CsvProfile:
        """Read and :meth:`parse` a UTF-8 CSV file. The one I/O helper in this module."""
        source = os.fspath(path)
        try:
            text = Path(path).read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            raise ProfileError(f"cannot read the load curve: {exc}", source=source) from exc
        return cls.parse(text, source=source, start=start, step_s=step_s)


class _Fail(Protocol):
    def __call__(self, message: str, /) -> ProfileError: ...


def _parse_int(cell: str, name: str, fail: _Fail) -> int:
    # A strict pattern, not bare int(): int() also takes "1_000", "+5", " 5" and
    # non-ASCII digits, none of which a load-curve export should contain.
    if not _INT_RE.fullmatch(cell):
        raise fail(f"{name} must be an integer, got {cell!r}")
    value = int(cell)
    if value < 0:
        raise fail(f"{name} must be >= 0, got {value}")
    return value


def _parse_timestamp(cell: str, fail: _Fail) -> int:
    try:
        # 3.11's fromisoformat takes the ISO-8601 forms exports use, including "Z".
        when = datetime.fromisoformat(cell)
    except ValueError:
        raise fail(f"timestamp is not ISO-8601: {cell!r}") from None
    if when.tzinfo is None:
        raise fail(f"timestamp {cell!r} has no UTC offset (naive timestamps are ambiguous)")
    if when.microsecond:
        raise fail(f"timestamp {cell!r} is not a whole second")
    return unix_seconds(when)


# ---------------------------------------------------------------------- spec and energy

_HOUSEHOLD_KEYS: Final = ("seed", "base_w", "morning_peak_w", "evening_peak_w", "noise_pct")
_SPEC_HELP: Final = "expected constant:<W>, household[:key=value,...], or csv:<path>"


def profile_from_spec(spec: str, *, timezone: str, seed: int) -> LoadProfile:
    """Build a profile from a CLI string.

    ``constant:1500`` (W), ``household`` (the default household in ``timezone`` with
    ``seed``), ``household:seed=3,noise_pct=5`` (override any of seed, base_w,
    morning_peak_w, evening_peak_w, noise_pct), ``csv:/path/file.csv`` (reads the file).
    """
    kind, sep, arg = spec.partition(":")
    if kind == "constant":
        if not _INT_RE.fullmatch(arg):
            raise ProfileError(f"bad profile spec {spec!r}: constant needs integer watts")
        return ConstantProfile(int(arg))
    if kind == "household":
        params: dict[str, int] = {"seed": seed}
        given: set[str] = set()
        for item in arg.split(",") if sep else ():
            key, eq, value = item.strip().partition("=")
            if key not in _HOUSEHOLD_KEYS:
                raise ProfileError(
                    f"bad profile spec {spec!r}: unknown household key {key!r}, "
                    f"expected one of {', '.join(_HOUSEHOLD_KEYS)}"
                )
            if not eq or not _INT_RE.fullmatch(value.strip()):
                raise ProfileError(f"bad profile spec {spec!r}: {key} needs an integer value")
            if key in given:
                raise ProfileError(f"bad profile spec {spec!r}: {key} given twice")
            given.add(key)
            params[key] = int(value)
        return HouseholdProfile(timezone, **params)
    if kind == "csv":
        if not arg:
            raise ProfileError(f"bad profile spec {spec!r}: csv needs a file path")
        return CsvProfile.from_path(arg)
    raise ProfileError(f"bad profile spec {spec!r}: {_SPEC_HELP}")


def energy_wh_between(profile: LoadProfile, start: int, end: int, step_s: int = 60) -> int:
    """Energy drawn over ``[start, end)`` in integer Wh, floored.

    Samples ``power_w`` at the start of each ``step_s`` step (the last step may be
    shorter) and accumulates exact integer watt-seconds; the one division, to Wh, is
    at the end. Exact for step-wise profiles whose steps are multiples of ``step_s``.
    """
    if type(start) is not int or type(end) is not int or end < start:
        raise ProfileError(f"need int start <= end, got {start!r}..{end!r}")
    if type(step_s) is not int or step_s < 1:
        raise ProfileError(f"step_s must be an int >= 1, got {step_s!r}")
    watt_seconds = 0
    for t in range(start, end, step_s):
        watt_seconds += profile.power_w(t) * min(step_s, end - t)
    return watt_seconds // 3600
