"""Meter drivers: one interface (``base.MeterDriver``), one module per wire protocol."""
