"""Webhook signatures (Stripe's ``t=…,v1=…`` HMAC-SHA256 scheme) and signed delivery with retries.

Signatures follow Stripe's documented scheme, https://docs.stripe.com/webhooks#verify-manually:

- The header is ``t=<unix seconds>,v1=<hex>[,v1=<hex>…]`` on one line; split on ``,`` into
  elements and each element on the first ``=`` into prefix and value.
- ``v1`` is the hex HMAC-SHA256, keyed with the endpoint's secret, of the *signed payload*
  ``f"{t}.{raw body}"``. There may be several ``v1`` (one per active secret while a secret
  is being rolled); one match is enough. Every other scheme (Stripe sends a fake ``v0`` in
  test mode) is ignored, to prevent downgrade attacks.
- Compare in constant time, and reject a timestamp outside the tolerance, 300 s by default
  (Stripe's libraries' ``DEFAULT_TOLERANCE``), against replays. Stripe's libraries only
  reject *old* timestamps; we also reject ones more than the tolerance in the *future* — a
  clock that far ahead signs events that would stay replayable for longer than intended.

The signature is checked *before* the timestamp is trusted (the timestamp is one of the
fields it covers), and both before any field of the body is read.

:class:`WebhookDeliverer` is the sender's side, used by the sandbox provider: it POSTs a
signed event in a background task, re-signing each attempt with a fresh timestamp (as
Stripe does, so a retry hours later still passes the receiver's window), retries any
non-2xx answer or network failure with capped, jittered exponential back-off, and gives up
after ``max_attempts``, recording every attempt.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import hmac
import logging
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Final, Self

import aiohttp

from backend.payments.errors import (
    WebhookMalformedError,
    WebhookSignatureError,
    WebhookTooOldError,
)

logger = logging.getLogger(__name__)

#: The only signature scheme we accept (see the module docstring).
SCHEME: Final = "v1"
#: Seconds a signed timestamp may be away from our clock (Stripe's default).
DEFAULT_TOLERANCE_S: Final = 300
#: Longer headers are refused unparsed; a real one holds a few 64-character signatures.
MAX_HEADER_LEN: Final = 4096

_TIMESTAMP = re.compile(r"[0-9]{1,15}")  # ASCII digits only: int() accepts "+1", " 1", "1_0"


@dataclass(frozen=True, slots=True)
class SignatureHeader:
    """A parsed signature header: the signed timestamp and the ``v1`` signatures in it."""

    timestamp: int
    signatures: tuple[str, ...]


def compute_signature(secret: bytes, timestamp: int, body: bytes) -> str:
    """Hex HMAC-SHA256 of ``f"{timestamp}.{body}"`` keyed with ``secret``."""
    signed_payload = str(timestamp).encode("ascii") + b"." + body
    return hmac.new(secret, signed_payload, hashlib.sha256).hexdigest()


def format_signature_header(body: bytes, *, timestamp: int, secrets: Sequence[bytes]) -> str:
    """The header value signing ``body`` at ``timestamp`` with each secret (one ``v1`` each)."""
    if not secrets:
        raise ValueError("at least one secret is needed to sign")
    if timestamp < 0:
        raise ValueError(f"timestamp must be >= 0, got {timestamp}")
    parts = [f"t={timestamp}"]
    parts.extend(f"{SCHEME}={compute_signature(secret, timestamp, body)}" for secret in secrets)
    return ",".join(parts)


def parse_signature_header(value: str) -> SignatureHeader:
    """Split a header into its timestamp and ``v1`` signatures; other schemes are dropped."""
    if len(value) > MAX_HEADER_LEN:
        raise WebhookMalformedError(f"signature header longer than {MAX_HEADER_LEN} characters")
    timestamp: int | None = None
    signatures: list[str] = []
    for element in value.split(","):
        prefix, sep, item = element.strip().partition("=")
        if not sep or not prefix:
            raise WebhookMalformedError(f"signature header element {element!r} is not prefix=value")
        if prefix == "t":
            if timestamp is not None:
                raise WebhookMalformedError("signature header has more than one timestamp")
            if not _TIMESTAMP.fullmatch(item):
                raise WebhookMalformedError(
                    f"signature header timestamp {item!r} is not an integer"
                )
            timestamp = int(item)
        elif prefix == SCHEME:
            signatures.append(item)
    if timestamp is None:
        raise WebhookMalformedError("signature header has no timestamp (t=)")
    if not signatures:
        raise WebhookMalformedError(f"signature header has no {SCHEME} signature")
    return SignatureHeader(timestamp=timestamp, signatures=tuple(signatures))


def verify_signature(
    header: str | None,
    body: bytes,
    *,
    secrets: Sequence[bytes],
    now: datetime,
    tolerance_s: int = DEFAULT_TOLERANCE_S,
) -> int:
    """Check ``header`` against ``body``; return the signed timestamp (Unix seconds).

    Raises :class:`WebhookSignatureError` when the header is missing or no ``v1``
    signature matches any secret, :class:`WebhookMalformedError` when the header cannot
    be parsed, and :class:`WebhookTooOldError` when the (verified) timestamp is more than
    ``tolerance_s`` away from ``now``.
    """
    if not secrets or not all(secrets):
        raise ValueError("verification needs at least one non-empty secret")
    if now.utcoffset() is None:
        raise ValueError("now must be a timezone-aware datetime")
    if header is None:
        raise WebhookSignatureError("no signature header")
    parsed = parse_signature_header(header)
    expected = [
        compute_signature(secret, parsed.timestamp, body).encode("ascii") for secret in secrets
    ]
    matched = False
    for candidate in parsed.signatures:
        given = candidate.encode("utf-8")
        for wanted in expected:
            # No early exit: the time taken does not depend on where (or whether) it matches.
            matched |= hmac.compare_digest(wanted, given)
    if not matched:
        raise WebhookSignatureError("no signature matches the body")
    age_s = now.timestamp() - parsed.timestamp
    if age_s > tolerance_s:
        raise WebhookTooOldError(
            f"signed {age_s:.0f} s ago, more than the {tolerance_s} s tolerance"
        )
    if -age_s > tolerance_s:
        raise WebhookTooOldError(
            f"signed {-age_s:.0f} s in the future, more than the {tolerance_s} s tolerance"
        )
    return parsed.timestamp


def header_value(headers: Mapping[str, str], name: str) -> str | None:
    """``headers[name]`` looked up case-insensitively (HTTP field names are, RFC 9110 §5.1)."""
    value = headers.get(name)
    if value is not None:
        return value
    wanted = name.lower()
    for key, candidate in headers.items():
        if key.lower() == wanted:
            return candidate
    return None


def backoff_delay(
    retry: int, *, base_s: float, cap_s: float, uniform: Callable[[float, float], float]
) -> float:
    """Seconds before retry number ``retry`` (0 = first): ``base·2^retry`` capped, equal jitter.

    The nominal delay is spread over ``[d/2, d]`` ("equal jitter", AWS Architecture Blog,
    *Exponential Backoff And Jitter*, 2015) so that many deliveries failing together do not
    retry in the same instant.
    """
    if retry < 0:
        raise ValueError(f"retry must be >= 0, got {retry}")
    nominal = min(cap_s, base_s * 2 ** min(retry, 62))
    return uniform(nominal / 2, nominal)


def _utc_now() -> datetime:
    return datetime.now(UTC)


class DeliveryState(enum.StrEnum):
    """How a delivery stands: still trying, delivered, given up, or cancelled at shutdown."""

    PENDING = "pending"
    DELIVERED = "delivered"
    GAVE_UP = "gave_up"
    CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True)
class DeliveryAttempt:
    """One POST: its number (from 1), when it started, and the HTTP status or the error."""

    number: int
    started_at: datetime
    status: int | None
    error: str | None


@dataclass(eq=False, slots=True)
class Delivery:
    """The record of one event's delivery; updated by the deliverer as attempts are made."""

    url: str
    event_id: str
    attempts: list[DeliveryAttempt] = field(default_factory=list)
    state: DeliveryState = DeliveryState.PENDING
    _finished: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    async def wait(self) -> DeliveryState:
        """Wait until the delivery is delivered, given up or cancelled; return that state."""
        await self._finished.wait()
        return self.state

    def _finish(self, state: DeliveryState) -> None:
        self.state = state
        self._finished.set()


