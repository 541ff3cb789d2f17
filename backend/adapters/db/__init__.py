"""SQLAlchemy 2 async persistence: engine, declarative base, tables, repositories, migrations."""
