"""Unit tests of the meter simulator's pure core."""
