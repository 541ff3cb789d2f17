"""The file key store: permissions like ssh, O_EXCL seeds, index/file agreement, life cycle."""

from __future__ import annotations

import datetime as dt
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from backend.errors import BackendError
from backend.keys.errors import (
    CorruptKeyStoreError,
    InsecureKeyStoreError,
    KeyStateError,
    KeyStoreError,
    KeyStoreNotFoundError,
    UnknownKeyIdError,
)
from backend.keys.store import (
    MAX_LIVE_KEYS,
    FileKeyStore,
    KeyInfo,
    KeyState,
    KeyStore,
    create_exclusive,
)
from firmware_protocol.messages import load_private_key, load_public_key

T0 = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)


class Clock:
    """Each call is one second after the previous one, starting at T0 + 1 s."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> dt.datetime:
        self.now += dt.timedelta(seconds=1)
        return self.now


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def kdir(tmp_path: Path) -> Path:
    return tmp_path / "keys"


@pytest.fixture
def store(kdir: Path, clock: Clock) -> FileKeyStore:
    """A store holding key 1 (ACTIVE) and key 2 (NEXT)."""
    s = FileKeyStore(kdir, create=True, clock=clock)
    s.generate()
    s.generate()
    return s


def reopen(kdir: Path) -> FileKeyStore:
    return FileKeyStore(kdir)


def index(kdir: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((kdir / "keys.json").read_text())
    return doc


def write_index(kdir: Path, doc: object) -> None:
    (kdir / "keys.json").write_text(json.dumps(doc))


# --------------------------------------------------------------------------- files and modes


def test_first_key_is_active_and_files_have_tight_modes(kdir: Path, clock: Clock) -> None:
    s = FileKeyStore(kdir, create=True, clock=clock)
    assert s.list() == []
    assert s.public_keys() == {}
    info = s.generate()
    assert info.key_id == 1
    assert info.state is KeyState.ACTIVE
    assert info.created_at == info.activated_at == T0 + dt.timedelta(seconds=1)
    assert info.retired_at is None
    assert mode(kdir) == 0o700
    assert mode(kdir / "key-1.seed") == 0o600
    assert mode(kdir / "keys.json") == 0o600
    assert mode(kdir / "key-1.pub") == 0o644
    seed = bytes.fromhex((kdir / "key-1.seed").read_text())
    signer = s.active_signer()
    assert signer.key_id == 1
    # The seed on disk is the key that signs, and the .pub line is what meter-sim reads.
    sig = signer.sign(b"hello")
    assert sig == load_private_key(seed).sign(b"hello")
    load_public_key(info.public_key).verify(sig, b"hello")
    assert (kdir / "key-1.pub").read_text() == f"1 {info.public_key.hex()}\n"
    assert index(kdir)["keys"] == [
        {
            "key_id": 1,
            "state": "ACTIVE",
            "created_at": "2026-06-01T12:00:01+00:00",
            "activated_at": "2026-06-01T12:00:01+00:00",
            "retired_at": None,
            "public_key": info.public_key.hex(),
        }
    ]


def test_modes_do_not_depend_on_a_permissive_umask(kdir: Path) -> None:
    old = os.umask(0)
    try:
        FileKeyStore(kdir, create=True).generate()
    finally:
        os.umask(old)
    assert mode(kdir) == 0o700
    assert mode(kdir / "key-1.seed") == 0o600
    assert mode(kdir / "keys.json") == 0o600


def test_create_makes_missing_parents(tmp_path: Path) -> None:
    FileKeyStore(tmp_path / "var" / "keys", create=True).generate()
    assert mode(tmp_path / "var" / "keys") == 0o700


def test_create_exclusive_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    create_exclusive(path, b"first", mode=0o600)
    with pytest.raises(FileExistsError):
        create_exclusive(path, b"second", mode=0o600)
    assert path.read_bytes() == b"first"
    assert mode(path) == 0o600


def test_create_exclusive_refuses_a_planted_symlink(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(b"untouched")
    (tmp_path / "key-9.seed").symlink_to(target)
    with pytest.raises(FileExistsError):
        create_exclusive(tmp_path / "key-9.seed", b"seed", mode=0o600)
    assert target.read_bytes() == b"untouched"


def test_generate_never_overwrites_a_seed_left_behind(store: FileKeyStore, kdir: Path) -> None:
    # An orphan seed with the next id (an interrupted generate, or planted): refuse loudly.
    (kdir / "key-3.seed").write_text("keep me\n")
    (kdir / "key-3.seed").chmod(0o600)
    with pytest.raises(CorruptKeyStoreError, match=r"key-3\.seed belongs to no key"):
        store.generate()
    assert (kdir / "key-3.seed").read_text() == "keep me\n"


def test_failed_index_write_leaves_no_orphan(store: FileKeyStore, kdir: Path) -> None:
    (kdir / "keys.json.tmp").mkdir()  # the temp index cannot be created
    with pytest.raises(KeyStoreError, match="cannot write key 3"):
        store.generate()
    (kdir / "keys.json.tmp").rmdir()
    assert not (kdir / "key-3.seed").exists()
    assert not (kdir / "key-3.pub").exists()
    assert [i.key_id for i in reopen(kdir).list()] == [1, 2]


def test_stale_temp_index_is_replaced(store: FileKeyStore, kdir: Path) -> None:
    (kdir / "keys.json.tmp").write_text("half a file")
    store.generate()
    assert not (kdir / "keys.json.tmp").exists()
    assert [i.key_id for i in reopen(kdir).list()] == [1, 2, 3]


def test_failed_activation_write_is_a_key_store_error(store: FileKeyStore, kdir: Path) -> None:
    (kdir / "keys.json.tmp").mkdir()
    with pytest.raises(KeyStoreError, match=r"cannot write .*keys\.json"):
        store.activate(2)
    (kdir / "keys.json.tmp").rmdir()
    assert reopen(kdir).active_signer().key_id == 1


# --------------------------------------------------------------------------- refusing to load


def test_missing_directory_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(KeyStoreNotFoundError, match="no key store at"):
        FileKeyStore(tmp_path / "nope")


def test_a_file_is_not_a_key_store(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(KeyStoreNotFoundError, match="not a directory"):
        FileKeyStore(tmp_path / "file")


def test_cannot_create_under_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(KeyStoreError, match="cannot create key directory"):
        FileKeyStore(tmp_path / "file" / "keys", create=True)


@pytest.mark.parametrize("bad", [0o750, 0o710, 0o701, 0o777], ids=oct)
def test_group_or_world_accessible_directory_is_refused(
    store: FileKeyStore, kdir: Path, bad: int
) -> None:
    kdir.chmod(bad)
    with pytest.raises(InsecureKeyStoreError, match=f"directory .* has mode {bad:04o}"):
        reopen(kdir)


@pytest.mark.parametrize("bad", [0o640, 0o604, 0o644, 0o660], ids=oct)
@pytest.mark.parametrize("key_id", [1, 2])
def test_group_or_world_readable_seed_is_refused(
    store: FileKeyStore, kdir: Path, bad: int, key_id: int
) -> None:
    (kdir / f"key-{key_id}.seed").chmod(bad)
    with pytest.raises(InsecureKeyStoreError, match=f"chmod 600 .*key-{key_id}.seed"):
        reopen(kdir)


def test_seed_of_another_user_is_refused(
    store: FileKeyStore, kdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.geteuid()
    monkeypatch.setattr(os, "geteuid", lambda: real + 1)
    with pytest.raises(InsecureKeyStoreError, match="owned by uid"):
        reopen(kdir)


def test_symlinked_seed_is_refused(store: FileKeyStore, kdir: Path) -> None:
    (kdir / "key-2.seed").rename(kdir / "real-seed")
    (kdir / "key-2.seed").symlink_to(kdir / "real-seed")
    with pytest.raises(InsecureKeyStoreError, match="not a regular file"):
        reopen(kdir)


def _drop(name: str) -> Callable[[Path], None]:
    return lambda kdir: (kdir / name).unlink()


def _write(name: str, text: str | bytes) -> Callable[[Path], None]:
    data = text if isinstance(text, bytes) else text.encode()

    def edit(kdir: Path) -> None:
        path = kdir / name
        path.unlink(missing_ok=True)
        create_exclusive(path, data, mode=0o600)

    return edit


def _swap_seeds(kdir: Path) -> None:
    a, b = (kdir / "key-1.seed").read_text(), (kdir / "key-2.seed").read_text()
    _write("key-1.seed", b)(kdir)
    _write("key-2.seed", a)(kdir)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_drop("keys.json"), r"key-1\.pub belongs to no key"),
        (_drop("key-2.seed"), r"key-2\.seed is missing: key 2 is NEXT"),
        (_drop("key-1.seed"), r"key-1\.seed is missing: key 1 is ACTIVE"),
        (_drop("key-1.pub"), r"key-1\.pub is missing"),
        (_write("key-1.pub", "1 " + "00" * 32 + "\n"), r"key-1\.pub does not hold"),
        (_write("key-2.pub", b"\xff"), r"cannot read .*key-2\.pub"),
        (_swap_seeds, r"key-1\.seed does not match the public key of key 1"),
        (_write("key-1.seed", "zz" * 32 + "\n"), "64 lowercase hex"),
        (_write("key-1.seed", "00" * 31 + "\n"), "64 lowercase hex"),
        (_write("key-1.seed", b"\xff"), r"cannot read .*key-1\.seed"),
        (_write("key-7.seed", "00" * 32 + "\n"), r"key-7\.seed belongs to no key"),
        (_write("key-7.pub", ""), r"key-7\.pub belongs to no key"),
        (_write("key-01.seed", ""), r"key-01\.seed: not a key file name"),
        (_write("keys.json", "{not json"), "not JSON"),
        (_write("keys.json", b"\xff"), "cannot read key store"),
    ],
)
def test_index_and_files_must_agree(
    store: FileKeyStore, kdir: Path, damage: Callable[[Path], None], message: str
) -> None:
    damage(kdir)
    with pytest.raises(CorruptKeyStoreError, match=message):
        reopen(kdir)


def _entry(doc: dict[str, Any], n: int = 0) -> dict[str, Any]:
    entry: dict[str, Any] = doc["keys"][n]
    return entry


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.pop("format"), "expected an object with 'format' and 'keys'"),
        (lambda d: d.update(format=2), "format 2, this build reads 1"),
        (lambda d: d.update(keys={}), "'keys' must be a list"),
        (lambda d: _entry(d).pop("state"), r"keys\[0\]: expected an object"),
        (lambda d: _entry(d).update(extra=1), r"keys\[0\]: expected an object"),
        (lambda d: _entry(d).update(state="SPARE"), "'SPARE' is not a valid KeyState"),
        (lambda d: _entry(d).update(key_id=True), "key_id must be 1.."),
        (lambda d: _entry(d).update(key_id=0), "key_id must be 1.."),
        (lambda d: _entry(d).update(key_id=2**32), "key_id must be 1.."),
        (lambda d: _entry(d, 1).update(key_id=1), "key id 1 appears twice"),
        (lambda d: _entry(d).update(created_at="2026-06-01T12:00:00"), "must carry a UTC offset"),
        (lambda d: _entry(d).update(created_at="yesterday"), "Invalid isoformat"),
        (lambda d: _entry(d).update(created_at=None), "created_at must be an ISO 8601 string"),
        (lambda d: _entry(d).update(public_key="AB" * 32), "64 lowercase hex"),
        (lambda d: _entry(d).update(public_key=None), "64 lowercase hex"),
        (lambda d: _entry(d, 1).update(activated_at=_entry(d)["created_at"]), "a NEXT key"),
        (lambda d: _entry(d).update(retired_at=_entry(d)["created_at"]), "an? ACTIVE key"),
        (
            lambda d: _entry(d, 1).update(state="ACTIVE", activated_at=_entry(d)["created_at"]),
            r"exactly one key must be ACTIVE, found \[1, 2\]",
        ),
        (
            lambda d: _entry(d).update(state="RETIRED", retired_at=_entry(d)["created_at"]),
            r"exactly one key must be ACTIVE, found \[\]",
        ),
    ],
)
def test_invalid_index_is_refused(
    store: FileKeyStore, kdir: Path, edit: Callable[[dict[str, Any]], object], message: str
) -> None:
    doc = index(kdir)
    edit(doc)
    write_index(kdir, doc)
    with pytest.raises(CorruptKeyStoreError, match=message):
        reopen(kdir)


def test_offsets_other_than_utc_are_normalised(store: FileKeyStore, kdir: Path) -> None:
    doc = index(kdir)
    _entry(doc)["created_at"] = "2026-06-01T14:00:01+02:00"
    write_index(kdir, doc)
    created = reopen(kdir).info(1).created_at
    assert created == T0 + dt.timedelta(seconds=1)
    assert created.tzinfo is dt.UTC


def test_key_info_checks_its_fields() -> None:
    with pytest.raises(ValueError, match="public_key must be 32 raw bytes"):
        KeyInfo(key_id=1, state=KeyState.NEXT, created_at=T0, public_key=b"short")
    with pytest.raises(TypeError, match="state must be a KeyState"):
        KeyInfo(key_id=1, state="NEXT", created_at=T0, public_key=bytes(32))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="created_at must be a datetime in UTC"):
        KeyInfo(
            key_id=1,
            state=KeyState.NEXT,
            created_at=dt.datetime(2026, 1, 1),  # noqa: DTZ001 - the naive value under test
            public_key=bytes(32),
        )


# --------------------------------------------------------------------------- life cycle


def test_generate_makes_next_keys_with_growing_ids(store: FileKeyStore) -> None:
    third = store.generate()
    assert third.key_id == 3
    assert third.state is KeyState.NEXT
    assert third.activated_at is None
    assert [(i.key_id, i.state) for i in store.list()] == [
        (1, KeyState.ACTIVE),
        (2, KeyState.NEXT),
        (3, KeyState.NEXT),
    ]
    assert store.active_signer().key_id == 1


def test_activate_switches_active_and_retires_the_old_key(
    store: FileKeyStore, kdir: Path, clock: Clock
) -> None:
    old_pub = store.info(1).public_key
    new = store.activate(2)
    when = clock.now
    assert new.state is KeyState.ACTIVE
    assert new.activated_at == when
    retired = store.info(1)
    assert retired.state is KeyState.RETIRED
    assert retired.retired_at == when
    assert retired.activated_at == T0 + dt.timedelta(seconds=1)
    assert retired.public_key == old_pub
    assert store.active_signer().key_id == 2
    # Persisted: a fresh load sees the same thing.
    assert reopen(kdir).list() == store.list()


def test_state_machine_refusals(store: FileKeyStore) -> None:
    with pytest.raises(KeyStateError, match="key 1 is ACTIVE: only a NEXT key"):
        store.activate(1)
    with pytest.raises(UnknownKeyIdError, match="no signing key with id 9") as info:
        store.activate(9)
    assert info.value.key_id == 9
    store.activate(2)
    with pytest.raises(KeyStateError, match="key 1 is RETIRED: only a NEXT key"):
        store.activate(1)
    with pytest.raises(KeyStateError, match="key 1 is RETIRED: retired keys sign nothing"):
        store.signer(1)
    with pytest.raises(UnknownKeyIdError):
        store.signer(9)
    # Ids are never reused, even after retirement.
    assert store.generate().key_id == 3


def test_signers_of_live_keys_sign_with_their_public_key(store: FileKeyStore) -> None:
    for key_id, raw in store.public_keys().items():
        signer = store.signer(key_id)
        assert signer.key_id == key_id
        load_public_key(raw).verify(signer.sign(b"proof"), b"proof")


def test_public_keys_are_the_live_keys(store: FileKeyStore) -> None:
    infos = {i.key_id: i for i in store.list()}
    assert store.public_keys() == {1: infos[1].public_key, 2: infos[2].public_key}
    store.generate()
    store.activate(3)
    assert sorted(store.public_keys()) == [2, 3]  # 1 is retired: not distributed any more


def test_at_most_four_live_keys(store: FileKeyStore) -> None:
    store.generate()
    store.generate()
    assert len(store.public_keys()) == MAX_LIVE_KEYS
    with pytest.raises(KeyStateError, match="a meter trusts at most 4"):
        store.generate()
    store.activate(4)  # retires 1
    assert store.generate().key_id == 5


def test_key_ids_are_u32(kdir: Path) -> None:
    s = FileKeyStore(kdir, create=True)
    pub = s.generate().public_key
    top = 2**32 - 1
    (kdir / "key-1.seed").rename(kdir / f"key-{top}.seed")
    (kdir / "key-1.pub").unlink()
    (kdir / f"key-{top}.pub").write_text(f"{top} {pub.hex()}\n")
    doc = index(kdir)
    _entry(doc)["key_id"] = top
    write_index(kdir, doc)
    with pytest.raises(KeyStateError, match="key ids are exhausted"):
        reopen(kdir).generate()


def test_empty_store_has_no_signer(kdir: Path) -> None:
    s = FileKeyStore(kdir, create=True)
    with pytest.raises(KeyStateError, match="has no key yet"):
        s.active_signer()


def test_loaded_keys_sign_identically(store: FileKeyStore, kdir: Path) -> None:
    # Ed25519 is deterministic (RFC 8032): same seed, same signature.
    again = reopen(kdir)
    assert again.list() == store.list()
    assert again.active_signer().sign(b"m") == store.active_signer().sign(b"m")
    assert again.signer(2).sign(b"m") == store.signer(2).sign(b"m")


def test_retired_seed_may_be_shredded(store: FileKeyStore, kdir: Path) -> None:
    store.activate(2)
    (kdir / "key-1.seed").unlink()
    again = reopen(kdir)
    assert again.info(1).state is KeyState.RETIRED
    assert again.active_signer().key_id == 2


def test_reload_sees_another_process_activate(store: FileKeyStore, kdir: Path) -> None:
    other = reopen(kdir)
    other.activate(2)
    assert store.active_signer().key_id == 1  # the running backend keeps its view...
    store.reload()
    assert store.active_signer().key_id == 2  # ...until it reloads
    assert store.info(1).state is KeyState.RETIRED


def test_mutations_start_from_the_disk_state(store: FileKeyStore, kdir: Path) -> None:
    # Another process generated key 3; this instance must not hand out 3 again.
    reopen(kdir).generate()
    assert store.generate().key_id == 4


def test_naive_clock_is_refused(kdir: Path) -> None:
    s = FileKeyStore(kdir, create=True, clock=lambda: dt.datetime(2026, 1, 1))  # noqa: DTZ001
    with pytest.raises(KeyStoreError, match="naive"):
        s.generate()
    assert s.list() == []


def test_errors_are_backend_errors() -> None:
    for exc in (CorruptKeyStoreError, InsecureKeyStoreError, KeyStateError, KeyStoreNotFoundError):
        assert issubclass(exc, KeyStoreError)
    assert issubclass(KeyStoreError, BackendError)
    assert issubclass(UnknownKeyIdError, KeyStoreError)


def test_file_store_is_a_key_store(store: FileKeyStore) -> None:
    as_protocol: KeyStore = store
    assert as_protocol.active_signer().key_id == 1


def test_path_through_a_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(KeyStoreError, match="cannot open key directory"):
        FileKeyStore(tmp_path / "file" / "keys")


def test_directory_removed_under_a_running_store(store: FileKeyStore, kdir: Path) -> None:
    for path in kdir.iterdir():
        path.unlink()
    kdir.rmdir()
    with pytest.raises(KeyStoreError, match="cannot open key directory"):
        store.generate()
