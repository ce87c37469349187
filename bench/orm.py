"""The ORM mapping of sessionsync's tables, for the naive mirror the benchmarks measure against
(and the projects they register through it). The daemon itself uses Core only."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy.orm import DeclarativeBase

from sessionsync.models.tables import metadata, projects, sessions


class Base(DeclarativeBase):
    metadata = metadata


class Project(Base):
    __table__ = projects
    # The columns the benchmarks use, declared for the type checker only: the table maps them.
    if TYPE_CHECKING:
        from sqlalchemy.orm import Mapped

        id: Mapped[int]
        sessions_dir: Mapped[str]


class Session(Base):
    __table__ = sessions
    if TYPE_CHECKING:
        from sqlalchemy.orm import Mapped

        project_id: Mapped[int]
        slug: Mapped[str]
