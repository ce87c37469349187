"""Alembic migrations; run through `sessionsync db upgrade` or at daemon start."""
