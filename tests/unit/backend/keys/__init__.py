"""Unit tests of signing-key management (backend.keys)."""
