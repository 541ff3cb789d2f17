"""voltcredit backend: customers, ledger, payments, tokens, ingest, API (issues 5 and 6)."""
