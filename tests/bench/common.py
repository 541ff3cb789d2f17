"""Benchmark plumbing: time a callable, print a table, write results to bench-results/."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Report:
    """Figures of one benchmark run, printed and written as JSON."""

    name: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, what: str, value: float, unit: str, **extra: Any) -> None:
        row = {"what": what, "value": round(value, 3), "unit": unit, **extra}
        self.rows.append(row)
        tail = "  ".join(f"{k}={v}" for k, v in extra.items())
        print(f"  {what:<52} {value:>14,.1f} {unit:<10} {tail}", flush=True)

    def write(self) -> Path:
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / f"{self.name}.json"
        doc = {
            "benchmark": self.name,
            "when": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": {
                "python": platform.python_version(),
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
            },
            "results": self.rows,
            "notes": self.notes,
        }
        path.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {path}")
        return path


def rate(fn: Callable[[], object], *, min_seconds: float = 1.0, repeat: int = 3) -> float:
    """Best calls per second of ``fn`` over ``repeat`` runs of at least ``min_seconds``."""
    best = 0.0
    for _ in range(repeat):
        n = 0
        start = time.perf_counter()
        elapsed = 0.0
        while elapsed < min_seconds:
            for _ in range(50):
                fn()
            n += 50
            elapsed = time.perf_counter() - start
        best = max(best, n / elapsed)
    return best
