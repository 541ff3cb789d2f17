"""The Stripe adapter: PaymentIntents over Stripe's REST API and ``Stripe-Signature`` webhooks.

It talks to the documented HTTP API directly with aiohttp (no SDK), so every byte is visible
and testable against a local imitation:

- Create: ``POST /v1/payment_intents``, form-encoded, ``amount`` in the smallest currency
  unit, ``currency`` lower-case, ``automatic_payment_methods[enabled]=true``,
  ``metadata[key]=value`` — https://docs.stripe.com/api/payment_intents/create
- Retrieve: ``GET /v1/payment_intents/{id}`` — https://docs.stripe.com/api/payment_intents/retrieve
- The object and its statuses: https://docs.stripe.com/api/payment_intents/object and
  https://docs.stripe.com/payments/paymentintents/lifecycle
- Auth: ``Authorization: Bearer <secret key>`` — https://docs.stripe.com/api/authentication
- Idempotency: ``Idempotency-Key`` header on POST; Stripe replays the first result for 24 h
  — https://docs.stripe.com/api/idempotent_requests
- Errors: non-2xx with a JSON ``error`` object (``type``, ``code``, ``message``); 429 and
  5xx are worth retrying with the same key, a ``Stripe-Should-Retry`` header overrides —
  https://docs.stripe.com/api/errors and https://docs.stripe.com/error-low-level
- Events: ``{"id", "type", "created", "data": {"object": PaymentIntent}}``, signed as in
  :mod:`backend.payments.webhooks` — https://docs.stripe.com/api/events/object and
  https://docs.stripe.com/webhooks#verify-manually

The API key and webhook secret come from configuration, never from the repository.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Final

import aiohttp

from backend.payments.base import (
    JsonObject,
    PaymentIntent,
    PaymentRequest,
    PaymentStatus,
    WebhookEvent,
    get_int,
    get_object,
    get_optional_str,
    get_str,
    json_object,
)
from backend.payments.errors import (
    InvalidPaymentRequestError,
    PaymentConflictError,
    PaymentNotFoundError,
    PaymentProviderError,
    UnhandledWebhookEventError,
    WebhookMalformedError,
)
from backend.payments.webhooks import DEFAULT_TOLERANCE_S, header_value, verify_signature

PROVIDER_NAME: Final = "stripe"
DEFAULT_BASE_URL: Final = "https://api.stripe.com"
SIGNATURE_HEADER: Final = "Stripe-Signature"
#: "The amount value supports up to eight digits" (PaymentIntent object, ``amount``).
MAX_STRIPE_AMOUNT: Final = 99_999_999

#: PaymentIntent ``status`` → ours. ``requires_payment_method`` is also where a failed
#: attempt lands (with ``last_payment_error`` set), see :func:`map_stripe_status`.
#: ``requires_capture`` only occurs with manual capture, which we never ask for; the money
#: is then authorised, not collected, hence still pending.
STRIPE_STATUS_MAP: Final[Mapping[str, PaymentStatus]] = MappingProxyType(
    {
        "requires_payment_method": PaymentStatus.PENDING,
        "requires_confirmation": PaymentStatus.PENDING,
        "requires_action": PaymentStatus.REQUIRES_ACTION,
        "processing": PaymentStatus.PENDING,
        "requires_capture": PaymentStatus.PENDING,
        "succeeded": PaymentStatus.SUCCEEDED,
        "canceled": PaymentStatus.CANCELED,
    }
)

#: The event types we act on → the status they report. Others are acknowledged and ignored
#: (:class:`UnhandledWebhookEventError`).
STRIPE_EVENT_STATUS: Final[Mapping[str, PaymentStatus]] = MappingProxyType(
    {
        "payment_intent.succeeded": PaymentStatus.SUCCEEDED,
        "payment_intent.payment_failed": PaymentStatus.FAILED,
        "payment_intent.canceled": PaymentStatus.CANCELED,
    }
)

# Stripe ids are ``pi_`` plus letters and digits; anything else must not reach a URL path.
_PAYMENT_ID = re.compile(r"[A-Za-z0-9_]{1,255}")


def map_stripe_status(status: str, *, has_payment_error: bool = False) -> PaymentStatus:
    """Our status for a PaymentIntent ``status``; ``ValueError`` for one we do not know.

    A PaymentIntent has no "failed" status: when an attempt fails, it goes back to
    ``requires_payment_method`` with ``last_payment_error`` set, which we report as
    ``FAILED`` (see :class:`~backend.payments.base.PaymentStatus` on why that is not final).
    """
    try:
        mapped = STRIPE_STATUS_MAP[status]
    except KeyError:
        raise ValueError(f"unknown PaymentIntent status {status!r}") from None
    if status == "requires_payment_method" and has_payment_error:
        return PaymentStatus.FAILED
    return mapped


def _provider_error(message: str) -> PaymentProviderError:
    # A 2xx answer we cannot read is not worth repeating: it would read the same.
    return PaymentProviderError(
        f"unexpected response: {message}", provider=PROVIDER_NAME, retryable=False
    )


class StripeProvider:
    """A :class:`~backend.payments.base.PaymentProvider` backed by Stripe PaymentIntents.

    ``session`` is owned by the caller (opened and closed in the app's ``cleanup_ctx``).
    ``api_version`` pins ``Stripe-Version`` when given; otherwise the account's default
    applies. ``base_url`` exists for tests against a local imitation.
    """

    def __init__(
        self,
        *,
        api_key: str,
        webhook_secret: str,
        session: aiohttp.ClientSession,
        base_url: str = DEFAULT_BASE_URL,
        api_version: str | None = None,
        tolerance_s: int = DEFAULT_TOLERANCE_S,
        request_timeout_s: float = 30.0,
    ) -> None:
        if not api_key:
            raise ValueError("the Stripe API key must not be empty")
        if not webhook_secret:
            raise ValueError("the Stripe webhook secret must not be empty")
        self._api_key = api_key
        # Stripe's libraries key the HMAC with the secret string's UTF-8 bytes, the
        # ``whsec_`` prefix included.
        self._webhook_secret = webhook_secret.encode("utf-8")
        self._session = session
        self._base_url = base_url.rstrip("/")
        self._api_version = api_version
        self._tolerance_s = tolerance_s
        self._timeout = aiohttp.ClientTimeout(total=request_timeout_s)

    def __repr__(self) -> str:
        # Never show the key, even in a traceback's locals.
        return f"StripeProvider(base_url={self._base_url!r}, api_version={self._api_version!r})"

    @property
    def name(self) -> str:
        """``"stripe"``."""
        return PROVIDER_NAME

    async def create_payment(self, request: PaymentRequest) -> PaymentIntent:
        """Create a PaymentIntent (idempotent on the request's key) and return it."""
        if request.amount_minor > MAX_STRIPE_AMOUNT:
            raise InvalidPaymentRequestError(
                f"Stripe amounts have at most eight digits, got {request.amount_minor}"
            )
        form: list[tuple[str, str]] = [
            ("amount", str(request.amount_minor)),
            ("currency", request.currency.lower()),
            ("automatic_payment_methods[enabled]", "true"),
            ("metadata[account_ref]", request.account_ref),
        ]
        form.extend((f"metadata[{key}]", value) for key, value in request.metadata.items())
        if request.description:
            form.append(("description", request.description))
        body = await self._call(
            "POST",
            "/v1/payment_intents",
            form=form,
            idempotency_key=request.idempotency_key,
        )
        intent = self._intent(body)
        # Stripe refuses a reused key with other parameters, so this only trips on a bug.
        if (intent.amount_minor, intent.currency) != (request.amount_minor, request.currency):
            raise _provider_error(
                f"PaymentIntent {intent.provider_payment_id} is for {intent.amount_minor} "
                f"{intent.currency}, asked {request.amount_minor} {request.currency}"
            )
        return intent

    async def get_payment(self, provider_payment_id: str) -> PaymentIntent:
        """Retrieve a PaymentIntent's current state."""
        if not _PAYMENT_ID.fullmatch(provider_payment_id):
            raise InvalidPaymentRequestError(
                f"not a Stripe PaymentIntent id: {provider_payment_id!r}"
            )
        body = await self._call(
            "GET", f"/v1/payment_intents/{provider_payment_id}", payment_id=provider_payment_id
        )
        return self._intent(body)

    def parse_webhook(self, headers: Mapping[str, str], body: bytes, now: datetime) -> WebhookEvent:
        """Verify ``Stripe-Signature``, then map a ``payment_intent.*`` event."""
        verify_signature(
            header_value(headers, SIGNATURE_HEADER),
            body,
            secrets=[self._webhook_secret],
            now=now,
            tolerance_s=self._tolerance_s,
        )
        error = WebhookMalformedError
        event = json_object(body, what="Stripe event", error=error)
        event_id = get_str(event, "id", where="event", error=error)
        event_type = get_str(event, "type", where="event", error=error)
        created = get_int(event, "created", where="event", error=error)
        status = STRIPE_EVENT_STATUS.get(event_type)
        if status is None:
            raise UnhandledWebhookEventError(PROVIDER_NAME, event_id, event_type)
        data = get_object(event, "data", where="event", error=error)
        intent = get_object(data, "object", where="event.data", error=error)
        where = "event.data.object"
        if intent.get("object") != "payment_intent":
            raise error(f"{where}.object must be 'payment_intent' for {event_type}")
        try:
            return WebhookEvent(
                provider=PROVIDER_NAME,
                event_id=event_id,
                type=event_type,
                provider_payment_id=get_str(intent, "id", where=where, error=error),
                status=status,
                amount_minor=get_int(intent, "amount", where=where, error=error),
                currency=get_str(intent, "currency", where=where, error=error).upper(),
                created_at=datetime.fromtimestamp(created, UTC),
                raw=body,
            )
        except (ValueError, OverflowError, OSError) as exc:
            raise error(f"Stripe event {event_id!r}: {exc}") from exc

    # --- HTTP ----------------------------------------------------------------------------

    async def _call(
        self,
        method: str,
        path: str,
        *,
        form: list[tuple[str, str]] | None = None,
        idempotency_key: str | None = None,
        payment_id: str | None = None,
    ) -> JsonObject:
        headers = {"Authorization": f"Bearer {self._api_key}"}
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        if self._api_version is not None:
            headers["Stripe-Version"] = self._api_version
        try:
            async with self._session.request(
                method,
                self._base_url + path,
                data=form,  # a list of pairs is sent as application/x-www-form-urlencoded
                headers=headers,
                timeout=self._timeout,
                allow_redirects=False,
            ) as response:
                raw = await response.read()
                status = response.status
                should_retry = response.headers.get("Stripe-Should-Retry")
        except (aiohttp.ClientError, TimeoutError) as exc:
            # The request may or may not have reached Stripe; repeating it with the same
            # idempotency key is what Stripe recommends for exactly this case.
            raise PaymentProviderError(
                f"{method} {path} failed: {type(exc).__name__}: {exc}",
                provider=PROVIDER_NAME,
                retryable=True,
            ) from exc
        if 200 <= status < 300:
            return json_object(raw, what="Stripe response", error=_provider_error)
        raise _api_error(status, raw, should_retry, payment_id=payment_id)

    def _intent(self, body: JsonObject) -> PaymentIntent:
        where = "payment_intent"
        payment_id = get_str(body, "id", where=where, error=_provider_error)
        status_text = get_str(body, "status", where=where, error=_provider_error)
        last_error = body.get("last_payment_error")
        next_action_url = None
        next_action = body.get("next_action")
        if isinstance(next_action, dict) and next_action.get("type") == "redirect_to_url":
            redirect = get_object(
                next_action, "redirect_to_url", where=f"{where}.next_action", error=_provider_error
            )
            next_action_url = get_str(
                redirect, "url", where=f"{where}.next_action.redirect_to_url", error=_provider_error
            )
        try:
            return PaymentIntent(
                provider=PROVIDER_NAME,
                provider_payment_id=payment_id,
                status=map_stripe_status(status_text, has_payment_error=last_error is not None),
                amount_minor=get_int(body, "amount", where=where, error=_provider_error),
                currency=get_str(body, "currency", where=where, error=_provider_error).upper(),
                client_secret=get_optional_str(
                    body, "client_secret", where=where, error=_provider_error
                ),
                next_action_url=next_action_url,
            )
        except ValueError as exc:
            raise _provider_error(f"PaymentIntent {payment_id}: {exc}") from exc


def _api_error(
    status: int, raw: bytes, should_retry: str | None, *, payment_id: str | None
) -> Exception:
    """Translate a non-2xx answer (https://docs.stripe.com/error-low-level)."""
    error_type: str | None = None
    code: str | None = None
    message = f"HTTP {status}"
    try:
        body = json_object(raw, what="error body", error=ValueError)
        error = get_object(body, "error", where="body", error=ValueError)
        error_type = get_optional_str(error, "type", where="error", error=ValueError)
        code = get_optional_str(error, "code", where="error", error=ValueError)
        text = get_optional_str(error, "message", where="error", error=ValueError)
    except ValueError:
        pass  # a proxy's HTML page, say: the status alone has to do
    else:
        message = f"HTTP {status} {error_type or 'error'}: {text or code or 'no message'}"
    if error_type == "idempotency_error":
        return PaymentConflictError(f"stripe: {message}")
    if status == 404 and payment_id is not None:
        return PaymentNotFoundError(PROVIDER_NAME, payment_id)
    if should_retry is not None:
        # Stripe said so explicitly; that wins over the status (error-low-level).
        retryable = should_retry.strip().lower() == "true"
    else:
        # 409: a concurrent request with the same key or a lock timeout; 429: rate limit;
        # 5xx: Stripe's side. All may go through if repeated with the same key.
        retryable = status in (409, 429) or status >= 500
    return PaymentProviderError(
        message, provider=PROVIDER_NAME, retryable=retryable, status=status, code=code
    )
