"""Unit tests of the payment provider layer."""
