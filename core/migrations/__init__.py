"""Alembic migrations of the runs database, run by `core.db.init_db` (every open of the database, and
`python -m core db upgrade`) on its own connection, inside its lock, so concurrent openers migrate once.

A new revision is a file in versions/ with `revision`, `down_revision` (the previous head) and `upgrade()`.
It describes its tables with plain SQLAlchemy columns, never core.db's table classes: those are the newest
schema, not the one the revision starts from. tests/test_migrations.py checks that the head of the chain
equals core.db's tables on SQLite and on PostgreSQL.
"""
