"""voltcredit's byte-exact contract between meters, gateways and the backend (pure, no I/O).

Modules: :mod:`units` (integer money/energy), :mod:`tariff` (tariff model),
:mod:`rating` (the one rating function), :mod:`messages` (signed credit, tariff and
key-change messages), :mod:`replay` (anti-replay window), :mod:`status` (token outcome
codes), :mod:`mqtt` (topics and payload codecs), :mod:`modbus_map` (the meter's
register map), :mod:`vectors` (known-answer test vectors). See ``SPEC.md``.
"""
