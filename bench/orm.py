"""The ORM mapping of sessionsync's tables, for the naive mirror the benchmarks measure against
(and the projects they register through it). The daemon itself uses Core only."""

from __future__ import annotations

from sqlalchemy.orm import DeclarativeBase

from sessionsync.models.tables import metadata, projects, sessions


class Base(DeclarativeBase):
    metadata = metadata


class Project(Base):
    __table__ = projects


class Session(Base):
    __table__ = sessions
