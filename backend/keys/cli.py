"""``voltcredit keys``: generate, list, activate and publish signing keys; plan a key rotation.

The backend signs every credit token, tariff and key-change message with its ACTIVE key.
A key is born NEXT (the first one ACTIVE), is distributed to every meter, becomes ACTIVE,
and is finally RETIRED and revoked from the meters. Keys live in a directory (mode 0700)
of 0600 seed files; the store refuses a directory or seed that others could read.

Rotation through the database (SPEC.md §2.4; ``rotate`` queues each meter's signed
key-change message in the token outbox and the dispatcher delivers it):

1. ``generate``: a NEXT key (copy the store to every backend host).
2. ``rotate --step add``: every meter gets ADD(new key), signed by the ACTIVE key.
3. Wait until every ADD token is APPLIED: ``rotate --step add`` again counts the
   applied ones and says when all are (the ``tokens`` table, kind KEY_CHANGE).
   It also fills in meters attached in the meantime (and ones whose ADD was rejected).
4. ``activate NEW_ID``: the new key is ACTIVE, the old one RETIRED.
5. Restart every backend: they load the key store at start-up and sign with the new key.
6. ``rotate --step revoke``: every meter gets REVOKE(old key), signed by the new key.

Running a step twice queues nothing twice: meters that already have a pending, sent or
applied key change for that key are skipped. ``plan-rotation`` prints the same messages
for a hand-run rotation without a database (you track message ids yourself).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import functools
import json
import os
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from backend.adapters.db.engine import Database
from backend.adapters.db.migrate import upgrade
from backend.config import ConfigError, load_config
from backend.errors import BackendError
from backend.keys import rotation
from backend.keys.errors import KeyStoreError
from backend.keys.rotation import MeterSlot, RotationPlan, RotationStep
from backend.keys.store import FileKeyStore, KeyState, utc_now
from backend.service.key_rotation import RotationReport, queue_rotation_step
from firmware_protocol.messages import U32_MAX

ENV_DIR: Final = "VOLTCREDIT_KEY_DIR"
DEFAULT_DIR: Final = Path("var/keys")
EXIT_FAIL: Final = 1
PROG: Final = "voltcredit keys"

EXAMPLES = """\
examples:
  voltcredit keys generate                        # first key: ACTIVE
  voltcredit keys show-public > trusted.txt       # for meters: meter-sim run --trusted-key
  voltcredit keys generate                        # rotation: a NEXT key
  voltcredit keys plan-rotation --meters meters.json    # step 1: ADD messages per meter
  voltcredit keys activate 2                      # step 2, once every meter applied step 1
  voltcredit keys plan-rotation --meters meters.json    # step 3: REVOKE (fresh msg ids)

meters.json: [{"meter_id": 1000001, "next_msg_id": 17}, ...]

