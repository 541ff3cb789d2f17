"""Exception tree of the backend: every refusal a use case can raise, translated at the edges.

BackendError                         root: anything the backend refuses or fails at
├── LedgerError                      the double-entry ledger refused an operation
│   ├── InvalidAccountError          an account spec that breaks the rules (id, currency, limit)
│   ├── InvalidTransferError         a transfer or batch that breaks the rules (amount, ids, group)
│   │   └── BalanceOverflowError     posting would overflow a 64-bit posted total
│   ├── AccountNotFoundError         a transfer names an account that does not exist
│   ├── LedgerMismatchError          transfer and account currencies differ
│   ├── LimitExceededError           the debit would take an account below its min_balance
│   └── IdempotencyConflictError     an id already used with different content
├── IngestError                      consumption ingest (backend/domain/consumption.py)
├── SplitError                       revenue split rules (backend/domain/split.py)
├── PaymentError                     payments (backend/payments/errors.py draws its subtree)
├── KeyStoreError                    signing keys (backend/keys/errors.py draws its subtree)
└── StorageError                     the database failed or was used wrongly (our fault)
    └── WriteTransactionRequiredError  a ledger write outside ``Database.write()``

Lower layers' exceptions (SQLAlchemy, asyncpg, sqlite3) are translated at the adapter
boundary with ``raise … from exc``. The HTTP API maps this tree to status codes
in one middleware: ``LedgerError`` subclasses are the caller's fault (4xx: 404 for
``AccountNotFoundError``, 409 for ``IdempotencyConflictError``, 422 for the rest),
``StorageError`` is ours (5xx). Later subsystems (payments, tokens, ingest) add their
branches under ``BackendError`` and to this drawing.
"""

from __future__ import annotations


class BackendError(Exception):
    """Root of everything the backend refuses or fails at."""


class LedgerError(BackendError):
    """The ledger refused an operation; nothing was changed."""


class InvalidAccountError(LedgerError):
    """An account spec that breaks the rules (id range, currency code, limit sign)."""


class InvalidTransferError(LedgerError):
    """A transfer or batch that breaks the rules (amount, ids, linked group, reference)."""


class BalanceOverflowError(InvalidTransferError):
    """Posting would overflow an account's 64-bit debits or credits total."""


class AccountNotFoundError(LedgerError):
    """A transfer names an account id that does not exist."""

    def __init__(self, account_ids: frozenset[int]) -> None:
        super().__init__(f"no such ledger account(s): {sorted(account_ids)}")
        self.account_ids = account_ids


class LedgerMismatchError(LedgerError):
    """A transfer's currency differs from one of its accounts' currencies."""


class LimitExceededError(LedgerError):
    """A debit would take an account's balance below its ``min_balance``."""

    def __init__(self, *, account_id: int, balance_after: int, min_balance: int) -> None:
        super().__init__(
            f"account {account_id}: balance would be {balance_after}, below its limit {min_balance}"
        )
        self.account_id = account_id
        self.balance_after = balance_after
        self.min_balance = min_balance


class IdempotencyConflictError(LedgerError):
    """An id (transfer, account or linked group) already used with different content."""


class StorageError(BackendError):
    """The database failed, or was used in a way the adapter does not allow (our fault)."""


class WriteTransactionRequiredError(StorageError):
    """A ledger write was attempted in a session not opened by ``Database.write()``."""
