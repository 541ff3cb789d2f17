"""`voltcredit` with the top-up routes mounted (`python -m tests.support.topup_backend …`).

The top-up routes join the API through one line in ``backend.api.app.ROUTE_MODULES``.
Until that line is there, this launcher adds the module to the application the
``backend run`` command builds — everything else (configuration, migration, serving,
signal handling) is the real command. Once the line is there, it changes nothing.
"""

from __future__ import annotations

import functools
import sys

from backend.api import app as app_module
from backend.api import cli as api_cli
from backend.cli import main

TOPUP_ROUTES = "backend.api.routes.topups"


def _patch() -> None:
    if TOPUP_ROUTES not in app_module.ROUTE_MODULES:
        api_cli.create_app = functools.partial(  # type: ignore[assignment]
            app_module.create_app, route_modules=(*app_module.ROUTE_MODULES, TOPUP_ROUTES)
        )


if __name__ == "__main__":
    _patch()
    sys.exit(main())
