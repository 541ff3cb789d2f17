"""Known-answer test vectors: built from the implementation, shipped as ``vectors.json``.

:func:`build` makes the whole document from a fixed, published test key; the test
suite compares it with the shipped file byte for byte, so the file can never drift
from the code. A firmware team iterates over the same file (SPEC.md §6).
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any, Final

from firmware_protocol import messages, rating
from firmware_protocol.errors import ProtocolError
from firmware_protocol.messages import (
    CreditToken,
    Ed25519Signer,
    Header,
    KeyAction,
    KeyChange,
    Message,
    TariffMessage,
)
from firmware_protocol.replay import ReplayWindow
from firmware_protocol.status import TokenStatus, status_for_error
from firmware_protocol.tariff import Band, Block, Switch, Tariff, tariff_to_dict
from firmware_protocol.units import currency

#: The published test seed ``00 01 … 1f``. Never trust its public key in a real meter.
TEST_SEED: Final = bytes(range(32))
TEST_KEY_ID: Final = 7
#: A second test key (seed ``20 21 … 3f``) used as the rotation target.
TEST_SEED_2: Final = bytes(range(32, 64))
TEST_KEY_ID_2: Final = 8
METER: Final = 4_200_000_001
NOW: Final = 1_790_000_000  # 2026-09-21T14:13:20Z: the "now" at which vectors are checked

EXAMPLE_TOU = Tariff(
    tariff_id=42,
    currency=currency("EUR"),
    timezone="Europe/Berlin",
    bands=(Band("offpeak", 24_000), Band("peak", 36_500)),
    weekday=(Switch(0, 0), Switch(7 * 60, 1), Switch(21 * 60, 0)),
    weekend=(Switch(0, 0),),
    holiday=(Switch(0, 0),),
    standing_charge_milli_per_day=39_000,
    holidays=(dt.date(2026, 12, 25), dt.date(2026, 12, 26)),
)
EXAMPLE_BLOCKS = Tariff(
    tariff_id=7,
    currency=currency("KES"),
    timezone="Africa/Nairobi",
    bands=(Band("all-day", 0),),
    weekday=(Switch(0, 0),),
    weekend=(Switch(0, 0),),
    holiday=(Switch(0, 0),),
    blocks=(Block(0, 12_000), Block(30_000, 8_000), Block(100_000, 6_000)),
)


def _signer(seed: bytes, key_id: int) -> Ed25519Signer:
    return Ed25519Signer(key_id, messages.load_private_key(seed))


def _header(msg_id: int, *, meter: int = METER, key_id: int = TEST_KEY_ID) -> Header:
    return Header(
        key_id=key_id,
        meter_id=meter,
        msg_id=msg_id,
        issued_at=NOW - 60,
        expires_at=NOW + 7 * 86_400,
    )


def _fields(m: Message) -> dict[str, Any]:
    h = m.header
    out: dict[str, Any] = {
        "key_id": h.key_id,
        "meter_id": h.meter_id,
        "msg_id": h.msg_id,
        "issued_at": h.issued_at,
        "expires_at": h.expires_at,
    }
    if isinstance(m, CreditToken):
        out |= {"type": "credit", "currency": m.currency.code, "amount_minor": m.amount_minor}
    elif isinstance(m, TariffMessage):
        out |= {
            "type": "tariff",
            "activation_at": m.activation_at,
            "tariff": tariff_to_dict(m.tariff),
        }
    else:
        out |= {
            "type": "key_change",
            "action": m.action.name.lower(),
            "target_key_id": m.target_key_id,
            "public_key": m.public_key.hex(),
        }
    return out


def _outcome(data: bytes, trusted: dict[int, Any]) -> str:
    """The status a meter with ``trusted`` keys at time NOW must report for ``data``."""
    try:
        messages.verify(data, trusted, meter_id=METER, now=NOW)
    except ProtocolError as exc:
        return status_for_error(exc).name.lower()
    return TokenStatus.ACCEPTED.name.lower()


def build() -> dict[str, Any]:
    """The complete vector document (deterministic: Ed25519 signatures are)."""
    key1 = _signer(TEST_SEED, TEST_KEY_ID)
    key2 = _signer(TEST_SEED_2, TEST_KEY_ID_2)
    trusted = {TEST_KEY_ID: key1.private_key.public_key()}
    msgs: list[tuple[str, Message]] = [
        ("credit 5.00 EUR", CreditToken(_header(1), currency("EUR"), 500)),
        ("credit 1000.00 KES", CreditToken(_header(2), currency("KES"), 100_000)),
        ("credit max amount", CreditToken(_header(3), currency("EUR"), 2**32 - 1)),
        ("tariff time-of-use", TariffMessage(_header(4), EXAMPLE_TOU, NOW + 3600)),
        ("tariff inclining blocks", TariffMessage(_header(5), EXAMPLE_BLOCKS, NOW)),
        ("key add", KeyChange(_header(6), KeyAction.ADD, TEST_KEY_ID_2, key2.public_key_bytes())),
        ("key revoke", KeyChange(_header(7), KeyAction.REVOKE, 3, bytes(32))),
    ]
    good = messages.encode(msgs[0][1], key1)
    forged = _signer(bytes(32), TEST_KEY_ID)
    tampered: list[tuple[str, bytes]] = [
        ("untampered", good),
        ("amount changed after signing", good[:28] + bytes.fromhex("000003e8") + good[32:]),
        ("signature bit flipped", good[:-1] + bytes([good[-1] ^ 1])),
        ("signed by another key with the same id", messages.encode(msgs[0][1], forged)),
        (
            "unknown key id",
            messages.encode(CreditToken(_header(9, key_id=8), currency("EUR"), 500), key2),
        ),
        (
            "for another meter",
            messages.encode(CreditToken(_header(9, meter=METER + 1), currency("EUR"), 1), key1),
        ),
        (
            "expired",
            messages.encode(
                CreditToken(
                    Header(key_id=7, meter_id=METER, msg_id=9, issued_at=NOW - 100, expires_at=NOW),
                    currency("EUR"),
                    1,
                ),
                key1,
            ),
        ),
        (
            "issued in the future",
            messages.encode(
                CreditToken(
                    Header(
                        key_id=7,
                        meter_id=METER,
                        msg_id=9,
                        issued_at=NOW + 301,
                        expires_at=NOW + 999,
                    ),
                    currency("EUR"),
                    1,
                ),
                key1,
            ),
        ),
        ("truncated", good[:89]),
        ("version 2", b"\x02" + good[1:]),
    ]
    window = ReplayWindow()
    replay_steps = []
    for msg_id in (1, 2, 5, 3, 5, 70, 6, 7, 4):
        verdict = window.verdict(msg_id)
        if verdict.value == "new":
            window = window.accept(msg_id)
        replay_steps.append(
            {"msg_id": msg_id, "verdict": verdict.value, "state_after": window.to_bytes().hex()}
        )
    return {
        "about": (
            "voltcredit firmware_protocol v1 known-answer vectors; see SPEC.md section 6. "
            "The keys are PUBLISHED TEST KEYS: never trust them in a real meter."
        ),
        "keys": [
            {
                "key_id": TEST_KEY_ID,
                "seed": TEST_SEED.hex(),
                "public_key": key1.public_key_bytes().hex(),
            },
            {
                "key_id": TEST_KEY_ID_2,
                "seed": TEST_SEED_2.hex(),
                "public_key": key2.public_key_bytes().hex(),
            },
        ],
        "meter_id": METER,
        "now": NOW,
        "messages": [
            {"name": name, "fields": _fields(m), "bytes": messages.encode(m, key1).hex()}
            for name, m in msgs
        ],
        "verification": [
            {
                "name": name,
                "bytes": data.hex(),
                "trusted_key_ids": [TEST_KEY_ID],
                "expected_status": _outcome(data, trusted),
            }
            for name, data in tampered
        ],
        "replay_window": {"window": 64, "steps": replay_steps},
        "rating": rating_vectors(),
    }


def rating_vectors() -> list[dict[str, Any]]:
    """Rating cases (RATING.md §8): replay the events through ``advance``, compare."""
    return [
        {
            "name": case.name,
            "tariff": tariff_to_dict(case.tariff),
            "activation": case.activation,
            "events": [[t, wh] for t, wh in case.events],
            "end": case.end,
            "expected_bands": list(case.expected_bands),
            "expected_band_wh": list(case.expected_band_wh),
            "expected_energy_milli": case.expected_energy_milli,
            "expected_standing_milli": case.expected_standing_milli,
            "expected_total_milli": case.expected_total_milli,
        }
        for case in rating.RATING_CASES
    ]


def dumps(document: dict[str, Any]) -> str:
    """The canonical text of ``vectors.json`` (two-space indent, trailing newline)."""
    return json.dumps(document, indent=2, ensure_ascii=True) + "\n"
