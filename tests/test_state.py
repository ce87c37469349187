"""The state.json contract: the example documents mirror as the README says, and every bad input
either maps with its bad fields named or is refused with a one-line reason."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from sessionsync.models.state import (
    DEFAULT_ARTIFACTS,
    MAX_DEPTH,
    InvalidStateError,
    MappedState,
    decode_document,
    map_state,
)

FIXTURES = Path(__file__).parent / "fixtures" / "state-json"


def example(name: str) -> dict[str, Any]:
    return decode_document((FIXTURES / name).read_bytes())


def reason(raw: bytes) -> str:
    with pytest.raises(InvalidStateError) as caught:
        decode_document(raw)
    assert "\n" not in caught.value.reason
    return caught.value.reason


def v2_with(**changes: Any) -> dict[str, Any]:
    doc = example("v2-build.json")
    doc.update(changes)
    return doc


def v1_with(**changes: Any) -> dict[str, Any]:
    doc = example("v1-build.json")
    doc.update(changes)
    return doc


# --- the examples -------------------------------------------------------------------------------


def test_v1_build_mirrors_as_the_readme_says() -> None:
    state = map_state(example("v1-build.json"))

    assert state.columns() == {
        "schema_version": 1,
        "session_id": "2025-12-11_billing-export",
        "title": "Billing CSV export",
        "description": "Monthly CSV export of invoices",
        "session_type": "full",
        "status": "active",
        "current_phase": "build",
        "phase_history": {
            "spec_started_at": "2025-12-11T08:00:00+00:00",
            "spec_completed_at": "2025-12-11T09:30:00+00:00",
            "plan_started_at": "2025-12-11T09:31:00+00:00",
            "plan_completed_at": "2025-12-11T11:00:00+00:00",
            "build_started_at": "2025-12-12T09:00:00+00:00",
            "build_completed_at": None,
            "docs_started_at": None,
            "docs_completed_at": None,
        },
        "git_branch": None,
        "git_worktree": None,
        "git_base_branch": None,
        "checkpoints_total": 5,
        "checkpoints_completed": 2,
        "checkpoints_completed_list": [1, 2],
        "current_checkpoint": 3,
        "commits": [
            {
                "sha": "1a2b3c4",
                "message": "feat: invoice query",
                "checkpoint": 1,
                "created_at": "2025-12-12T11:00:00+00:00",
            },
            {
                "sha": "5d6e7f8",
                "message": "feat: csv writer",
                "checkpoint": 2,
                "created_at": "2025-12-12T15:10:00+00:00",
            },
        ],
        "artifacts": {"spec": "spec.md", "plan": "plan.json", "plan_readable": "plan.md"},
        "created_at": datetime(2025, 12, 11, 8, 0, tzinfo=UTC),
        "updated_at": datetime(2025, 12, 12, 17, 30, tzinfo=UTC),
    }
    assert state.field_errors == ()


def test_v2_build_mirrors_as_the_readme_says() -> None:
    state = map_state(example("v2-build.json"))

    assert state.columns() == {
        "schema_version": 2,
        "session_id": "2026-02-20_search-index",
        "title": "Search index rebuild",
        "description": "Move the search index to incremental updates",
        "session_type": "full",
        "status": "active",
        "current_phase": "build",
        "phase_history": {
            "spec_started_at": "2026-02-20T13:00:00+00:00",
            "spec_completed_at": "2026-02-20T14:10:00+00:00",
            "plan_started_at": "2026-02-20T14:12:00+00:00",
            "plan_completed_at": "2026-02-20T15:03:00+00:00",
            "build_started_at": "2026-02-21T08:30:00+00:00",
            "build_completed_at": None,
            "docs_started_at": None,
            "docs_completed_at": None,
        },
        "git_branch": "feature/incremental-index",
        "git_worktree": "/home/dev/code/shop-wt/incremental-index",
        "git_base_branch": "main",
        "checkpoints_total": 6,
        "checkpoints_completed": 4,
        "checkpoints_completed_list": [1, 2, 3, 4],
        "current_checkpoint": 5,
        "commits": [
            {
                "sha": "9f1c2e4",
                "message": "feat: index writer interface",
                "checkpoint": 1,
                "created_at": "2026-02-21T09:02:11+00:00",
            },
            {
                "sha": "4b7d001",
                "message": "feat: delta log",
                "checkpoint": 2,
                "created_at": "2026-02-21T10:40:57+00:00",
            },
            {
                "sha": "c03aa9e",
                "message": "feat: merge deltas on read",
                "checkpoint": 3,
                "created_at": "2026-02-21T13:15:30+00:00",
            },
            {
                "sha": "e5e5f10",
                "message": "test: delta compaction",
                "checkpoint": 4,
                "created_at": "2026-02-21T16:20:02+00:00",
            },
        ],
        "artifacts": {"spec": "spec.md", "plan": "plan.json", "plan_readable": "plan.md"},
        "created_at": datetime(2026, 2, 20, 13, 0, tzinfo=UTC),
        "updated_at": datetime(2026, 2, 21, 16, 22, 10, tzinfo=UTC),
    }
    assert state.field_errors == ()


def test_v2_complete_quick_mirrors_as_the_readme_says() -> None:
    state = map_state(example("v2-complete-quick.json"))

    assert state.schema_version == 2
    assert state.session_id == "2026-01-08_fix-flaky-upload-test"
    assert state.title == "Fix flaky upload test"
    assert state.description is None
    assert state.session_type == "quick"
    assert state.status == "complete"
    assert state.current_phase == "complete"
    assert state.phase_history == {
        "spec_started_at": None,
        "spec_completed_at": None,
        "plan_started_at": "2026-01-08T10:00:00Z",
        "plan_completed_at": "2026-01-08T10:05:00Z",
        "build_started_at": "2026-01-08T10:05:30Z",
        "build_completed_at": "2026-01-08T10:45:00Z",
        "docs_started_at": "2026-01-08T10:45:10Z",
        "docs_completed_at": "2026-01-08T10:52:00Z",
    }
    assert (state.git_branch, state.git_worktree, state.git_base_branch) == (
        "fix/upload-test",
        None,
        "develop",
    )
    assert (state.checkpoints_total, state.checkpoints_completed, state.current_checkpoint) == (1, 1, None)
    assert state.checkpoints_completed_list == [1]
    assert state.commits == [
        {
            "sha": "77aa0b1",
            "message": "fix: wait for upload ack",
            "checkpoint": 1,
            "created_at": "2026-01-08T10:44:00Z",
        }
    ]
    assert state.artifacts == DEFAULT_ARTIFACTS
    assert state.created_at == datetime(2026, 1, 8, 10, 0, tzinfo=UTC)
    assert state.updated_at == datetime(2026, 1, 8, 10, 52, tzinfo=UTC)
    assert state.field_errors == ()


def test_v2_spec_mirrors_as_the_readme_says() -> None:
    state = map_state(example("v2-spec.json"))

    assert state.schema_version == 2
    assert state.session_id == "2026-03-02_auth-token-refresh"
    assert state.title == "Auth token refresh"
    assert state.description == "Refresh expired OAuth tokens without logging the user out"
    assert (state.session_type, state.status, state.current_phase) == ("full", "active", "spec")
    assert state.phase_history == {
        "spec_started_at": "2026-03-02T09:14:05.120000+00:00",
        "spec_completed_at": None,
        "plan_started_at": None,
        "plan_completed_at": None,
        "build_started_at": None,
        "build_completed_at": None,
        "docs_started_at": None,
        "docs_completed_at": None,
    }
    assert (state.git_branch, state.git_worktree, state.git_base_branch) == (
        "feature/token-refresh",
        None,
        "main",
    )
    # checkpoints_total is null in the file: the README maps null to 0.
    assert (state.checkpoints_total, state.checkpoints_completed, state.current_checkpoint) == (0, 0, None)
    assert state.checkpoints_completed_list == []
    assert state.commits == []
    assert state.artifacts == DEFAULT_ARTIFACTS
    assert state.created_at == datetime(2026, 3, 2, 9, 14, 5, 120000, tzinfo=UTC)
    assert state.updated_at == datetime(2026, 3, 2, 9, 41, 52, 4000, tzinfo=UTC)
    assert state.field_errors == ()


def test_unknown_fields_stay_in_the_decoded_document() -> None:
    assert example("v2-build.json")["agent_notes"] == "extra fields like this one must survive in raw_state"
    assert example("v1-build.json")["goals"] == {"high_level": ["Finance can download invoices monthly"]}


def test_columns_are_every_field_but_field_errors() -> None:
    state = map_state(example("v2-build.json"))

    assert set(state.columns()) == set(MappedState._fields) - {"field_errors"}


# --- generation and defaults --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("doc", "version"),
    [
        ({"phase_history": None}, 2),
        ({"build_progress": {}}, 2),
        ({"phase_history": "not an object"}, 2),
        ({"phases": {}}, 1),
        ({}, 1),
    ],
)
def test_generation_is_v2_when_phase_history_or_build_progress_is_present(
    doc: dict[str, Any], version: int
) -> None:
    assert map_state(doc).schema_version == version


def test_an_empty_v2_document_takes_the_defaults() -> None:
    state = map_state({"build_progress": None})

    assert state.columns() == {
        "schema_version": 2,
        "session_id": None,
        "title": None,
        "description": None,
        "session_type": "full",
        "status": "active",
        "current_phase": "spec",
        "phase_history": None,
        "git_branch": None,
        "git_worktree": None,
        "git_base_branch": None,
        "checkpoints_total": 0,
        "checkpoints_completed": 0,
        "checkpoints_completed_list": [],
        "current_checkpoint": None,
        "commits": None,
        "artifacts": DEFAULT_ARTIFACTS,
        "created_at": None,
        "updated_at": None,
    }
    assert state.field_errors == ()


def test_an_empty_v1_document_takes_the_defaults() -> None:
    state = map_state({})

    assert (state.schema_version, state.session_type, state.status, state.current_phase) == (
        1,
        "full",
        "active",
        "spec",
    )
    assert state.phase_history == dict.fromkeys(
        [
            "spec_started_at",
            "spec_completed_at",
            "plan_started_at",
            "plan_completed_at",
            "build_started_at",
            "build_completed_at",
            "docs_started_at",
            "docs_completed_at",
        ]
    )
    assert (state.checkpoints_total, state.checkpoints_completed, state.checkpoints_completed_list) == (
        0,
        0,
        [],
    )
    assert state.artifacts == DEFAULT_ARTIFACTS
    assert state.field_errors == ()


def test_v1_status_is_always_active_and_v1_artifacts_the_default() -> None:
    state = map_state(v1_with(status="failed", artifacts={"spec": "other.md"}))

    assert state.status == "active"
    assert state.artifacts == DEFAULT_ARTIFACTS


def test_v1_session_type_comes_from_granularity() -> None:
    assert map_state(v1_with(granularity="quick")).session_type == "quick"


def test_default_artifacts_are_a_fresh_copy_each_time() -> None:
    artifacts = map_state({}).artifacts
    assert artifacts is not None
    artifacts["spec"] = "changed.md"

    assert map_state({}).artifacts == {"spec": "spec.md", "plan": "plan.json", "plan_readable": "plan.md"}


def test_commits_are_normalised_to_four_keys() -> None:
    commits = [{"sha": "abc", "author": "bot", "files": ["a.py"]}, {"checkpoint_id": 7}]

    state = map_state(v2_with(commits=commits))

    assert state.commits == [
        {"sha": "abc", "message": None, "checkpoint": None, "created_at": None},
        {"sha": None, "message": None, "checkpoint": 7, "created_at": None},
    ]


@pytest.mark.parametrize(("status", "phase"), [("paused-by-human", "review"), ("", ""), ("ACTIVE", "Build")])
def test_unknown_status_and_phase_strings_are_kept(status: str, phase: str) -> None:
    state = map_state(v2_with(status=status, current_phase=phase))

    assert (state.status, state.current_phase) == (status, phase)
    assert state.field_errors == ()


def test_session_id_is_stored_as_given() -> None:
    assert map_state(v2_with(session_id="not-the-folder-name")).session_id == "not-the-folder-name"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-02-20T13:00:00Z", datetime(2026, 2, 20, 13, 0, tzinfo=UTC)),
        ("2026-02-20T15:30:00+02:30", datetime(2026, 2, 20, 13, 0, tzinfo=UTC)),
        ("2026-02-20T08:00:00-05:00", datetime(2026, 2, 20, 13, 0, tzinfo=UTC)),
        ("2026-02-20T13:00:00", datetime(2026, 2, 20, 13, 0, tzinfo=UTC)),
        ("2026-02-20T13:00:00.250000Z", datetime(2026, 2, 20, 13, 0, 0, 250000, tzinfo=UTC)),
    ],
)
def test_timestamps_come_back_aware_in_utc(text: str, expected: datetime) -> None:
    state = map_state(v2_with(created_at=text, updated_at=text))

    assert state.created_at == expected
    assert state.updated_at == expected
    assert state.created_at is not None
    assert state.created_at.utcoffset() is not None
    assert state.created_at.tzinfo == UTC


# --- fields of the wrong type -------------------------------------------------------------------

GOOD_V2 = map_state(example("v2-build.json")).columns()
GOOD_V1 = map_state(example("v1-build.json")).columns()


def replaced(name: str, path: tuple[str | int, ...], value: Any) -> dict[str, Any]:
    """The example `name` with the value at `path` replaced."""
    doc = example(name)
    parent: Any = doc
    for step in path[:-1]:
        parent = parent[step]
    parent[path[-1]] = value
    return doc


PROGRESS = ("checkpoints_total", "checkpoints_completed", "checkpoints_completed_list", "current_checkpoint")


@pytest.mark.parametrize(
    ("path", "value", "nulled", "message"),
    [
        (
            ("build_progress", "checkpoints_total"),
            "lots",
            {"checkpoints_total"},
            "build_progress.checkpoints_total: expected an integer, got 'lots'",
        ),
        (
            ("build_progress", "checkpoints_total"),
            True,
            {"checkpoints_total"},
            "build_progress.checkpoints_total: expected an integer, got true",
        ),
        (
            ("build_progress", "checkpoints_total"),
            6.0,
            {"checkpoints_total"},
            "build_progress.checkpoints_total: expected an integer, got 6.0",
        ),
        (
            ("build_progress", "checkpoints_total"),
            2**40,
            {"checkpoints_total"},
            "build_progress.checkpoints_total: expected an integer that fits in 32 bits, got 1099511627776",
        ),
        (
            ("build_progress", "checkpoints_completed"),
            {},
            {"checkpoints_completed", "checkpoints_completed_list"},
            "build_progress.checkpoints_completed: expected a list, got an object",
        ),
        (
            ("build_progress", "current_checkpoint"),
            "5",
            {"current_checkpoint"},
            "build_progress.current_checkpoint: expected an integer, got '5'",
        ),
        (("build_progress",), [6, [1, 2]], set(PROGRESS), "build_progress: expected an object, got a list"),
        (
            ("git",),
            "main",
            {"git_branch", "git_worktree", "git_base_branch"},
            "git: expected an object, got 'main'",
        ),
        (("git", "branch"), ["a"], {"git_branch"}, "git.branch: expected a string, got a list"),
        (("commits",), {}, {"commits"}, "commits: expected a list, got an object"),
        (("commits", 1), "b", {"commits"}, "commits[1]: expected an object, got 'b'"),
        (
            ("commits", 0, "checkpoint"),
            "one",
            {"commits"},
            "commits[0].checkpoint: expected an integer, got 'one'",
        ),
        (("topic",), 42, {"title"}, "topic: expected a string, got 42"),
        (("session_id",), 2026, {"session_id"}, "session_id: expected a string, got 2026"),
        (("description",), False, {"description"}, "description: expected a string, got false"),
        (("status",), 1, {"status"}, "status: expected a string, got 1"),
        (("session_type",), {}, {"session_type"}, "session_type: expected a string, got an object"),
        (("phase_history",), [], {"phase_history"}, "phase_history: expected an object, got a list"),
        (("artifacts",), "spec.md", {"artifacts"}, "artifacts: expected an object, got 'spec.md'"),
        (
            ("created_at",),
            "yesterday",
            {"created_at"},
            "created_at: expected an ISO 8601 timestamp, got 'yesterday'",
        ),
        (
            ("updated_at",),
            1767225600,
            {"updated_at"},
            "updated_at: expected an ISO 8601 timestamp, got 1767225600",
        ),
        (
            ("updated_at",),
            "0001-01-01T00:00:00+05:00",
            {"updated_at"},
            "updated_at: expected an ISO 8601 timestamp, got '0001-01-01T00:00:00+05:00'",
        ),
    ],
)
def test_a_v2_field_of_the_wrong_type_nulls_only_its_own_columns(
    path: tuple[str | int, ...], value: Any, nulled: set[str], message: str
) -> None:
    state = map_state(replaced("v2-build.json", path, value))
    columns = state.columns()

    # A wrong type is NULL, never the default; every other column is mapped as before.
    assert {name for name in columns if columns[name] != GOOD_V2[name]} == nulled
    assert {name: value for name, value in columns.items() if name in nulled} == dict.fromkeys(nulled)
    assert state.field_errors == (message,)


@pytest.mark.parametrize(
    ("path", "value", "nulled", "message"),
    [
        (
            ("plan_state", "checkpoints_total"),
            "lots",
            {"checkpoints_total"},
            "plan_state.checkpoints_total: expected an integer, got 'lots'",
        ),
        (("plan_state",), "in progress", set(PROGRESS), "plan_state: expected an object, got 'in progress'"),
        (("phases",), [], {"phase_history"}, "phases: expected an object, got a list"),
        (("phases", "spec"), "done", {"phase_history"}, "phases.spec: expected an object, got 'done'"),
        (
            ("phases", "build", "started_at"),
            20251212,
            {"phase_history"},
            "phases.build.started_at: expected a string, got 20251212",
        ),
        (("commits",), {}, {"commits"}, "commits: expected a list, got an object"),
        (
            ("commits", 0, "checkpoint_id"),
            "1",
            {"commits"},
            "commits[0].checkpoint_id: expected an integer, got '1'",
        ),
        (("granularity",), 3, {"session_type"}, "granularity: expected a string, got 3"),
        (
            ("created_at",),
            "12/11/2025",
            {"created_at"},
            "created_at: expected an ISO 8601 timestamp, got '12/11/2025'",
        ),
    ],
)
def test_a_v1_field_of_the_wrong_type_nulls_only_its_own_columns(
    path: tuple[str | int, ...], value: Any, nulled: set[str], message: str
) -> None:
    state = map_state(replaced("v1-build.json", path, value))
    columns = state.columns()

    assert {name for name in columns if columns[name] != GOOD_V1[name]} == nulled
    assert {name: value for name, value in columns.items() if name in nulled} == dict.fromkeys(nulled)
    assert state.field_errors == (message,)


@pytest.mark.parametrize(
    ("field", "default"),
    [
        ("session_type", "full"),
        ("status", "active"),
        ("current_phase", "spec"),
        ("artifacts", DEFAULT_ARTIFACTS),
    ],
)
def test_null_takes_the_default_and_is_not_an_error(field: str, default: Any) -> None:
    state = map_state(replaced("v2-complete-quick.json", (field,), None))

    assert state.columns()[field] == default
    assert state.field_errors == ()


def test_every_bad_field_is_named_once() -> None:
    doc = v2_with(
        topic=["x"],
        git=7,
        commits=[1, 2, 3],
        build_progress={"checkpoints_total": "6", "checkpoints_completed": "1,2", "current_checkpoint": 5},
    )

    state = map_state(doc)

    assert state.field_errors == (
        "topic: expected a string, got a list",
        "build_progress.checkpoints_total: expected an integer, got '6'",
        "build_progress.checkpoints_completed: expected a list, got '1,2'",
        "git: expected an object, got 7",
        "commits[0]: expected an object, got 1",
    )
    assert (state.title, state.git_branch, state.commits, state.checkpoints_completed) == (
        None,
        None,
        None,
        None,
    )
    assert (state.current_checkpoint, state.status, state.session_id) == (
        5,
        "active",
        "2026-02-20_search-index",
    )


def test_a_long_bad_value_is_cut_short_in_the_message() -> None:
    state = map_state(v2_with(created_at="x" * 500))

    (message,) = state.field_errors
    assert len(message) < 120
    assert message.endswith("...")


@pytest.mark.parametrize(
    "doc",
    [
        {"phase_history": 1, "build_progress": 2, "git": 3, "commits": 4, "artifacts": 5, "status": 6},
        {"phases": {"spec": {"started_at": {}}, "plan": 1, "build": []}, "plan_state": [], "commits": [None]},
        {"build_progress": {"checkpoints_completed": None}, "git": None, "commits": [{}]},
        {"created_at": "", "updated_at": "2026-13-45T99:00:00Z", "topic": None},
        {"build_progress": {"checkpoints_total": -(2**31)}, "phase_history": {"anything": [1, {"x": None}]}},
    ],
)
def test_map_state_never_raises_for_a_json_object(doc: dict[str, Any]) -> None:
    state = map_state(doc)

    assert state.schema_version in (1, 2)
    json.dumps({name: value for name, value in state.columns().items() if not isinstance(value, datetime)})


# --- decode_document ----------------------------------------------------------------------------


def test_decode_reads_an_object() -> None:
    assert decode_document(b'{"a": [1, {"b": null}], "c": "d"}') == {"a": [1, {"b": None}], "c": "d"}


def test_decode_accepts_a_utf8_bom() -> None:
    raw = (FIXTURES / "v2-build.json").read_bytes()

    assert decode_document(b"\xef\xbb\xbf" + raw) == decode_document(raw)


def test_decode_keeps_non_ascii_text() -> None:
    assert decode_document('{"topic": "Café ✓ 日本", "e": "\\ud83d\\ude00"}'.encode()) == {
        "topic": "Café ✓ 日本",
        "e": "😀",
    }


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"", "empty file"),
        (b"\xef\xbb\xbf", "empty file"),
        (b"  \n\t\r\n", "file holds only whitespace"),
        (b'{"a": 1,\n "b": [1, 2', "not valid JSON: Expecting ',' delimiter at line 2 column 12"),
        (b'{"session_id": "x", "topic": "Billi', "not valid JSON: Unterminated string starting at line 1"),
        (b'{"a": ', "not valid JSON: Expecting value at line 1 column 7"),
        (b'{"a": 1}}', "not valid JSON: Extra data at line 1 column 9"),
        (b"{'a': 1}", "not valid JSON: Expecting property name enclosed in double quotes at line 1 column 2"),
        (b"[]", "top level is a list, not an object"),
        (b'"x"', "top level is a string, not an object"),
        (b"3", "top level is a number, not an object"),
        (b"3.5", "top level is a number, not an object"),
        (b"true", "top level is a boolean, not an object"),
        (b"null", "top level is null, not an object"),
        (b'{"a": "\xff"}', "not valid UTF-8 at byte 7"),
        (b'\xef\xbb\xbf{"a": "\xc3"}', "not valid UTF-8 at byte 10"),
        ('{"topic": "caf\u00e9"}'.encode("latin-1"), "not valid UTF-8 at byte 14"),
        (b'{"a": "\xed\xa0\x80"}', "not valid UTF-8 at byte 7"),
        (b'{"a": 1}\x00\x00', "contains a NUL character at byte 8"),
        (b'{"a": "x\x00y"}', "contains a NUL character at byte 8"),
        (b"\x00" * 16, "contains a NUL character at byte 0"),
        (b'{"n": ' + b"1" * 5000 + b"}", "not valid JSON: a number has too many digits to read"),
    ],
)
def test_decode_refuses_unreadable_bytes_with_a_reason(raw: bytes, expected: str) -> None:
    assert reason(raw).startswith(expected)


@pytest.mark.parametrize(
    "raw",
    [b'{"a": 1, "b": [1, 2', b'{"session_id": "x", "topic": "Billi', b'{"a": ', b"{"],
)
def test_a_file_cut_off_mid_write_says_so(raw: bytes) -> None:
    assert reason(raw).endswith("(the file ends early: cut off mid-write?)")


def test_a_cut_off_copy_of_every_example_is_refused() -> None:
    for path in sorted(FIXTURES.glob("*.json")):
        raw = path.read_bytes().rstrip()
        for end in range(len(raw)):
            with pytest.raises(InvalidStateError):
                decode_document(raw[:end])


@pytest.mark.parametrize(
    ("raw", "where"),
    [
        (b'{"a": "x\\u0000y"}', "contains a NUL character (\\u0000) in a"),
        (b'{"a": {"b\\u0000": 1}}', "contains a NUL character (\\u0000) in a key in a"),
        (
            b'{"commits": [{"message": "\\u0000"}]}',
            "contains a NUL character (\\u0000) in commits[0].message",
        ),
        (b'{"a": "\\ud800"}', "contains a lone surrogate (\\ud800) in a"),
        (b'{"a": ["ok", "\\uDFFF tail"]}', "contains a lone surrogate (\\udfff) in a[1]"),
        (b'{"\\udc00": 1}', "contains a lone surrogate (\\udc00) in a key in the top level"),
        (b'{"a b\\n": "\\ud800"}', 'contains a lone surrogate (\\ud800) in "a b\\n"'),
    ],
)
def test_strings_the_database_cannot_store_are_refused(raw: bytes, where: str) -> None:
    assert reason(raw).startswith(where)


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        (b'{"a": "\\\\u0000"}', "\\u0000"),  # an escaped backslash, then the text u0000
        (b'{"a": "\\ud83d\\ude00"}', "\U0001f600"),  # a surrogate pair is one character
        (b'{"a": "\\u00e9\\u0001"}', "\u00e9\u0001"),
    ],
)
def test_escapes_that_look_risky_but_are_storable_pass(raw: bytes, value: str) -> None:
    assert decode_document(raw) == {"a": value}


def test_nan_and_infinity_come_back_as_null_everywhere() -> None:
    raw = b'{"a": NaN, "b": [Infinity, -Infinity, 1.5], "c": {"d": 1e400, "e": -1e999}, "f": NaN}'

    doc = decode_document(raw)

    assert doc == {"a": None, "b": [None, None, 1.5], "c": {"d": None, "e": None}, "f": None}
    assert json.loads(json.dumps(doc, allow_nan=False)) == doc


@pytest.mark.parametrize(
    "number",
    [
        18446744073709551615,  # the largest orjson reads as an integer
        18446744073709551616,
        -9223372036854775809,  # the shortest it would turn into a float
        123456789012345678901234567890,
    ],
)
def test_integers_beyond_64_bits_stay_exact(number: int) -> None:
    doc = decode_document(f'{{"n": {number}, "l": [{number}, 1.25]}}'.encode())

    assert doc == {"n": number, "l": [number, 1.25]}
    assert type(doc["n"]) is int


def test_nan_in_a_count_maps_like_null() -> None:
    state = map_state(decode_document(b'{"build_progress": {"checkpoints_total": NaN}}'))

    assert state.checkpoints_total == 0
    assert state.field_errors == ()


def test_duplicate_keys_keep_the_last_value() -> None:
    doc = decode_document(b'{"phase_history": {}, "status": "active", "topic": "a", "status": "failed"}')

    assert doc == {"phase_history": {}, "status": "failed", "topic": "a"}
    assert map_state(doc).status == "failed"


def _nested(depth: int) -> bytes:
    return b'{"a": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"


def test_nesting_to_max_depth_is_accepted() -> None:
    doc = decode_document(_nested(MAX_DEPTH))

    # The object is one level, the lists inside it the other MAX_DEPTH - 1.
    assert json.dumps(doc["a"]) == "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1)


@pytest.mark.parametrize(
    "raw",
    [
        _nested(MAX_DEPTH + 1),
        b"[" * 100_000,
        b"[" * 100_000 + b"]" * 100_000,
        b"{" + b'"a":{' * 100_000,
        b'{"a": "' + b"]" * 500 + b'", "b": ' + b"[" * 70 + b"]" * 70 + b"}",
        b'{"a": "\\"]]]]\\\\", "b": ' + b"[" * 70 + b"]" * 70 + b"}",
    ],
)
def test_nesting_deeper_than_max_depth_is_refused(raw: bytes) -> None:
    assert reason(raw) == f"nested deeper than {MAX_DEPTH} levels"


def test_many_brackets_that_do_not_nest_deeply_are_fine() -> None:
    commits = [{"sha": f"{n:07x}", "message": 'fix [x] {y} \\" [[[[', "checkpoint": n} for n in range(200)]
    raw = json.dumps(
        {"build_progress": {"checkpoints_completed": list(range(200))}, "commits": commits}
    ).encode()

    state = map_state(decode_document(raw))

    assert state.commits is not None
    assert len(state.commits) == 200
    assert state.checkpoints_completed == 200


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    raw = b'{"a": "' + b"[" * 1000 + b'", "b": "\\\\", "c": "\\"' + b"{" * 100 + b'"}'

    assert decode_document(raw)["a"] == "[" * 1000


# --- the plain reading and the models agree -----------------------------------------------------

# Values of every JSON type and the edges the models check: bools are not counts, counts fit in
# 32 bits, timestamps parse.
_PROBES: list[Any] = [
    None, "", "x", "2025-01-01T00:00:00Z", "2025-01-01T02:00:00+02:00", "2025-01-01", "not a date",
    0, 5, -1, 2**31 - 1, 2**31, -(2**31), -(2**31) - 1, 2**70, True, False, 1.5,
    [], [1, "a"], {}, {"a": 1}, {"started_at": 3}, [{"sha": 1}],
]  # fmt: skip
_PATHS: list[tuple[str, ...]] = [
    *[(k,) for k in ("session_id", "topic", "title", "description", "current_phase", "created_at")],
    *[(k,) for k in ("updated_at", "session_type", "granularity", "status", "phase_history", "git")],
    *[(k,) for k in ("build_progress", "plan_state", "phases", "commits", "artifacts")],
    *[("git", k) for k in ("branch", "worktree", "base_branch")],
    *[(s, k) for s in ("build_progress", "plan_state") for k in ("checkpoints_total", "current_checkpoint")],
    ("build_progress", "checkpoints_completed"),
    ("plan_state", "checkpoints_completed"),
    *[("phases", p) for p in ("spec", "plan", "build", "docs")],
    *[("phases", p, k) for p in ("spec", "build") for k in ("started_at", "finalized_at", "completed_at")],
    *[("commits", 0, k) for k in ("sha", "message", "checkpoint", "checkpoint_id", "created_at")],
    ("commits", 1),
]
_DELETE = object()


def _altered(doc: dict[str, Any], path: tuple[str | int, ...], value: Any) -> dict[str, Any] | None:
    """A deep copy of `doc` with the value at `path` replaced (or deleted); None if the path is not there."""
    copy: Any = json.loads(json.dumps(doc))
    parent = copy
    for step in path[:-1]:
        child = parent.get(step) if isinstance(parent, dict) else None
        if isinstance(parent, list) and isinstance(step, int) and step < len(parent):
            child = parent[step]
        if not isinstance(child, dict | list):
            return None
        parent = child
    last = path[-1]
    if isinstance(parent, list):
        if not isinstance(last, int) or last >= len(parent):
            return None
        if value is _DELETE:
            del parent[last]
        else:
            parent[last] = value
    elif isinstance(last, str):
        if value is _DELETE:
            parent.pop(last, None)
        else:
            parent[last] = value
    return copy


def _variants() -> list[dict[str, Any]]:
    bases = [example(p.name) for p in sorted(FIXTURES.glob("*.json"))]
    both = {"commits": [{"checkpoint": None, "checkpoint_id": 4}, {"checkpoint_id": 2, "sha": "a"}]}
    bases += [{**base, **both} for base in list(bases)]
    bases += [{}, {"phase_history": None}, {"build_progress": {}}, {"phases": {}}]
    found = list(bases)
    for base in bases:
        for path in _PATHS:
            for value in [*_PROBES, _DELETE]:
                doc = _altered(base, path, value)
                if doc is not None:
                    found.append(doc)
    return found


def test_the_plain_reading_maps_every_document_as_the_models_do() -> None:
    # map_state reads well-typed documents without pydantic and hands the rest to the models;
    # either way the result must be exactly what the models alone give, field errors included.
    # It also vouches for every document the models find no fault with, or it would save nothing.
    from sessionsync.models.state import _map_plain, _Unsure
    from sessionsync.models.state_documents import map_document

    variants = _variants()
    assert len(variants) > 5000
    for doc in variants:
        by_models = map_document(doc)
        assert map_state(doc) == by_models, doc
        try:
            _map_plain(doc)
        except _Unsure:
            assert by_models.field_errors, doc
        else:
            assert not by_models.field_errors, doc
