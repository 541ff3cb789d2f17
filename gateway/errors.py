"""Exception tree of the gateway: every way the gateway fails, translated from the layers below.

GatewayError                    root: anything the gateway raises on purpose
├── GatewayConfigError          the TOML file or the environment is invalid (file, key, problem)
├── MeterError                  a meter operation failed (carries ``meter_id``)
│   ├── MeterUnreachableError   no answer: timeout, refused connection, serial error, backing off
│   └── MeterProtocolError      an answer, but a wrong one: Modbus exception, bad registers
│       └── MeterIdentityError  the device at the address is another meter or map version
├── StoreError                  the local SQLite store failed (disk full, corrupt, locked)
├── LinkError                   the MQTT link cannot do what was asked (stopped, refused)
└── TokenFlowError              a token state transition the table does not allow (our bug)

Lower layers never leak: pymodbus and OS errors become :class:`MeterError` in
``gateway.drivers``, sqlite3 errors :class:`StoreError` in ``gateway.store``, paho
return codes :class:`LinkError` in ``gateway.mqtt_link`` — each ``raise … from exc``.
``firmware_protocol`` refusals of *peer input* (a token, an MQTT payload) are not
translated: they are expected outcomes that map to a ``TokenStatus`` or a log line.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Root of everything the gateway raises on purpose."""

    #: True when the cause is on the other side (a meter, the broker, a config author).
    peer_fault: bool = False


class GatewayConfigError(GatewayError):
    """The configuration is invalid; the message reads ``FILE: KEY: PROBLEM``."""

    peer_fault = True


class MeterError(GatewayError):
    """A meter operation failed."""

    def __init__(self, meter_id: int, message: str) -> None:
        super().__init__(f"meter {meter_id}: {message}")
        self.meter_id = meter_id


class MeterUnreachableError(MeterError):
    """The meter did not answer (after retries), or is in its back-off period."""

    peer_fault = True


class MeterProtocolError(MeterError):
    """The meter answered, but with a Modbus exception or registers that do not decode."""

    peer_fault = True


class MeterIdentityError(MeterProtocolError):
    """The device at the configured address is another meter, or speaks another register map."""


class StoreError(GatewayError):
    """The local SQLite store failed."""


class LinkError(GatewayError):
    """The MQTT link cannot do what was asked."""


class TokenFlowError(GatewayError):
    """A token state transition that the table in ``gateway.token_flow`` does not allow."""
