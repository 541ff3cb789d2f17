"""Run benchmarks: ``python -m tests.bench [protocol|meter_sim|gateway|topups|ingest|all]``."""

from __future__ import annotations

import importlib
import sys

BENCHES = ("protocol", "meter_sim", "gateway", "topups", "ingest")


def main(argv: list[str]) -> int:
    names = argv or ["all"]
    if names == ["all"]:
        names = list(BENCHES)
    for name in names:
        if name not in BENCHES:
            print(f"unknown benchmark {name!r}; choose from {', '.join(BENCHES)} or all")
            return 2
        print(f"== {name}")
        module = importlib.import_module(f"tests.bench.{name}")
        module.run().write()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
