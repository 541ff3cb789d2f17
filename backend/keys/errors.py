"""Exceptions of signing-key management: its branch of the backend tree under ``BackendError``.

BackendError                          (backend/errors.py)
└── KeyStoreError                     signing-key management refused or failed at something
    ├── KeyStoreNotFoundError         no key store in that directory (and none was to be created)
    ├── InsecureKeyStoreError         the directory or a seed file is group/world-accessible,
    │                                 not ours, or not a plain file/directory (like ssh refuses)
    ├── CorruptKeyStoreError          keys.json unreadable or invalid, or it and the files disagree
    ├── UnknownKeyIdError             no key with that id in the store
    ├── KeyStateError                 the key's life-cycle state forbids the operation
    └── RotationError                 a rotation step cannot be planned from these inputs

All are the operator's or the caller's to fix (wrong permissions, wrong id, wrong order of
rotation steps); none is a peer's fault. ``OSError`` from the file system is translated at
the store boundary with ``raise … from exc``. An HTTP API would map ``UnknownKeyIdError`` to
404, ``KeyStateError`` and ``RotationError`` to 409, and the rest to 500 (a broken key store
is the operator's problem, not the client's).
"""

from __future__ import annotations

from backend.errors import BackendError


class KeyStoreError(BackendError):
    """Root of everything signing-key management refuses or fails at."""


class KeyStoreNotFoundError(KeyStoreError):
    """The directory holds no key store (and the caller did not ask to create one)."""


class InsecureKeyStoreError(KeyStoreError):
    """The directory or a seed file is readable by others: refuse to use it at all."""


class CorruptKeyStoreError(KeyStoreError):
    """``keys.json`` cannot be read or validated, or it and the key files disagree."""


class UnknownKeyIdError(KeyStoreError):
    """No key with this id exists in the store."""

    def __init__(self, key_id: int) -> None:
        super().__init__(f"no signing key with id {key_id}")
        self.key_id = key_id


class KeyStateError(KeyStoreError):
    """The key's life-cycle state forbids the operation (e.g. activate a retired key)."""


class RotationError(KeyStoreError):
    """A key-rotation step cannot be planned from the store's state and the given meters."""
