"""Alembic's entry point: runs the revisions on the connection `core.db.init_db` hands over, inside its
transaction (so a failed upgrade changes nothing) and under its lock."""
from alembic import context

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("The runs database is upgraded by `python -m core db upgrade` (or by opening it from the "
                       "dashboard or a worker), not by the alembic command: it needs core.db's lock.")
context.configure(connection=connection)
with context.begin_transaction():
    context.run_migrations()
