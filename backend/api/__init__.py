"""The backend's HTTP API (aiohttp): thin handlers over the use cases of ``backend.service``.

Layout:

- ``app.py``        composition root: :func:`~backend.api.app.create_app` (middlewares,
                    ``cleanup_ctx`` resources, route modules, OpenAPI document)
- ``middleware.py`` request id, RFC 9457 problem mapping, body limit, authentication
- ``problems.py``   the one table from exception class to HTTP status and problem type
- ``schemas.py``    strict JSON → command parsing, view → JSON, JSON Schema of both
- ``registry.py``   :class:`~backend.api.registry.RouteTable`: routes declared once, for
                    the router and for OpenAPI
- ``openapi.py``    the OpenAPI 3.1 document and the ``/docs`` page
- ``context.py``    app/request keys and handler helpers (``body``, ``respond``, ids, pages)
- ``routes/``       one module per area; ``cli.py`` is ``voltcredit backend``

**Adding endpoints** (e.g. top-ups, webhooks, balances) takes a new module and one line:

1. Write ``backend/api/routes/topups.py`` with ``routes = RouteTable("topups", "…")`` and
   handlers decorated ``@routes.post("/v1/accounts/{account_id}/topups", "Top up",
   body=NewTopup, response=TopupView, status=201, action=Action.TOPUP_CREATE,
   problems=(409,))``. ``body`` and ``response`` are frozen dataclasses annotated with
   :mod:`backend.domain.fields` markers; lists use ``response=ListOf(View)``. Declare
   ``public=True`` for unauthenticated operations (a payment webhook checks its own
   signature). Handlers stay thin: ``new = await body(request, NewTopup)``, call the
   use case with ``call_of(request)``, ``return respond(view, status=201)``.
2. If the module needs its own long-lived objects (a service, a dispatcher task), give
   it ``def setup(app: web.Application) -> None`` that appends to ``app.cleanup_ctx``
   and stores them under its own ``web.AppKey``; it can read ``DATABASE``, ``CONFIG``,
   ``CLOCK`` and ``KEY_STORE`` from :mod:`backend.api.context` (set before it runs).
3. Add ``"backend.api.routes.topups"`` to :data:`backend.api.app.ROUTE_MODULES`.

The operations then appear in ``/openapi.json`` and ``/docs`` with their schemas, roles
and problem responses. New exception classes get their status with
:func:`backend.api.problems.register` (or a row in ``PROBLEMS``); nothing else maps errors.
"""
