"""Alembic migrations; run through `sessionsync db upgrade` or at daemon start."""

# The newest revision, so that a start-up finding the schema there needs no Alembic at all
# (daemon/migrate.py). tests/test_store.py holds it to Alembic's own head: a new migration
# updates it.
HEAD = "0005"
