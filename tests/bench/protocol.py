"""firmware_protocol throughput: signing, verification, codecs, rating, MQTT batches.

Each figure comes with a baseline measured in the same run (raw Ed25519 from
``cryptography``, raw ``json``), so the ratio says what our layer costs on top.
"""

from __future__ import annotations

from firmware_protocol import messages, mqtt, rating
from firmware_protocol.messages import CreditToken, Header
from firmware_protocol.units import currency
from firmware_protocol.vectors import EXAMPLE_TOU, TEST_KEY_ID, TEST_SEED
from tests.bench.common import Report, rate

T0 = 1_790_000_000


def run() -> Report:
    report = Report("protocol")
    signer = messages.Ed25519Signer(TEST_KEY_ID, messages.load_private_key(TEST_SEED))
    trusted = {TEST_KEY_ID: signer.private_key.public_key()}
    token = CreditToken(
        Header(key_id=TEST_KEY_ID, meter_id=42, msg_id=1, issued_at=T0, expires_at=T0 + 86_400),
        currency("EUR"),
        500,
    )
    data = messages.encode(token, signer)
    pub = signer.private_key.public_key()
    print("signed messages")
    raw_sign = rate(lambda: signer.private_key.sign(data[:32]))
    report.add("baseline: raw Ed25519 sign (cryptography)", raw_sign, "ops/s")
    enc = rate(lambda: messages.encode(token, signer))
    report.add("credit token encode + sign", enc, "tokens/s", vs_baseline=round(enc / raw_sign, 3))
    raw_verify = rate(lambda: pub.verify(data[32:], data[:32]))
    report.add("baseline: raw Ed25519 verify (cryptography)", raw_verify, "ops/s")
    ver = rate(lambda: messages.verify(data, trusted, meter_id=42, now=T0 + 1))
    report.add(
        "credit token verify + decode", ver, "tokens/s", vs_baseline=round(ver / raw_verify, 3)
    )
    dec = rate(lambda: messages.decode_unverified(data))
    report.add("credit token decode (no signature check)", dec, "tokens/s")

    print("rating")
    report.add(
        "band_at (ToU, Europe/Berlin)",
        rate(lambda: rating.band_at(EXAMPLE_TOU, T0 + 12_345)),
        "evals/s",
    )
    regs = rating.start_registers(EXAMPLE_TOU, T0)
    later = rating.advance(EXAMPLE_TOU, regs, T0 + 3600, 1234)
    report.add(
        "advance (book Wh to a band)",
        rate(lambda: rating.advance(EXAMPLE_TOU, regs, T0 + 3600, 1234)),
        "evals/s",
    )
    report.add(
        "rate_interval (two snapshots)",
        rate(lambda: rating.rate_interval(EXAMPLE_TOU, regs, later)),
        "evals/s",
    )

    print("MQTT reading batch of 500")
    readings = tuple(
        mqtt.Reading(
            meter=1_000_000 + i,
            ts=T0,
            import_wh=123_456 + i,
            band_wh=(100_000, 23_456 + i),
            credit_milli=5_000_000 - i,
            relay=mqtt.Relay.CLOSED,
            power_w=850,
            voltage_dv=2301,
            current_ma=3694,
            tariff_id=1,
            last_token_id=3,
            status_flags=0,
            block_period=24_320,
            block_period_wh=0,
        )
        for i in range(500)
    )
    batch = mqtt.ReadingBatch(gw="gw-1", seq=1, historical=False, readings=readings)
    payload = mqtt.encode(batch)
    import json

    as_obj = json.loads(payload)
    raw_dump = rate(
        lambda: json.dumps(as_obj, separators=(",", ":"), sort_keys=True), min_seconds=0.5
    )
    report.add("baseline: json.dumps of the same batch", raw_dump * 500, "readings/s")
    e = rate(lambda: mqtt.encode(batch), min_seconds=0.5)
    report.add("encode ReadingBatch", e * 500, "readings/s", vs_baseline=round(e / raw_dump, 3))
    raw_load = rate(lambda: json.loads(payload), min_seconds=0.5)
    report.add("baseline: json.loads of the same batch", raw_load * 500, "readings/s")
    d = rate(lambda: mqtt.decode_reading_batch(payload), min_seconds=0.5)
    report.add(
        "decode + validate ReadingBatch", d * 500, "readings/s", vs_baseline=round(d / raw_load, 3)
    )
    report.notes.append(
        "best of 3 runs of >= 1 s (0.5 s for batches), one core, `python -m tests.bench protocol`"
    )
    return report
