"""Pure backend rules: ledger, pricing, split, token issuance policy (no I/O, no clock)."""
