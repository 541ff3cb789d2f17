"""Run benchmarks: ``python -m tests.bench [protocol|meter_sim|gateway|topups|ingest|system|all]``.

Results go to results/. Options after the name go to the one benchmark that takes them:
``python -m tests.bench system --quick`` (``system --help`` lists them).
"""

from __future__ import annotations

import importlib
import sys

BENCHES = ("protocol", "meter_sim", "gateway", "topups", "ingest", "system")
#: Benchmarks whose ``run`` takes command-line options.
WITH_OPTIONS = ("system",)


def main(argv: list[str]) -> int:
    split = next((i for i, arg in enumerate(argv) if arg.startswith("-")), len(argv))
    names, options = argv[:split] or ["all"], argv[split:]
    if names == ["all"]:
        names = list(BENCHES)
    for name in names:
        if name not in BENCHES:
            print(f"unknown benchmark {name!r}; choose from {', '.join(BENCHES)} or all")
            return 2
    if options and (len(names) != 1 or names[0] not in WITH_OPTIONS):
        print(f"options are for one of {', '.join(WITH_OPTIONS)} alone, got {names}")
        return 2
    for name in names:
        print(f"== {name}")
        module = importlib.import_module(f"tests.bench.{name}")
        (module.run(options) if options else module.run()).write()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
