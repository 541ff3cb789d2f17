"""The MQTT-facing runtime of one backend process: payments, MQTT link, dispatcher, ingest.

:func:`topup_runtime` opens, in order, the sandbox payment provider (with its webhook
deliverer in ``webhook`` mode), the MQTT link and the background tasks — the dispatcher's
publish and result loops and the reconciliation poll — and closes them in reverse. The
HTTP application (``backend.api.routes.topups``) enters it in its ``cleanup_ctx``; any
other process that needs top-ups can do the same.

Sandbox modes:

- ``webhook`` (default, like production): ``create_payment`` answers ``pending``; the
  payment completes a moment later and the sandbox POSTs a signed webhook to
  ``sandbox_webhook_url`` (this backend's ``/v1/webhooks/sandbox``), which settles it.
- ``instant``: the payment completes inside the top-up request, which settles it at once
  (benchmarks, crash tests, demos without a reachable webhook URL).

The sandbox's signing secret is random per process unless configured: the sandbox and
the endpoint verifying its webhooks live in the same process, and a restart forgets the
sandbox's payments anyway (they stay ``PENDING``; reconciliation logs them).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import logging
import secrets
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import aiohttp

from backend.adapters.db.engine import Database
from backend.adapters.instant_sandbox import InstantSandbox
from backend.adapters.mqtt import BackendLink, MqttSettings
from backend.domain.consumption import DEFAULT_POLICY, IngestPolicy
from backend.errors import BackendError
from backend.payments.base import PaymentProvider
from backend.payments.sandbox import SandboxProvider
from backend.payments.webhooks import WebhookDeliverer
from backend.service.accounts import AccountService
from backend.service.context import utc_now
from backend.service.dispatcher import Dispatcher, DispatcherSettings, result_subscription
from backend.service.ingest import IngestService, LiveUpdate
from backend.service.ingest_runtime import (
    DEFAULT_MAX_MESSAGES,
    IngestConsumer,
    MessageRouter,
    Routes,
    ingest_subscriptions,
)
from backend.service.topups import SignerSource, TopupService

log = logging.getLogger(__name__)


class SandboxMode(enum.StrEnum):
    """How the sandbox provider completes payments (module docstring)."""

    WEBHOOK = "webhook"
    INSTANT = "instant"


@dataclass(frozen=True, slots=True, kw_only=True)
class TopupSettings:
    """Everything the top-up path of one process needs, built once at start-up."""

    mqtt: MqttSettings = field(default_factory=MqttSettings)
    sandbox_mode: SandboxMode = SandboxMode.WEBHOOK
    #: Where the sandbox POSTs its webhooks (``webhook`` mode only).
    sandbox_webhook_url: str | None = None
    #: HMAC secret of sandbox webhooks; ``None``: random for this process.
    sandbox_secret: bytes | None = None
    sandbox_completion_delay_s: float = 0.2
    dispatcher: DispatcherSettings = field(default_factory=DispatcherSettings)
    #: Run the MQTT link and the dispatcher (off: an API-only process).
    dispatch: bool = True
    #: Also consume readings and gateway states (consumption ingest); needs ``dispatch``.
    ingest: bool = True
    #: Most readings messages per ingest unit of work.
    ingest_max_messages: int = DEFAULT_MAX_MESSAGES
    #: Plausibility limits of ingest (clock tolerance, largest power).
    ingest_policy: IngestPolicy = DEFAULT_POLICY
    #: How often to ask the provider about payments waiting longer than ``reconcile_after_s``.
    reconcile_every_s: float = 30.0
    reconcile_after_s: float = 60.0

    def __post_init__(self) -> None:
        if self.sandbox_mode is SandboxMode.WEBHOOK and not self.sandbox_webhook_url:
            raise ValueError("the sandbox in webhook mode needs sandbox_webhook_url")


@dataclass(frozen=True, slots=True)
class TopupRuntime:
    """The running top-up path of a process."""

    topups: TopupService
    accounts: AccountService
    sandbox: SandboxProvider
    dispatcher: Dispatcher | None
    link: BackendLink | None
    ingest: IngestConsumer | None = None
    #: Names of background tasks that died of an unexpected error (the watchdog stops
    #: vouching for a process whose token or ingest loop is gone: systemd restarts it).
    died: list[str] = field(default_factory=list)


@contextlib.asynccontextmanager
async def topup_runtime(
    db: Database,
    signers: SignerSource,
    settings: TopupSettings,
    *,
    clock: Callable[[], datetime] = utc_now,
    on_live: Callable[[Sequence[LiveUpdate]], None] | None = None,
) -> AsyncIterator[TopupRuntime]:
    """Open the top-up path (and ingest) on ``db`` with keys from ``signers``; close on exit.

    ``on_live`` receives the newest live values of meters after each ingest commit.
    """
    tasks: set[asyncio.Task[None]] = set()
    async with contextlib.AsyncExitStack() as stack:
        secret = settings.sandbox_secret or secrets.token_bytes(32)
        provider: PaymentProvider
        if settings.sandbox_mode is SandboxMode.WEBHOOK:
            session = await stack.enter_async_context(aiohttp.ClientSession())
            deliverer = await stack.enter_async_context(
                WebhookDeliverer(session, base_delay_s=0.5, max_delay_s=30.0, clock=clock)
            )
            sandbox = SandboxProvider(
                secret=secret,
                webhook_url=settings.sandbox_webhook_url,
                deliverer=deliverer,
                clock=clock,
                completion_delay_s=settings.sandbox_completion_delay_s,
            )
            provider = sandbox
        else:
            sandbox = SandboxProvider(secret=secret, clock=clock)
            provider = InstantSandbox(sandbox)
        await stack.enter_async_context(sandbox)
        dispatcher: Dispatcher | None = None
        link: BackendLink | None = None
        consumer: IngestConsumer | None = None
        routes: Routes | None = None
        if settings.dispatch:
            shared = settings.mqtt.shared_subscriptions
            subscriptions = [result_subscription(shared=shared)]
            if settings.ingest:
                subscriptions += ingest_subscriptions(shared=shared)
            link = BackendLink(settings.mqtt, subscriptions=subscriptions)
            dispatcher = Dispatcher(db, link, settings=settings.dispatcher, clock=clock)
            if settings.ingest:
                routes = Routes(results=asyncio.Queue(), readings=asyncio.Queue())
                consumer = IngestConsumer(
                    IngestService(db, clock=clock, policy=settings.ingest_policy),
                    link,
                    routes.readings,
                    clock=clock,
                    on_live=on_live,
                    max_messages=settings.ingest_max_messages,
                )
            await stack.enter_async_context(link)
        topups = TopupService(
            db,
            providers={provider.name: provider},
            default_provider=provider.name,
            signers=signers,
            clock=clock,
            on_token_issued=None if dispatcher is None else dispatcher.wake,
        )
        loop = asyncio.get_running_loop()
        if dispatcher is not None and link is not None:
            results = None if routes is None else routes.results
            tasks.add(loop.create_task(dispatcher.run(link, results), name="token-dispatcher"))
        if consumer is not None and link is not None and routes is not None:
            tasks.add(loop.create_task(MessageRouter(link, routes).run(), name="mqtt-router"))
            tasks.add(loop.create_task(consumer.run(), name="ingest"))
        tasks.add(loop.create_task(_reconcile_forever(topups, settings), name="reconcile"))
        runtime = TopupRuntime(topups, AccountService(db), sandbox, dispatcher, link, consumer)
        for task in tasks:
            task.add_done_callback(functools.partial(_report_crash, runtime.died))
        try:
            yield runtime
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def _report_crash(died: list[str], task: asyncio.Task[None]) -> None:
    # The loops catch what they expect; anything else is a bug to shout about at once
    # (the process keeps serving the API, but tokens stop flowing until it restarts, which
    # the systemd watchdog then does: it stops being fed, see backend/api/cli.py).
    if not task.cancelled() and task.exception() is not None:
        log.critical("task %s died", task.get_name(), exc_info=task.exception())
        died.append(task.get_name())


async def _reconcile_forever(topups: TopupService, settings: TopupSettings) -> None:
    while True:
        await asyncio.sleep(settings.reconcile_every_s)
        try:
            settled = await topups.reconcile(older_than_s=settings.reconcile_after_s)
        except BackendError:
            log.exception("reconciliation failed; trying again later")
        else:
            if settled:
                log.info("reconciliation settled %d payment(s)", settled)
