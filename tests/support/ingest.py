"""Fixtures of the ingest tests: a tenant with a time-of-use tariff and rules, simulated meters.

:func:`provision_ingest` writes, with the table classes directly (no API):

* tenant "Volta" in Europe/Berlin, EUR; partners: utility (REMAINDER, unlimited), grid
  operator (PER_KWH 90 000 milli/kWh), tax authority (BASIS_POINTS 1 597); CONSUMPTION
  rules for tariff code HOME (ids reported in :class:`IngestWorld`);
* the TOU tariff below as ``tariffs`` row (wire id = ``TOU.tariff_id``), activated before
  the meters were provisioned;
* ``meters`` meters on gateway ``gw-1``, each with a supply account whose PREPAID ledger
  account starts at ``opening_minor`` (a TOPUP transfer from the clearing account) and
  whose debt limit is ``debt_limit_minor``.

:class:`SimMeters` drives real :mod:`meter_sim.core` meters (household profiles) starting
with the same credit as their ledger accounts, and turns their state into gateway
readings, so a test can compare what the backend billed with what the meters took.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from backend.adapters.db.engine import Database
from backend.adapters.db.ledger_repo import LedgerRepository
from backend.adapters.db.tables import (
    CustomerRow,
    GatewayRow,
    MeterRow,
    PartnerRow,
    SplitRuleRow,
    SupplyAccountRow,
    TariffRow,
    TenantRow,
)
from backend.domain.ledger import AccountCode, AccountSpec, Transfer, TransferCode, derive_id
from firmware_protocol import messages
from firmware_protocol.modbus_map import RelayState
from firmware_protocol.mqtt import Reading, ReadingBatch, Relay
from firmware_protocol.tariff import Band, Switch, Tariff, tariff_to_dict
from firmware_protocol.units import currency
from meter_sim import core
from meter_sim.profiles import HouseholdProfile

BERLIN = "Europe/Berlin"
EUR = currency("EUR")
GATEWAY = "gw-1"
#: Berlin time of use (night, day, peak) with a daily standing charge.
TOU = Tariff(
    tariff_id=11,
    currency=EUR,
    timezone=BERLIN,
    bands=(Band("night", 24_000), Band("day", 31_000), Band("peak", 42_000)),
    weekday=(Switch(0, 0), Switch(360, 1), Switch(1020, 2), Switch(1260, 0)),
    weekend=(Switch(0, 0), Switch(480, 1), Switch(1320, 0)),
    holiday=(Switch(0, 0),),
    standing_charge_milli_per_day=38_000,
)
GRID_MILLI_PER_KWH = 90_000
VAT_BP = 1_597
#: When the tariff became active and the world was provisioned (before any reading).
PROVISIONED = datetime(2026, 10, 1, tzinfo=UTC)


@dataclass(frozen=True)
class IngestWorld:
    tenant_id: int
    clearing_id: int
    utility_id: int
    grid_id: int
    tax_id: int
    meters: list[int]
    prepaid: dict[int, int]  # meter -> prepaid ledger account
    accounts: dict[int, int]  # meter -> supply account id
    rule_ids: dict[str, int]  # "grid" | "tax" | "utility" -> split_rules.id


class _Ids:
    def __init__(self, start: int) -> None:
        self.n = start

    def __call__(self) -> int:
        self.n += 1
        return self.n


async def provision_ingest(
    db: Database,
    *,
    meters: int = 3,
    first_meter: int = 8_000_001,
    opening_minor: int = 5_000,
    debt_limit_minor: int = 1_000,
    rules: bool = True,
    tenant_name: str = "Volta",
    gateway: str = GATEWAY,
    id_base: int = 5_000,
) -> IngestWorld:
    """Create the world described in the module docstring."""
    ids = _Ids(id_base)
    clearing, utility, grid, tax = ids(), ids(), ids(), ids()
    at = PROVISIONED
    async with db.write() as s:
        ledger = LedgerRepository(s)
        await ledger.create_accounts(
            [
                AccountSpec(
                    id=clearing, currency="EUR", code=AccountCode.CLEARING, min_balance=None
                ),
                AccountSpec(id=utility, currency="EUR", code=AccountCode.PARTNER, min_balance=None),
                AccountSpec(id=grid, currency="EUR", code=AccountCode.PARTNER, min_balance=0),
                AccountSpec(id=tax, currency="EUR", code=AccountCode.TAX, min_balance=0),
            ]
        )
        tenant = TenantRow(
            name=tenant_name,
            currency="EUR",
            timezone=BERLIN,
            min_topup_minor=500,
            max_topup_minor=50_000,
            clearing_account_id=clearing,
            created_at=at,
        )
        s.add(tenant)
        await s.flush()
        partners = {
            name: PartnerRow(
                tenant_id=tenant.id,
                reseller_id=None,
                name=f"{tenant_name} {name}",
                kind=kind,
                ledger_account_id=account,
                created_at=at,
            )
            for name, kind, account in (
                ("utility", "UTILITY", utility),
                ("grid", "GRID_OPERATOR", grid),
                ("tax", "TAX_AUTHORITY", tax),
            )
        }
        s.add_all(partners.values())
        await s.flush()
        s.add(
            TariffRow(
                tenant_id=tenant.id,
                code="HOME",
                version=1,
                wire_id=TOU.tariff_id,
                body=tariff_to_dict(TOU),
                activation_at=at,
                created_at=at,
            )
        )
        rule_rows: dict[str, SplitRuleRow] = {}
        if rules:
            for pos, (name, kind, value) in enumerate(
                (
                    ("grid", "PER_KWH", GRID_MILLI_PER_KWH),
                    ("tax", "BASIS_POINTS", VAT_BP),
                    ("utility", "REMAINDER", 0),
                )
            ):
                rule_rows[name] = SplitRuleRow(
                    tenant_id=tenant.id,
                    tariff_code="HOME",
                    applies_to="CONSUMPTION",
                    kind=kind,
                    partner_id=partners[name].id,
                    value=value,
                    position=pos,
                    created_at=at,
                )
            s.add_all(rule_rows.values())
        s.add(
            GatewayRow(
                id=gateway,
                tenant_id=tenant.id,
                mqtt_username=gateway,
                mqtt_password_hash="x",  # noqa: S106 - a placeholder hash, never checked
                online=False,
                boot_seq=0,
                created_at=at,
            )
        )
        meter_ids: list[int] = []
        prepaid: dict[int, int] = {}
        accounts: dict[int, int] = {}
        for i in range(meters):
            meter_id = first_meter + i
            account_id = ids()
            await ledger.create_accounts(
                [
                    AccountSpec(
                        id=account_id,
                        currency="EUR",
                        code=AccountCode.PREPAID,
                        min_balance=-debt_limit_minor,
                    )
                ]
            )
            customer = CustomerRow(
                tenant_id=tenant.id,
                reseller_id=None,
                name=f"Customer {i}",
                email=f"c{i}@{tenant_name.lower()}.example",
                password_hash="x",  # noqa: S106 - a placeholder hash, never checked
                created_at=at,
            )
            s.add(customer)
            await s.flush()
            supply = SupplyAccountRow(
                tenant_id=tenant.id,
                reseller_id=None,
                customer_id=customer.id,
                ledger_account_id=account_id,
                tariff_code="HOME",
                label=f"Flat {i}",
                debt_limit_minor=debt_limit_minor,
                low_credit_minor=200,
                created_at=at,
            )
            s.add(supply)
            await s.flush()
            s.add(
                MeterRow(
                    id=meter_id,
                    tenant_id=tenant.id,
                    gateway_id=gateway,
                    supply_account_id=supply.id,
                    modbus_unit=None,
                    next_msg_id=1,
                    last_credit_milli=None,
                    last_reading_at=None,
                    created_at=at,
                )
            )
            if opening_minor:
                await ledger.post(
                    [
                        Transfer(
                            id=derive_id("opening", str(meter_id)),
                            debit_account_id=clearing,
                            credit_account_id=account_id,
                            amount=opening_minor,
                            currency="EUR",
                            code=TransferCode.TOPUP,
                            reference=f"opening:{meter_id}",
                            created_at=at,
                        )
                    ]
                )
            meter_ids.append(meter_id)
            prepaid[meter_id] = account_id
            accounts[meter_id] = supply.id
        await s.flush()
        rule_ids = {name: row.id for name, row in rule_rows.items()}
        tenant_id = tenant.id
    return IngestWorld(
        tenant_id=tenant_id,
        clearing_id=clearing,
        utility_id=utility,
        grid_id=grid,
        tax_id=tax,
        meters=meter_ids,
        prepaid=prepaid,
        accounts=accounts,
        rule_ids=rule_ids,
    )


def _trim(bands: tuple[int, ...]) -> tuple[int, ...]:
    end = len(bands)
    while end > 1 and bands[end - 1] == 0:
        end -= 1
    return bands[:end]


@dataclass
class SimMeters:
    """Simulated meters (meter_sim.core) starting at ``start`` with ``credit_milli`` each."""

    meters: list[int]
    start: int
    credit_milli: int
    seed: int = 1
    states: dict[int, core.MeterState] = field(default_factory=dict)
    configs: dict[int, core.MeterConfig] = field(default_factory=dict)
    profiles: dict[int, HouseholdProfile] = field(default_factory=dict)

    def __post_init__(self) -> None:
        key = messages.public_key_bytes(messages.load_private_key(bytes([1]) * 32).public_key())
        for n, meter in enumerate(self.meters):
            config = core.MeterConfig(meter_id=meter, currency=EUR)
            self.configs[meter] = config
            self.states[meter] = core.new_meter(
                config,
                tariff=TOU,
                trusted_keys={1: key},
                now=self.start,
                credit_milli=self.credit_milli,
            )
            self.profiles[meter] = HouseholdProfile.default(BERLIN, seed=self.seed + n)

    def reading(self, meter: int) -> Reading:
        s = self.states[meter]
        return Reading(
            meter=meter,
            ts=s.now,
            import_wh=s.import_wh,
            band_wh=_trim(s.regs.band_wh),
            credit_milli=s.credit_milli,
            relay=Relay.CLOSED if s.relay is RelayState.CLOSED else Relay.OPEN,
            power_w=s.power_w,
            voltage_dv=2300,
            current_ma=0,
            tariff_id=s.tariff.tariff_id,
            last_token_id=s.last_message_id,
            status_flags=0,
            block_period=s.regs.block_period,
            block_period_wh=s.regs.block_period_wh,
        )

    def run(self, until: int, step: int) -> list[list[Reading]]:
        """Advance every meter to ``until`` in ``step``s; one list of readings per step."""
        rounds: list[list[Reading]] = []
        t = max(s.now for s in self.states.values())
        while t + step <= until:
            t += step
            row = []
            for meter in self.meters:
                self.states[meter] = core.advance(
                    self.states[meter], self.configs[meter], t, self.profiles[meter]
                )
                row.append(self.reading(meter))
            rounds.append(row)
        return rounds


def batches(
    rounds: list[list[Reading]], *, gw: str = GATEWAY, first_seq: int = 1
) -> list[ReadingBatch]:
    """One batch per round, numbered from ``first_seq``."""
    return [
        ReadingBatch(gw=gw, seq=first_seq + n, historical=False, readings=tuple(row))
        for n, row in enumerate(rounds)
    ]
