"""Adapters: SQLAlchemy repositories, MQTT, payment providers (the backend's I/O edges)."""
