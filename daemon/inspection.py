"""Inspect one session folder: stat, skip, read, hash, parse, map -> the change to write (or nothing).

Pure with respect to the database: it compares the folder with what the store says it last
mirrored (`Known`) and returns a `Change`. Never writes to the project, never follows a
symbolic link, never reads past `max_state_bytes`.

A live sync runs on a key's first event, so it can read a state.json that an in-place writer is
still writing (a writer that closes the file between parts sends an event per close). Such a file
does not parse; if it was also modified less than the settle time ago, it is not recorded invalid
but reported `Verdict.UNSETTLED`, and the caller must look again once the settle time has passed
(the live path hands the key back to the debouncer, whose quiet period is the settle time). On that
second look the same file is older than the settle time and is recorded invalid if it still does
not parse; if it changed meanwhile, its own events bring it in. So a file that is only ever
half-written for a moment raises no `invalid` / `recovered` pair, a truly broken file is still
recorded within the quiet period, and the final content is never missed.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any, NamedTuple

from sessionsync.models.keys import SessionKey
from sessionsync.models.state import InvalidStateError, MappedState, decode_document, map_state

STATE_FILE = "state.json"
SPEC_FILE = "spec.md"
PLAN_FILE = "plan.json"

# A file modified this recently may change again within the same mtime tick without its
# (size, mtime) changing ("racy git"); such a stat is not trusted for skipping next time.
RACY_WINDOW_NS = 1_000_000_000


class Known(NamedTuple):
    """What the database holds for a session, as far as the skip checks and events need it.

    A tuple of plain values, so that it is built straight from a result row and, holding no
    containers, drops out of the garbage collector's view: a reconcile keeps one per session."""

    id: int
    state_size: int | None
    state_mtime_ns: int | None
    state_hash: str | None
    spec_exists: bool
    plan_exists: bool
    deleted: bool
    invalid: bool
    current_phase: str | None
    status: str | None
    dir_mtime_ns: int | None


@dataclass(frozen=True, slots=True)
class Probe:
    """The cheap facts about a session folder: its state.json stat and which artifacts exist."""

    size: int
    mtime_ns: int | None  # None: too recent to trust for skipping (see RACY_WINDOW_NS)
    spec_exists: bool
    plan_exists: bool
    # The folder's own mtime, which moves whenever an entry is added, removed or renamed: while it
    # stands, spec.md and plan.json are as they were and need no check. None when too recent.
    dir_mtime_ns: int | None
    read_mtime_ns: int = 0  # mtime of the state.json read (0: not read), for the latency metric


class Action(Enum):
    WRITE = "write"  # content changed (or first seen, restored, turned invalid / valid)
    TOUCH = "touch"  # stat changed but the content hash is the same: remember the new stat
    TOMBSTONE = "tombstone"  # the session folder or its state.json is gone


@dataclass(frozen=True, slots=True)
class Change:
    key: SessionKey
    action: Action
    probe: Probe | None = None
    state_hash: str | None = None
    mapped: MappedState | None = None  # None with WRITE means invalid
    raw_state: dict[str, Any] | None = None
    error: str | None = None  # why invalid, or which fields had the wrong type

    @property
    def invalid(self) -> bool:
        return self.action is Action.WRITE and self.mapped is None


@dataclass(frozen=True, slots=True)
class Retry:
    """The folder could not be looked at for a reason that is not its own (the process is out of
    file descriptors or memory, a call was interrupted): nothing is recorded, look again later."""

    reason: str


# Errors of the moment and of this process or machine, never of the file: retried, not recorded.
TRANSIENT_ERRNOS = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS, errno.EINTR, errno.EAGAIN, errno.ETIMEDOUT}
)


def _own(exc: OSError) -> OSError:
    """`exc` when it is the file's own fault; a transient error (TRANSIENT_ERRNOS) is raised again."""
    if exc.errno in TRANSIENT_ERRNOS:
        raise exc
    return exc


class Verdict(Enum):
    """Why inspect() returned no change, for reconcile summaries."""

    UNCHANGED = "unchanged"
    NO_STATE = "no_state"  # folder without state.json, and no live row to tombstone
    GONE = "gone"  # folder absent, and no live row
    UNSETTLED = "unsettled"  # does not parse but was just modified: may be half-written, look again
    # A folder on the way (the sessions folder) may not be searched: the project's fault, not the
    # session's. Nothing is recorded; the project is reconciled, which skips it until it can be.
    UNLISTED = "unlisted"