rotation through the database (the backend's --config gives database url and keys.dir):
  voltcredit keys generate --dir /var/lib/voltcredit/keys              # NEXT key 2
  voltcredit keys rotate --step add --config /etc/voltcredit/backend.toml
  voltcredit keys rotate --step add --config ...   # again: shows what is not yet APPLIED
  voltcredit keys activate 2 --dir /var/lib/voltcredit/keys
  # restart every `voltcredit backend run` instance (they load the keys at start-up)
  voltcredit keys rotate --step revoke --config /etc/voltcredit/backend.toml
"""


class CliError(Exception):
    """A problem the operator can fix; printed without a traceback."""


def register(subparsers: Any) -> None:
    """Add ``keys`` to the root ``voltcredit`` command (entry-point plugin)."""
    parser = subparsers.add_parser(
        "keys",
        help="signing keys: generate, list, activate, show-public, rotate, plan-rotation",
        description=textwrap.dedent(__doc__ or ""),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--dir",
        type=Path,
        default=None,
        help=f"key store directory (default: ${ENV_DIR}, else {DEFAULT_DIR})",
    )
    sub = parser.add_subparsers(dest="keys_command", metavar="ACTION", required=True)

    p = sub.add_parser(
        "generate",
        parents=[common],
        help="make a new key: NEXT, or ACTIVE in an empty store (creates the directory)",
    )
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("list", parents=[common], help="every key with its state and times")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser(
        "activate",
        parents=[common],
        help="rotation step 2: make a NEXT key ACTIVE and retire the current one",
        description="Make a NEXT key ACTIVE; the ACTIVE key becomes RETIRED. Run it only "
        "once every meter has applied the ADD of this key (plan-rotation step 1): from "
        "now on every message is signed with it.",
    )
    p.add_argument("key_id", type=_key_id, metavar="KEY_ID")
    p.set_defaults(func=cmd_activate)

    p = sub.add_parser(
        "show-public",
        parents=[common],
        help="public keys as '<key id> <hex>' lines (default: the live ones meters trust)",
    )
    p.add_argument("key_ids", type=_key_id, nargs="*", metavar="KEY_ID")
    p.set_defaults(func=cmd_show_public)

    p = sub.add_parser(
        "plan-rotation",
        parents=[common],
        help="print the signed key-change message for each meter (step 1 ADD or 3 REVOKE)",
        description="Print, for each meter of --meters, the signed key-change message of "
        "one rotation step as hex, ready to deliver (e.g. `voltcredit meter-sim token HEX`). "
        "Step 1 (ADD the NEXT key, signed by the ACTIVE key) while a key is NEXT; step 3 "
        "(REVOKE the last retired key, signed by the ACTIVE key) after `activate`. Each "
        "meter's message uses its next_msg_id: mark that id used wherever you track it. "
        "This is the hand-run form; `rotate` is the database-driven one (it allocates the "
        "ids and queues the messages in the token outbox) and calls the same planner, "
        "backend.keys.rotation.",
    )
    p.add_argument(
        "--meters",
        type=Path,
        required=True,
        metavar="FILE",
        help='JSON list of {"meter_id": N, "next_msg_id": N}',
    )
    p.add_argument(
        "--step",
        choices=("auto", "add", "revoke"),
        default="auto",
        help="auto (default): add while a key is NEXT, else revoke",
    )
    p.add_argument(
        "--key", type=_key_id, metavar="KEY_ID", help="the key to add or revoke (default: newest)"
    )
    p.add_argument(
        "--validity-days",
        type=_days,
        default=rotation.DEFAULT_VALIDITY.days,
        metavar="DAYS",
        help="messages expire after this many days (default %(default)s)",
    )
    p.set_defaults(func=cmd_plan_rotation)

    p = sub.add_parser(
        "rotate",
        help="queue one rotation step's key-change message for every meter (database)",
        description="Queue, in the backend's token outbox, the signed key-change message "
        "of one rotation step for every meter of every tenant, under each meter's next "
        "message id; the dispatcher delivers them. --step add: ADD the NEXT key, signed "
        "by the ACTIVE key. --step revoke: REVOKE the last retired key, signed by the "
        "ACTIVE (new) key. Meters that already have a pending, sent or applied message of "
        "the step are skipped, so running a step again is safe and shows progress. "
        "Procedure: generate; rotate --step add; wait until every ADD token is APPLIED "
        "(rotate --step add again counts them and says when all are); activate NEW_ID; "
        "restart the backends; rotate --step revoke. The database is migrated to the "
        "code's schema first, as `voltcredit backend run` does.",
    )
    p.add_argument("--step", choices=("add", "revoke"), required=True)
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        help="the backend's TOML configuration (database url, keys.dir); "
        "else $VOLTCREDIT_CONFIG and VOLTCREDIT_* variables",
    )
    p.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="key store directory (default: the configuration's keys.dir)",
    )
    p.add_argument(
        "--validity-days",
        type=_days,
        default=rotation.DEFAULT_VALIDITY.days,
        metavar="DAYS",
        help="messages expire after this many days (default %(default)s)",
    )
    p.set_defaults(func=cmd_rotate)


# --------------------------------------------------------------------------- commands


def _command(body: Callable[[argparse.Namespace], None]) -> Callable[[argparse.Namespace], int]:
    """Run ``body``; a KeyStoreError or CliError is one line on stderr and exit code 1."""

    @functools.wraps(body)
    def run(args: argparse.Namespace) -> int:
        try:
            body(args)
        except (KeyStoreError, CliError) as exc:
            print(f"{PROG}: error: {exc}", file=sys.stderr)
            return EXIT_FAIL
        return 0

    return run


@_command
def cmd_generate(args: argparse.Namespace) -> None:
    """``keys generate``."""
    store = FileKeyStore(_directory(args), create=True)
    info = store.generate()
    print(f"generated key {info.key_id} ({info.state.value}) in {store.directory}")
    if info.state is KeyState.NEXT:
        print(
            f"next: deliver it to every meter (`{PROG} rotate --step add`), "
            f"then `{PROG} activate {info.key_id}`"
        )


@_command
def cmd_list(args: argparse.Namespace) -> None:
    """``keys list``."""
    store = FileKeyStore(_directory(args))
    infos = store.list()
    if not infos:
        print(f"no keys in {store.directory} (`{PROG} generate` makes one)")
        return
    print(f"{'KEY':>10}  {'STATE':<7}  {'CREATED':<25}  {'ACTIVATED':<25}  RETIRED")
    for i in infos:
        print(
            f"{i.key_id:>10}  {i.state.value:<7}  {_time(i.created_at):<25}  "
            f"{_time(i.activated_at):<25}  {_time(i.retired_at)}"
        )


@_command
def cmd_activate(args: argparse.Namespace) -> None:
    """``keys activate KEY_ID``."""
    store = FileKeyStore(_directory(args))
    previous = [i.key_id for i in store.list() if i.state is KeyState.ACTIVE]
    info = store.activate(args.key_id)
    print(f"key {info.key_id} is ACTIVE: every new message is signed with it")
    for key_id in previous:
        print(
            f"key {key_id} is RETIRED; restart the backends, then step 3: "
            f"`{PROG} rotate --step revoke` revokes it from the meters"
        )


@_command
def cmd_show_public(args: argparse.Namespace) -> None:
    """``keys show-public [KEY_ID ...]``: the lines ``meter-sim --trusted-key`` reads."""
    store = FileKeyStore(_directory(args))
    if args.key_ids:
        chosen = [store.info(k) for k in args.key_ids]
    else:
        chosen = [i for i in store.list() if i.live]
    for info in chosen:
        print(f"{info.key_id} {info.public_key.hex()}")


@_command
def cmd_plan_rotation(args: argparse.Namespace) -> None:
    """``keys plan-rotation --meters FILE``: one step's signed messages, per meter."""
    meters = read_meters(args.meters)
    store = FileKeyStore(_directory(args))
    now = utc_now()
    validity = dt.timedelta(days=args.validity_days)
    step: str = args.step
    if step == "auto" and args.key is not None:
        # A named key says which step it is in; an ACTIVE one gets plan_add's clear refusal.
        step = "revoke" if store.info(args.key).state is KeyState.RETIRED else "add"
    if step == "add":
        plan = rotation.plan_add(store, meters, now=now, validity=validity, key_id=args.key)
    elif step == "revoke":
        plan = rotation.plan_revoke(store, meters, now=now, validity=validity, key_id=args.key)
    else:
        plan = rotation.plan_rotation(store, meters, now=now, validity=validity)
    _print_plan(plan)


@_command
def cmd_rotate(args: argparse.Namespace) -> None:
    """``keys rotate --step add|revoke``: queue one step for every meter in the database."""
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        raise CliError(str(exc)) from exc
    url = make_url(config.database_url)
    if url.get_backend_name() == "sqlite" and not Path(url.database or "").is_file():
        # A rotation has no business creating an empty database: the URL is wrong.
        raise CliError(
            f"no SQLite database at {url.database!r} ({config.source}: database.url); "
            "rotate the meters of the backend's own database"
        )
    store = FileKeyStore(args.dir if args.dir is not None else config.key_dir)
    validity = dt.timedelta(days=args.validity_days)

    async def run() -> RotationReport:
        await upgrade(config.database_url)
        async with Database(config.database_url) as db:
            return await queue_rotation_step(
                db, store, step=args.step, now=utc_now(), validity=validity
            )

    try:
        report = asyncio.run(run())
    except (BackendError, SQLAlchemyError, OSError) as exc:
        # KeyStoreError is a BackendError too, but _command prints it the same way.
        raise CliError(str(exc)) from exc
    _print_report(report)


# --------------------------------------------------------------------------- helpers


def _print_report(report: RotationReport) -> None:
    verb = "ADD" if report.step is RotationStep.ADD else "REVOKE"
    print(
        f"key rotation {verb} of key {report.target_key_id}, signed by key "
        f"{report.signing_key_id}: queued {len(report.queued)} message(s), "
        f"{len(report.already_queued)} meter(s) already had one, {report.meters} meter(s) in all; "
        f"{len(report.applied)} applied"
    )
    if report.queued:
        print(f"valid from {_unix(report.issued_at)} until {_unix(report.expires_at)}")
    for meter_id, msg_id in report.queued:
        print(f"  meter {meter_id} msg_id {msg_id}")
    if report.complete:
        print(f"every meter has applied the {verb} of key {report.target_key_id}")
    if report.step is RotationStep.ADD:
        print(
            "next: once every ADD is applied (run this again to count), "
            f"`{PROG} activate {report.target_key_id}`, restart the backends, "
            f"then `{PROG} rotate --step revoke`"
        )


def read_meters(path: Path) -> list[MeterSlot]:
    """The --meters file: a JSON list of ``{"meter_id": N, "next_msg_id": N}``."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CliError(f"cannot read --meters file {path}: {exc.strerror}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CliError(f"--meters file {path} is not JSON: {exc}") from exc
    if not isinstance(doc, list):
        raise CliError(f"--meters file {path}: expected a JSON list of meters")
    slots = []
    for n, entry in enumerate(doc):
        if not isinstance(entry, dict) or set(entry) != {"meter_id", "next_msg_id"}:
            raise CliError(
                f"--meters file {path}: item {n} must be "
                '{"meter_id": N, "next_msg_id": N} and nothing else'
            )
        slots.append(MeterSlot(meter_id=entry["meter_id"], msg_id=entry["next_msg_id"]))
    return slots


def _print_plan(plan: RotationPlan) -> None:
    first = plan.messages[0].message.header if plan.messages else None
    if plan.step is RotationStep.ADD:
        print(
            f"# key rotation step 1 of 3 (ADD): meters learn key {plan.target_key_id}, "
            f"signed by the ACTIVE key {plan.signing_key_id}."
        )
        print(
            f"# next: once every meter has applied it, step 2: {PROG} activate "
            f"{plan.target_key_id}; then step 3: {PROG} plan-rotation (fresh msg ids)"
        )
    else:
        print(
            f"# key rotation step 3 of 3 (REVOKE): meters forget key {plan.target_key_id}, "
            f"signed by the ACTIVE key {plan.signing_key_id}."
        )
        print(
            f"# send only to meters that applied the ADD of key {plan.signing_key_id} "
            "(the others reject it as unknown_key and keep working)"
        )
    if first is not None:
        print(f"# valid from {_unix(first.issued_at)} until {_unix(first.expires_at)}")
    print("# meter_id msg_id message_hex")
    for m in plan.messages:
        print(f"{m.meter_id} {m.message.header.msg_id} {m.data.hex()}")


def _directory(args: argparse.Namespace) -> Path:
    if args.dir is not None:
        directory: Path = args.dir
        return directory
    return Path(os.environ.get(ENV_DIR) or DEFAULT_DIR)


def _key_id(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a key id: {text!r}") from None
    if not 1 <= value <= U32_MAX:
        raise argparse.ArgumentTypeError(f"a key id is 1..{U32_MAX}, got {value}")
    return value


def _days(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of days: {text!r}") from None
    if not 1 <= value <= 3650:
        raise argparse.ArgumentTypeError(f"validity is 1..3650 days, got {value}")
    return value


def _time(value: dt.datetime | None) -> str:
    return "-" if value is None else value.isoformat(timespec="seconds")


def _unix(seconds: int) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat()
