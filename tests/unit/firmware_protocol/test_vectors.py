"""The shipped known-answer vectors equal what the code produces, and replay as documented."""

from __future__ import annotations

import json
from importlib import resources

import pytest

from firmware_protocol import errors, messages, rating, vectors
from firmware_protocol.replay import ReplayWindow
from firmware_protocol.status import TokenStatus, status_for_error
from firmware_protocol.tariff import tariff_from_dict, tariff_to_dict

SHIPPED = resources.files("firmware_protocol").joinpath("vectors.json").read_text()


def test_shipped_file_is_regenerated_exactly() -> None:
    # If this fails after an intended change: python -c "from firmware_protocol import
    # vectors as v; open('firmware_protocol/vectors.json','w').write(v.dumps(v.build()))"
    assert vectors.dumps(vectors.build()) == SHIPPED


def test_vectors_replay_like_a_firmware_team_would() -> None:
    """Use only the JSON (keys, bytes, fields) the way a C test harness would."""
    doc = json.loads(SHIPPED)
    trusted = {
        k["key_id"]: messages.load_public_key(bytes.fromhex(k["public_key"])) for k in doc["keys"]
    }
    for k in doc["keys"]:
        seed_pub = messages.Ed25519Signer(
            k["key_id"], messages.load_private_key(bytes.fromhex(k["seed"]))
        ).public_key_bytes()
        assert seed_pub.hex() == k["public_key"]
    for case in doc["messages"]:
        msg = messages.verify(
            bytes.fromhex(case["bytes"]), trusted, meter_id=doc["meter_id"], now=doc["now"]
        )
        fields = case["fields"]
        assert msg.header.msg_id == fields["msg_id"]
        assert msg.header.expires_at == fields["expires_at"]
        if fields["type"] == "credit":
            assert isinstance(msg, messages.CreditToken)
            assert (msg.currency.code, msg.amount_minor) == (
                fields["currency"],
                fields["amount_minor"],
            )
        elif fields["type"] == "tariff":
            assert isinstance(msg, messages.TariffMessage)
            assert tariff_to_dict(msg.tariff) == fields["tariff"]
        else:
            assert isinstance(msg, messages.KeyChange)
            assert msg.public_key.hex() == fields["public_key"]
    only_first = {doc["keys"][0]["key_id"]: trusted[doc["keys"][0]["key_id"]]}
    for case in doc["verification"]:
        try:
            messages.verify(
                bytes.fromhex(case["bytes"]), only_first, meter_id=doc["meter_id"], now=doc["now"]
            )
            status = TokenStatus.ACCEPTED
        except errors.ProtocolError as exc:
            status = status_for_error(exc)
        assert status is TokenStatus[case["expected_status"].upper()], case["name"]
    window = ReplayWindow()
    for step in doc["replay_window"]["steps"]:
        assert window.verdict(step["msg_id"]).value == step["verdict"]
        if step["verdict"] == "new":
            window = window.accept(step["msg_id"])
        assert window.to_bytes().hex() == step["state_after"]
    for case in doc["rating"]:
        tariff = tariff_from_dict(case["tariff"])
        regs = rating.start_registers(tariff, case["activation"])
        for (t, wh), band in zip(case["events"], case["expected_bands"], strict=True):
            assert rating.band_at(tariff, t) == band
            regs = rating.advance(tariff, regs, t, wh)
        assert list(regs.band_wh) == case["expected_band_wh"]
        assert rating.cumulative_charge_milli(tariff, regs) == case["expected_energy_milli"]
        standing = rating.standing_charges_milli(tariff, case["activation"], case["end"])
        assert standing == case["expected_standing_milli"]
        assert case["expected_total_milli"] == case["expected_energy_milli"] + standing


def test_tariff_dict_round_trip_and_defaults() -> None:
    for t in (vectors.EXAMPLE_TOU, vectors.EXAMPLE_BLOCKS):
        assert tariff_from_dict(tariff_to_dict(t)) == t
    minimal = tariff_from_dict(
        {
            "tariff_id": 3,
            "currency": "EUR",
            "timezone": "UTC",
            "bands": [{"name": "all", "price_milli_per_kwh": 1}],
            "weekday": [[0, 0]],
        }
    )
    assert minimal.weekend == minimal.holiday == minimal.weekday
    assert minimal.blocks == ()


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ([], "JSON object"),
        ({"x": 1}, "unknown tariff fields: x"),
        ({"tariff_id": 1}, "missing tariff fields"),
        ({**tariff_to_dict(vectors.EXAMPLE_TOU), "currency": "XXX"}, "unknown currency"),
        ({**tariff_to_dict(vectors.EXAMPLE_TOU), "bands": {}}, "JSON array"),
        ({**tariff_to_dict(vectors.EXAMPLE_TOU), "bands": [{"name": "a"}]}, "exactly name"),
        ({**tariff_to_dict(vectors.EXAMPLE_TOU), "weekday": [[0]]}, r"\[int, int\]"),
        ({**tariff_to_dict(vectors.EXAMPLE_TOU), "holidays": ["2026-13-01"]}, "malformed"),
        ({**tariff_to_dict(vectors.EXAMPLE_TOU), "tariff_id": "1"}, "integer"),
    ],
)
def test_tariff_dict_rejections(data: object, match: str) -> None:
    with pytest.raises(errors.TariffError, match=match):
        tariff_from_dict(data)
