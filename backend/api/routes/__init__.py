"""Route modules of the HTTP API; each holds one ``routes`` table (see :mod:`backend.api`)."""