class WebhookDeliverer:
    """Sends signed webhook events in the background, retrying until a 2xx or ``max_attempts``.

    The caller owns ``session`` (open it and close it in the app's ``cleanup_ctx``); use
    the deliverer as an async context manager, or call :meth:`aclose`, so unfinished
    deliveries are cancelled rather than left running.

    Tasks are kept in a set rather than a ``TaskGroup``: a TaskGroup must be exited by the
    task that entered it and cancels everything when one child fails, whereas deliveries
    are independent and this object is opened and closed from aiohttp start-up and
    clean-up hooks.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        max_attempts: int = 8,
        base_delay_s: float = 1.0,
        max_delay_s: float = 300.0,
        attempt_timeout_s: float = 10.0,
        clock: Callable[[], datetime] = _utc_now,
        uniform: Callable[[float, float], float] = random.uniform,
    ) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        if base_delay_s < 0 or max_delay_s < base_delay_s:
            raise ValueError("delays must satisfy 0 <= base_delay_s <= max_delay_s")
        if attempt_timeout_s <= 0:
            raise ValueError("attempt_timeout_s must be > 0")
        self._session = session
        self._max_attempts = max_attempts
        self._base_delay_s = base_delay_s
        self._max_delay_s = max_delay_s
        self._attempt_timeout = aiohttp.ClientTimeout(total=attempt_timeout_s)
        self._clock = clock
        self._uniform = uniform
        self._tasks: dict[asyncio.Task[None], Delivery] = {}
        self._closed = False

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @property
    def in_flight(self) -> int:
        """How many deliveries are still trying."""
        return len(self._tasks)

    def deliver(
        self,
        url: str,
        body: bytes,
        *,
        event_id: str,
        headers: Callable[[], Mapping[str, str]],
    ) -> Delivery:
        """Start delivering ``body`` to ``url`` and return its record at once (never blocks).

        ``headers`` is called before every attempt, so signatures carry that attempt's time.
        """
        if self._closed:
            raise RuntimeError("the webhook deliverer is closed")
        delivery = Delivery(url=url, event_id=event_id)
        task = asyncio.get_running_loop().create_task(
            self._run(delivery, body, headers), name=f"webhook-delivery:{event_id}"
        )
        self._tasks[task] = delivery
        task.add_done_callback(self._tasks.pop)
        return delivery

    async def drain(self) -> None:
        """Wait until every delivery started so far has finished (delivered or given up)."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def aclose(self) -> None:
        """Cancel unfinished deliveries (recorded as ``CANCELLED``); later ``deliver`` fails."""
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(
        self, delivery: Delivery, body: bytes, headers: Callable[[], Mapping[str, str]]
    ) -> None:
        try:
            for number in range(1, self._max_attempts + 1):
                if number > 1:
                    await asyncio.sleep(
                        backoff_delay(
                            number - 2,
                            base_s=self._base_delay_s,
                            cap_s=self._max_delay_s,
                            uniform=self._uniform,
                        )
                    )
                attempt = await self._attempt(delivery.url, number, body, headers())
                delivery.attempts.append(attempt)
                if attempt.status is not None and 200 <= attempt.status < 300:
                    delivery._finish(DeliveryState.DELIVERED)
                    return
                logger.info(
                    "webhook %s to %s: attempt %d failed (%s)",
                    delivery.event_id,
                    delivery.url,
                    number,
                    attempt.status if attempt.status is not None else attempt.error,
                )
            logger.warning(
                "webhook %s to %s: giving up after %d attempts",
                delivery.event_id,
                delivery.url,
                self._max_attempts,
            )
            delivery._finish(DeliveryState.GAVE_UP)
        except asyncio.CancelledError:
            delivery._finish(DeliveryState.CANCELLED)
            raise
        except Exception:
            # A bug (say, in the headers callback) must not leave waiters hanging forever.
            logger.exception("webhook %s to %s: delivery failed", delivery.event_id, delivery.url)
            delivery._finish(DeliveryState.GAVE_UP)

    async def _attempt(
        self, url: str, number: int, body: bytes, headers: Mapping[str, str]
    ) -> DeliveryAttempt:
        started_at = self._clock()
        try:
            # Redirects count as failures, as they do for Stripe's own deliveries: a webhook
            # endpoint answers for itself.
            async with self._session.post(
                url,
                data=body,
                headers={"Content-Type": "application/json", **headers},
                allow_redirects=False,
                timeout=self._attempt_timeout,
            ) as response:
                await response.read()
                return DeliveryAttempt(
                    number=number, started_at=started_at, status=response.status, error=None
                )
        except (aiohttp.ClientError, TimeoutError) as exc:
            return DeliveryAttempt(
                number=number,
                started_at=started_at,
                status=None,
                error=f"{type(exc).__name__}: {exc}",
            )
