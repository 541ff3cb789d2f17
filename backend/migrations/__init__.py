"""Alembic environment of the backend schema (run via ``backend.adapters.db.migrate``)."""
