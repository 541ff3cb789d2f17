"""Signing keys in files with tight permissions, behind a ``KeyStore`` interface (DESIGN §7).

Life cycle of a key (one table; ``FileKeyStore`` enforces it)::

    generate()                      activate(id)               activate(another id)
    ──────────► NEXT ──────────────────────────► ACTIVE ─────────────────────────► RETIRED
    (the first key of an empty store is ACTIVE at once)

- ``ACTIVE``: exactly one once the store holds any key; every new credit token, tariff and
  key-change message is signed with it (:meth:`KeyStore.active_signer`).
- ``NEXT``: generated and being distributed to meters (a key-change ADD signed by the
  ACTIVE key, see :mod:`backend.keys.rotation`), and handed to newly commissioned meters
  with :meth:`KeyStore.public_keys`; it signs nothing yet.
- ``RETIRED``: signs nothing, no longer distributed, to be revoked from meters (a
  key-change REVOKE signed by the new ACTIVE key). A retired key never comes back and
  its id is never reused: key ids only grow.

At most four keys are live (ACTIVE + NEXT), because a meter trusts at most four
(SPEC.md §2.5): every live key must fit into every meter.

Files of a :class:`FileKeyStore` (the layout an operator backs up)::

    <directory>/            0700, owned by the backend's user
      keys.json             the index: per key its id, state, times (aware UTC, ISO 8601)
                            and public key; replaced atomically (temp + fsync + rename)
      key-<id>.seed         the 32-byte Ed25519 seed (SPEC.md §2.5) as 64 hex chars, 0600
      key-<id>.pub          "<id> <64 hex chars>", the line ``meter-sim --trusted-key`` reads

Like ssh with ``~/.ssh``, the store refuses to load when the directory or any seed file
is accessible by group or others or owned by another user, and when the index and the
files disagree (a missing, extra or mismatching file). The seed of a RETIRED key may be
shredded by the operator; its ``.pub`` stays. Seeds are created with
``O_CREAT | O_EXCL`` and mode 0600 in one system call, so there is never a moment where
a seed is readable by others and an existing file is never overwritten.

The store is synchronous file I/O: it is read once at start-up (and on :meth:`reload`)
and written only by the ``voltcredit keys`` CLI, never on the event loop's hot path.
Mutations hold an exclusive ``flock`` on the directory, so two CLIs cannot interleave.

**An HSM or KMS** implements :class:`KeyStore` without any of the above: key generation
happens inside the device (PKCS#11 ``C_GenerateKeyPair`` with
``CKM_EC_EDWARDS_KEY_PAIR_GEN``, private key ``CKA_SENSITIVE`` and not
``CKA_EXTRACTABLE``), ``public_keys()`` exports the 32 raw bytes from the public key
object's ``CKA_EC_POINT``, and ``active_signer()`` returns an object whose ``key_id`` is
our u32 id and whose ``sign(data)`` runs ``C_SignInit(CKM_EDDSA)`` + ``C_Sign`` over the
message bytes on the private-key handle found by ``CKA_ID``. It must be *pure* Ed25519
(RFC 8032 §5.1, no pre-hash, no context): that is what meters verify. A cloud KMS fits
the same shape when it offers pure Ed25519 signing over raw bytes. The life-cycle states
(this file's ``keys.json``) can then live in the database; nothing else changes.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import datetime as dt
import enum
import fcntl
import json
import os
import re
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from backend.keys.errors import (
    CorruptKeyStoreError,
    InsecureKeyStoreError,
    KeyStateError,
    KeyStoreError,
    KeyStoreNotFoundError,
    UnknownKeyIdError,
)
from firmware_protocol.messages import (
    PUBLIC_KEY_LEN,
    U32_MAX,
    Ed25519Signer,
    Signer,
    load_private_key,
)

#: A meter trusts at most this many keys (SPEC.md §2.5), so at most this many are live.
MAX_LIVE_KEYS: Final = 4
INDEX_NAME: Final = "keys.json"
INDEX_FORMAT: Final = 1
SEED_MODE: Final = 0o600
PUB_MODE: Final = 0o644  # public by definition; the 0700 directory still fences it
DIR_MODE: Final = 0o700
_KEY_FILE = re.compile(r"key-(?P<id>[1-9][0-9]{0,9})\.(?P<kind>seed|pub)")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_ENTRY_FIELDS: Final = frozenset(
    {"key_id", "state", "created_at", "activated_at", "retired_at", "public_key"}
)


class KeyState(enum.Enum):
    """Where a key is in its life cycle (see the module docstring)."""

    ACTIVE = "ACTIVE"
    NEXT = "NEXT"
    RETIRED = "RETIRED"


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """What the index says about one key: never the private part."""

    key_id: int
    state: KeyState
    created_at: dt.datetime
    public_key: bytes
    activated_at: dt.datetime | None = None
    retired_at: dt.datetime | None = None

    def __post_init__(self) -> None:
        if type(self.key_id) is not int or not 1 <= self.key_id <= U32_MAX:
            raise ValueError(f"key_id must be 1..{U32_MAX}, got {self.key_id!r}")
        if not isinstance(self.state, KeyState):
            raise TypeError(f"state must be a KeyState, got {self.state!r}")
        if type(self.public_key) is not bytes or len(self.public_key) != PUBLIC_KEY_LEN:
            raise ValueError("public_key must be 32 raw bytes")
        for name in ("created_at", "activated_at", "retired_at"):
            value = getattr(self, name)
            if (value is not None or name == "created_at") and (
                not isinstance(value, dt.datetime) or value.tzinfo is not dt.UTC
            ):
                raise ValueError(f"{name} must be a datetime in UTC, got {value!r}")
        # The times say which transitions happened; they must match the state.
        expected = {
            KeyState.NEXT: (False, False),
            KeyState.ACTIVE: (True, False),
            KeyState.RETIRED: (True, True),
        }[self.state]
        if (self.activated_at is not None, self.retired_at is not None) != expected:
            raise ValueError(
                f"a {self.state.value} key has activated_at "
                f"{'set' if expected[0] else 'empty'} and retired_at "
                f"{'set' if expected[1] else 'empty'}"
            )

    @property
    def live(self) -> bool:
        """True for keys meters must trust (ACTIVE and NEXT)."""
        return self.state is not KeyState.RETIRED


class KeyStore(Protocol):
    """Where the backend gets its signers and the public keys meters must trust."""

    def active_signer(self) -> Signer:
        """The signer of the ACTIVE key: sign every new message with it."""
        ...

    def signer(self, key_id: int) -> Signer:
        """The signer of a live (ACTIVE or NEXT) key, e.g. to prove possession before use."""
        ...

    def public_keys(self) -> dict[int, bytes]:
        """Raw public keys of every live key, by id: what a meter must trust."""
        ...

    def list(self) -> builtins.list[KeyInfo]:
        """Every key, retired ones too, by ascending id."""
        ...


def utc_now() -> dt.datetime:
    """The wall clock as an aware UTC datetime (the store's default clock)."""
    return dt.datetime.now(dt.UTC)


def create_exclusive(path: Path, data: bytes, *, mode: int) -> None:
    """Create ``path`` with ``mode`` and write ``data``; never touches an existing file.

    ``O_CREAT | O_EXCL`` creates the file with its final permissions in the same system
    call (the umask can only narrow them), so no other user can ever open it, and raises
    ``FileExistsError`` rather than overwrite. ``O_NOFOLLOW`` refuses a planted symlink.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class _Snapshot:
    """The validated content of the store at one moment."""

    infos: tuple[KeyInfo, ...]
    signers: dict[int, Ed25519Signer]  # live keys and retired keys whose seed is kept


class FileKeyStore:
    """A :class:`KeyStore` in a directory of key files (see the module docstring).

    Construction loads and validates everything, so a misconfigured store fails at
    start-up, not at the first top-up. ``create=True`` makes the directory (mode 0700)
    when it does not exist; otherwise a missing directory is
    :class:`KeyStoreNotFoundError`.
    """

    def __init__(
        self,
        directory: Path,
        *,
        create: bool = False,
        clock: Callable[[], dt.datetime] = utc_now,
    ) -> None:
        self._dir = Path(directory)
        self._clock = clock
        if create and not self._dir.exists():
            try:
                self._dir.parent.mkdir(parents=True, exist_ok=True)
                self._dir.mkdir(mode=DIR_MODE)
            except OSError as exc:
                raise KeyStoreError(
                    f"cannot create key directory {self._dir}: {exc.strerror}"
                ) from exc
        self._snap = self._load()

    @property
    def directory(self) -> Path:
        """Where the key files live."""
        return self._dir

    # ------------------------------------------------------------------ KeyStore

    def active_signer(self) -> Signer:
        """The signer of the ACTIVE key; :class:`KeyStateError` while the store is empty."""
        for info in self._snap.infos:
            if info.state is KeyState.ACTIVE:
                return self._snap.signers[info.key_id]
        raise KeyStateError(f"key store {self._dir} has no key yet: run `voltcredit keys generate`")

    def signer(self, key_id: int) -> Signer:
        """The signer of a live key; a RETIRED key signs nothing."""
        info = self.info(key_id)
        if not info.live:
            raise KeyStateError(f"key {key_id} is RETIRED: retired keys sign nothing")
        return self._snap.signers[key_id]

    def public_keys(self) -> dict[int, bytes]:
        """Raw public keys of the live keys (ACTIVE and NEXT), by id."""
        return {i.key_id: i.public_key for i in self._snap.infos if i.live}

    def list(self) -> builtins.list[KeyInfo]:
        """Every key, by ascending id."""
        return builtins.list(self._snap.infos)

    # ------------------------------------------------------------------ management

    def info(self, key_id: int) -> KeyInfo:
        """The index entry of one key; :class:`UnknownKeyIdError` if there is none."""
        for info in self._snap.infos:
            if info.key_id == key_id:
                return info
        raise UnknownKeyIdError(key_id)

    def reload(self) -> None:
        """Re-read and re-validate the directory (after another process changed it)."""
        self._snap = self._load()

    def generate(self) -> KeyInfo:
        """Make a new key: ACTIVE if the store is empty, else NEXT. Its id is the highest + 1."""
        with self._locked():
            snap = self._load()
            live = [i for i in snap.infos if i.live]
            if len(live) >= MAX_LIVE_KEYS:
                raise KeyStateError(
                    f"already {len(live)} live keys and a meter trusts at most {MAX_LIVE_KEYS} "
                    "(SPEC.md §2.5): activate one of the NEXT keys first"
                )
            key_id = max((i.key_id for i in snap.infos), default=0) + 1
            if key_id > U32_MAX:
                raise KeyStateError("key ids are exhausted (u32)")
            now = self._now()
            private = Ed25519PrivateKey.generate()
            signer = Ed25519Signer(key_id, private)
            info = KeyInfo(
                key_id=key_id,
                state=KeyState.NEXT if live else KeyState.ACTIVE,
                created_at=now,
                public_key=signer.public_key_bytes(),
                activated_at=None if live else now,
            )
            seed = private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
            written: builtins.list[Path] = []
            try:
                for path, data, mode in (
                    (self._seed_path(key_id), f"{seed.hex()}\n", SEED_MODE),
                    (self._pub_path(key_id), _pub_line(info), PUB_MODE),
                ):
                    create_exclusive(path, data.encode("ascii"), mode=mode)
                    written.append(path)
                self._write_index((*snap.infos, info))
            except OSError as exc:
                # Leave no orphan behind: the next load would (rightly) refuse it.
                for path in written:
                    with contextlib.suppress(OSError):
                        path.unlink()
                raise KeyStoreError(f"cannot write key {key_id} to {self._dir}: {exc}") from exc
            try:
                self._fsync_dir()  # the index now names the key: never unlink its files
            except OSError as exc:
                raise KeyStoreError(f"cannot sync key directory {self._dir}: {exc}") from exc
            self._snap = _Snapshot((*snap.infos, info), {**snap.signers, key_id: signer})
        return info

    def activate(self, key_id: int) -> KeyInfo:
        """Make a NEXT key ACTIVE; the previous ACTIVE key becomes RETIRED (rotation step 2).

        Only do this once every meter trusts the NEXT key (see
        :mod:`backend.keys.rotation`): from now on every message is signed with it.
        """
        with self._locked():
            snap = self._load()
            target = next((i for i in snap.infos if i.key_id == key_id), None)
            if target is None:
                raise UnknownKeyIdError(key_id)
            if target.state is not KeyState.NEXT:
                raise KeyStateError(
                    f"key {key_id} is {target.state.value}: only a NEXT key can be activated"
                )
            now = self._now()
            infos = tuple(_after_activation(i, key_id, now) for i in snap.infos)
            try:
                self._write_index(infos)
                self._fsync_dir()
            except OSError as exc:
                raise KeyStoreError(f"cannot write {self._dir / INDEX_NAME}: {exc}") from exc
            self._snap = _Snapshot(infos, snap.signers)
        return next(i for i in infos if i.key_id == key_id)

    # ------------------------------------------------------------------ files

    def _now(self) -> dt.datetime:
        now = self._clock()
        if now.utcoffset() is None:
            raise KeyStoreError("the key store's clock returned a naive datetime")
        return now.astimezone(dt.UTC)

    def _seed_path(self, key_id: int) -> Path:
        return self._dir / f"key-{key_id}.seed"

    def _pub_path(self, key_id: int) -> Path:
        return self._dir / f"key-{key_id}.pub"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Exclusive advisory lock on the directory for a read-modify-write."""
        try:
            fd = os.open(self._dir, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise KeyStoreError(f"cannot open key directory {self._dir}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def _write_index(self, infos: tuple[KeyInfo, ...]) -> None:
        """Replace keys.json atomically: a crash leaves the old or the new index, whole."""
        doc = {"format": INDEX_FORMAT, "keys": [_entry_to_json(i) for i in infos]}
        tmp = self._dir / f"{INDEX_NAME}.tmp"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()  # left over from a crash mid-write; never the live index
        create_exclusive(tmp, (json.dumps(doc, indent=2) + "\n").encode("ascii"), mode=SEED_MODE)
        tmp.replace(self._dir / INDEX_NAME)

    def _fsync_dir(self) -> None:
        """Make the new files and the index rename durable (fsync the directory entry)."""
        fd = os.open(self._dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _load(self) -> _Snapshot:
        self._check_directory()
        try:
            names = {p.name for p in self._dir.iterdir()}
            text = (
                (self._dir / INDEX_NAME).read_text(encoding="utf-8")
                if INDEX_NAME in names
                else None
            )
        except (OSError, UnicodeDecodeError) as exc:
            raise CorruptKeyStoreError(f"cannot read key store {self._dir}: {exc}") from exc
        infos = () if text is None else _parse_index(text, self._dir / INDEX_NAME)
        known = {i.key_id for i in infos}
        for name in sorted(names):
            match = _KEY_FILE.fullmatch(name)
            if match is None:
                if name.startswith("key-"):
                    raise CorruptKeyStoreError(f"{self._dir / name}: not a key file name")
                continue
            if int(match["id"]) not in known:
                raise CorruptKeyStoreError(
                    f"{self._dir / name} belongs to no key in {INDEX_NAME} "
                    "(left over from an interrupted generate?): move it away and retry"
                )
        signers: dict[int, Ed25519Signer] = {}
        for info in infos:
            self._check_pub(info)
            signer = self._load_seed(info)
            if signer is not None:
                signers[info.key_id] = signer
        return _Snapshot(infos, signers)

    def _check_directory(self) -> None:
        try:
            st = self._dir.stat()
        except FileNotFoundError:
            raise KeyStoreNotFoundError(
                f"no key store at {self._dir} (`voltcredit keys generate --dir {self._dir}` "
                "creates one)"
            ) from None
        except OSError as exc:
            raise KeyStoreError(f"cannot open key directory {self._dir}: {exc.strerror}") from exc
        if not stat.S_ISDIR(st.st_mode):
            raise KeyStoreNotFoundError(f"{self._dir} is not a directory")
        _check_private(self._dir, st, "directory", DIR_MODE)

    def _check_pub(self, info: KeyInfo) -> None:
        path = self._pub_path(info.key_id)
        try:
            text = path.read_text(encoding="ascii")
        except FileNotFoundError:
            raise CorruptKeyStoreError(
                f"{path} is missing (key {info.key_id} is in the index)"
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise CorruptKeyStoreError(f"cannot read {path}: {exc}") from exc
        if text != _pub_line(info):
            raise CorruptKeyStoreError(f"{path} does not hold the public key of the index")

    def _load_seed(self, info: KeyInfo) -> Ed25519Signer | None:
        path = self._seed_path(info.key_id)
        try:
            st = path.lstat()
        except FileNotFoundError:
            if info.live:
                raise CorruptKeyStoreError(
                    f"{path} is missing: key {info.key_id} is {info.state.value}"
                ) from None
            return None  # a retired key's seed may have been shredded on purpose
        except OSError as exc:
            raise CorruptKeyStoreError(f"cannot inspect {path}: {exc.strerror}") from exc
        if not stat.S_ISREG(st.st_mode):
            raise InsecureKeyStoreError(f"{path} is not a regular file (a symlink?)")
        _check_private(path, st, "seed file", SEED_MODE)
        try:
            text = path.read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as exc:
            raise CorruptKeyStoreError(f"cannot read {path}: {exc}") from exc
        hex_seed = text.removesuffix("\n")
        if _HEX64.fullmatch(hex_seed) is None:
            raise CorruptKeyStoreError(f"{path}: expected 64 lowercase hex characters")
        signer = Ed25519Signer(info.key_id, load_private_key(bytes.fromhex(hex_seed)))
        if signer.public_key_bytes() != info.public_key:
            raise CorruptKeyStoreError(
                f"{path} does not match the public key of key {info.key_id} in {INDEX_NAME}"
            )
        return signer


def _after_activation(info: KeyInfo, key_id: int, now: dt.datetime) -> KeyInfo:
    """One entry after ``activate(key_id)``: the target ACTIVE, the old ACTIVE RETIRED."""
    if info.key_id == key_id:
        return dataclasses.replace(info, state=KeyState.ACTIVE, activated_at=now)
    if info.state is KeyState.ACTIVE:
        return dataclasses.replace(info, state=KeyState.RETIRED, retired_at=now)
    return info


def _check_private(path: Path, st: os.stat_result, what: str, wanted: int) -> None:
    """Refuse, like ssh's StrictModes, what others could read or that is not ours."""
    if st.st_uid != os.geteuid():
        raise InsecureKeyStoreError(
            f"{what} {path} is owned by uid {st.st_uid}, not by this user ({os.geteuid()})"
        )
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise InsecureKeyStoreError(
            f"{what} {path} has mode {stat.S_IMODE(st.st_mode):04o}: group/others must have "
            f"no access (chmod {wanted:o} {path})"
        )


def _pub_line(info: KeyInfo) -> str:
    return f"{info.key_id} {info.public_key.hex()}\n"


def _time_to_json(value: dt.datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _entry_to_json(info: KeyInfo) -> dict[str, Any]:
    return {
        "key_id": info.key_id,
        "state": info.state.value,
        "created_at": _time_to_json(info.created_at),
        "activated_at": _time_to_json(info.activated_at),
        "retired_at": _time_to_json(info.retired_at),
        "public_key": info.public_key.hex(),
    }


def _parse_index(text: str, path: Path) -> tuple[KeyInfo, ...]:
    """keys.json → validated entries by ascending id; anything off is CorruptKeyStoreError."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CorruptKeyStoreError(f"{path}: not JSON ({exc})") from exc
    if not isinstance(doc, dict) or set(doc) != {"format", "keys"}:
        raise CorruptKeyStoreError(f"{path}: expected an object with 'format' and 'keys'")
    if doc["format"] != INDEX_FORMAT:
        raise CorruptKeyStoreError(f"{path}: format {doc['format']!r}, this build reads 1")
    if not isinstance(doc["keys"], builtins.list):
        raise CorruptKeyStoreError(f"{path}: 'keys' must be a list")
    infos: dict[int, KeyInfo] = {}
    for n, entry in enumerate(doc["keys"]):
        info = _parse_entry(entry, f"{path}: keys[{n}]")
        if info.key_id in infos:
            raise CorruptKeyStoreError(f"{path}: key id {info.key_id} appears twice")
        infos[info.key_id] = info
    active = [i.key_id for i in infos.values() if i.state is KeyState.ACTIVE]
    if infos and len(active) != 1:
        raise CorruptKeyStoreError(f"{path}: exactly one key must be ACTIVE, found {active}")
    return tuple(infos[k] for k in sorted(infos))


def _parse_entry(entry: object, where: str) -> KeyInfo:
    if not isinstance(entry, dict) or set(entry) != _ENTRY_FIELDS:
        raise CorruptKeyStoreError(f"{where}: expected an object with {sorted(_ENTRY_FIELDS)}")
    try:
        return KeyInfo(
            key_id=entry["key_id"],
            state=KeyState(entry["state"]),
            created_at=_parse_time(entry["created_at"], "created_at"),
            activated_at=_parse_optional_time(entry["activated_at"], "activated_at"),
            retired_at=_parse_optional_time(entry["retired_at"], "retired_at"),
            public_key=_parse_public(entry["public_key"]),
        )
    except (ValueError, TypeError) as exc:
        raise CorruptKeyStoreError(f"{where}: {exc}") from exc


def _parse_public(value: object) -> bytes:
    if not isinstance(value, str) or _HEX64.fullmatch(value) is None:
        raise ValueError(f"public_key must be 64 lowercase hex characters, got {value!r}")
    return bytes.fromhex(value)


def _parse_optional_time(value: object, name: str) -> dt.datetime | None:
    return None if value is None else _parse_time(value, name)


def _parse_time(value: object, name: str) -> dt.datetime:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be an ISO 8601 string, got {value!r}")
    parsed = dt.datetime.fromisoformat(value)
    if parsed.utcoffset() is None:
        raise ValueError(f"{name} must carry a UTC offset, got {value!r}")
    return parsed.astimezone(dt.UTC)