def inspect(
    key: SessionKey, sessions_dir: str, known: Known | None, max_bytes: int, settle_ns: int = 0
) -> Change | Verdict | Retry:
    """Decide what one session needs, reading state.json only when its stat says it changed.

    With `settle_ns`, a state.json that does not parse and was modified less than that long ago is
    `Verdict.UNSETTLED` rather than invalid (see the module docstring); 0 records it at once.

    An unchanged session costs two lstat calls (folder and state.json): the folder's mtime stands
    in for checking spec.md and plan.json.

    A session invalid for a reason with no content to hash (a link, a FIFO, an unreadable file)
    is keyed by that reason instead, so it is written, logged and evented once, not on every
    pass; the checks themselves run every time, so a fix is seen at once.

    An error that is not the folder's own (`TRANSIENT_ERRNOS`: out of file descriptors or memory)
    records nothing: it is `Retry`, and the caller looks again later."""
    try:
        outcome = _inspect(key, sessions_dir, known, max_bytes, settle_ns)
    except OSError as exc:
        if exc.errno not in TRANSIENT_ERRNOS:
            raise
        return Retry(f"cannot read {sessions_dir}/{key.slug}: {exc.strerror or exc}")
    if isinstance(outcome, Change) and outcome.invalid and outcome.state_hash is None and outcome.error:
        digest = "reason:" + hashlib.blake2b(outcome.error.encode(), digest_size=16).hexdigest()
        if known is not None and not known.deleted and known.invalid and known.state_hash == digest:
            return Verdict.UNCHANGED
        outcome = replace(outcome, state_hash=digest)
    return outcome


def _inspect(
    key: SessionKey, sessions_dir: str, known: Known | None, max_bytes: int, settle_ns: int
) -> Change | Verdict:
    # Plain concatenation (sessions_dir is normalised): os.path.join costs as much as an lstat here.
    folder = f"{sessions_dir}/{key.slug}"
    live = known is not None and not known.deleted
    try:
        st = os.lstat(folder)
    except FileNotFoundError:
        return Change(key, Action.TOMBSTONE) if live else Verdict.GONE
    except PermissionError:
        # lstat needs only search permission on the folders above: the sessions folder's mode.
        return Verdict.UNLISTED
    except OSError as exc:
        return _invalid(key, None, f"cannot read session folder {folder}: {_own(exc).strerror}")
    if stat.S_ISLNK(st.st_mode):
        target = os.readlink(folder)
        return _invalid(key, None, f"session folder is a symbolic link to {target}; links are not followed")
    if not stat.S_ISDIR(st.st_mode):
        return Change(key, Action.TOMBSTONE) if live else Verdict.GONE

    state_path = f"{folder}/{STATE_FILE}"
    try:
        state_st = os.lstat(state_path)
    except FileNotFoundError:
        return Change(key, Action.TOMBSTONE) if live else Verdict.NO_STATE
    except OSError as exc:
        return _invalid(key, None, f"cannot stat {state_path}: {_own(exc).strerror}")
    if stat.S_ISLNK(state_st.st_mode):
        return _invalid(key, None, "state.json is a symbolic link; links are not followed")
    if not stat.S_ISREG(state_st.st_mode):
        return _invalid(key, None, "state.json is not a regular file")

    dir_mtime = _trusted_mtime(st.st_mtime_ns)
    same_state = (
        live
        and known is not None
        and known.state_mtime_ns == state_st.st_mtime_ns
        and known.state_size == state_st.st_size
    )
    if live and known is not None and _same_stat(st, state_st, known, time.time_ns()):
        return Verdict.UNCHANGED
    spec = os.path.exists(f"{folder}/{SPEC_FILE}")
    plan = os.path.exists(f"{folder}/{PLAN_FILE}")
    if same_state and known is not None and (known.spec_exists, known.plan_exists) == (spec, plan):
        if dir_mtime is None or dir_mtime == known.dir_mtime_ns:
            return Verdict.UNCHANGED
        # Only the folder moved (a scratch file came or went): remember it, so the next pass is cheap.
        probe = Probe(state_st.st_size, known.state_mtime_ns, spec, plan, dir_mtime)
        return Change(key, Action.TOUCH, probe, known.state_hash)

    try:
        data, size, mtime_ns = _read_limited(state_path, max_bytes)
    except OSError as exc:
        # No probe is kept, so the next event or reconcile tries again.
        return _invalid(key, None, f"cannot read state.json: {_own(exc).strerror or exc}")
    probe = Probe(size, _trusted_mtime(mtime_ns), spec, plan, dir_mtime, mtime_ns)
    if size > max_bytes:
        digest = f"oversize:{size}:{mtime_ns}"
        if live and known is not None and known.state_hash == digest:
            return Change(key, Action.TOUCH, probe, digest)
        return _invalid(
            key, probe, f"state.json is {size} bytes, over max_state_bytes ({max_bytes}); not read", digest
        )

    digest = hashlib.blake2b(data, digest_size=16).hexdigest()
    if (
        live
        and known is not None
        and known.state_hash == digest
        and (known.spec_exists, known.plan_exists) == (spec, plan)
    ):
        return Change(key, Action.TOUCH, probe, digest)
    try:
        document = decode_document(data)
    except InvalidStateError as exc:
        if _settling(mtime_ns, settle_ns):
            return Verdict.UNSETTLED
        return _invalid(key, probe, exc.reason, digest)
    mapped = map_state(document)
    error = "; ".join(mapped.field_errors) or None
    return Change(key, Action.WRITE, probe, digest, mapped, document, error)


# A session's row as far as `not_unchanged` compares it: the driver's own row of
# `Store.stats_by_project`'s query, (project_id, slug, state_size, state_mtime_ns, dir_mtime_ns,
# deleted). A plain tuple read by position: a reconcile reads one per session.
Stat = tuple[int, str, int | None, int | None, int | None, bool]


def not_unchanged(sessions_fd: int, slugs: Iterable[str], rows: Mapping[str, Stat], now_ns: int) -> list[str]:
    """The slugs of the sessions folder open as `sessions_fd` that two lstat calls cannot vouch for:
    those without a row, with a deleted row, or whose folder and state.json are not as the row
    says (`_same_stat`'s comparison: what makes `inspect` return `Verdict.UNCHANGED`). A reconcile
    skips the others without the rest of the inspection. Names are resolved from the open folder
    (most of an lstat by full path is walking the path). Any doubt (an error, a link, a type)
    keeps the slug: `inspect` then decides, and says why. One loop for a whole folder, the check
    written out in it: a reconcile runs it once per session."""
    todo: list[str] = []
    keep = todo.append
    lstat, is_dir, is_reg = os.lstat, stat.S_ISDIR, stat.S_ISREG
    state_name = f"/{STATE_FILE}"
    for slug in slugs:
        row = rows.get(slug)
        if row is None or row[5]:
            keep(slug)
            continue
        try:
            st = lstat(slug, dir_fd=sessions_fd)
            state_st = lstat(slug + state_name, dir_fd=sessions_fd)
        except OSError:
            keep(slug)
            continue
        if not (
            is_dir(st.st_mode)
            and is_reg(state_st.st_mode)
            and state_st.st_mtime_ns == row[3]
            and state_st.st_size == row[2]
            and st.st_mtime_ns == row[4]
            and now_ns - st.st_mtime_ns >= RACY_WINDOW_NS
        ):
            keep(slug)
    return todo


def to_inspect(sessions_dir: str, slugs: list[str], rows: Mapping[str, Stat]) -> list[str]:
    """The listed session folders of `sessions_dir` that `not_unchanged` does not vouch for: all of
    them when the sessions folder cannot be opened (the inspection then says why)."""
    if not rows:
        return list(slugs)
    try:
        fd = os.open(sessions_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return list(slugs)
    try:
        return not_unchanged(fd, slugs, rows, time.time_ns())
    finally:
        os.close(fd)


def gone(rows: Mapping[str, Stat], slugs: list[str]) -> list[str]:
    """The live rows whose session folder is not among `slugs`: to be tombstoned."""
    # row[5]: deleted; the set difference runs in C.
    return [slug for slug in rows.keys() - slugs if not rows[slug][5]]


def _same_stat(st: os.stat_result, state_st: os.stat_result, row: Known, now_ns: int) -> bool:
    """The folder and its state.json stat as the row recorded them, the folder's mtime old enough
    to trust (RACY_WINDOW_NS): spec.md and plan.json are then as they were, and so is the file.
    `not_unchanged` writes the same comparison out in its loop: change both or neither."""
    return (
        state_st.st_mtime_ns == row.state_mtime_ns
        and state_st.st_size == row.state_size
        and st.st_mtime_ns == row.dir_mtime_ns
        and now_ns - st.st_mtime_ns >= RACY_WINDOW_NS
    )


def _invalid(key: SessionKey, probe: Probe | None, reason: str, digest: str | None = None) -> Change:
    return Change(key, Action.WRITE, probe, digest, None, None, reason)


def _read_limited(path: str, max_bytes: int) -> tuple[bytes, int, int]:
    """Read at most max_bytes + 1 bytes without following a link; stat the open file first."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, "state.json is a symbolic link; links are not followed") from None
        raise
    try:
        # The stat before the read: should the file change in between, the mtime kept is older
        # than the content read, and the next pass reads it again (never the other way round).
        st = os.fstat(fd)
        chunks = []
        remaining = max_bytes + 1
        # os.read allocates what it is asked for: the first read asks for the file's size (and one
        # byte more, to see it end), the others for 64 KiB, not a megabyte per call.
        step = st.st_size + 1
        while remaining > 0:
            chunk = os.read(fd, min(remaining, step))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
            step = 1 << 16
    finally:
        os.close(fd)
    return b"".join(chunks), max(st.st_size, max_bytes + 1 - remaining), st.st_mtime_ns


def _settling(mtime_ns: int, settle_ns: int) -> bool:
    """Whether a file modified at `mtime_ns` may still be being written. An mtime in the future
    (a clock set back, a copied timestamp) counts as settled: otherwise it could defer forever."""
    age = time.time_ns() - mtime_ns
    return 0 <= age < settle_ns


def _trusted_mtime(mtime_ns: int) -> int | None:
    return None if time.time_ns() - mtime_ns < RACY_WINDOW_NS else mtime_ns
