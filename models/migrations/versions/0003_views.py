"""Views for readers: live_sessions, session_phases, project_summary.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02

session_phases reads the times out of the phase_history JSON, whose functions differ between
the dialects, so each view is emitted as dialect-specific SQL. A time is read only in the form
YYYY-MM-DD(T| )HH:MM:SS[.f, up to 6 digits][Z|+HH:MM|-HH:MM], naive meaning UTC; anything else
(another form, an impossible date, a non-string) is NULL rather than an error that would break
every query on the view. Both dialects parse by position and check ranges themselves, so they
agree on what is valid (PostgreSQL's own cast would refuse offsets past 15:59, SQLite's would
accept February 30).
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

VIEWS = ("project_summary", "session_phases", "live_sessions")

# Stable columns of sessions (the internal change-detection ones and deleted_at left out).
_SESSION_COLUMNS = (
    "slug, session_id, title, description, session_type, status, current_phase, phase_history, "
    "git_branch, git_worktree, git_base_branch, checkpoints_total, checkpoints_completed, "
    "checkpoints_completed_list, current_checkpoint, commits, artifacts, spec_exists, plan_exists, "
    "schema_version, raw_state, state_hash, state_size, state_mtime, created_at, updated_at, "
    "first_seen_at, synced_at, invalid, sync_error, sync_error_at"
)

LIVE_SESSIONS = f"""
CREATE VIEW live_sessions AS
SELECT s.id, s.project_id, p.working_dir AS project, p.name AS project_name, p.host,
       {", ".join(f"s.{c.strip()}" for c in _SESSION_COLUMNS.split(","))},
       COALESCE(s.state_mtime, s.synced_at) AS file_changed_at
FROM sessions s
JOIN projects p ON p.id = s.project_id
WHERE s.deleted_at IS NULL
"""

KNOWN_PHASES = ("spec", "plan", "build", "docs", "complete")
KNOWN_STATUSES = ("active", "complete", "failed")


def _count(condition: str) -> str:
    return f"SUM(CASE WHEN s.id IS NOT NULL AND s.deleted_at IS NULL AND {condition} THEN 1 ELSE 0 END)"


def _project_summary() -> str:
    def known(column: str, prefix: str, values: tuple[str, ...]) -> list[str]:
        listed = ", ".join(f"'{value}'" for value in values)
        counts = [f"{_count(f'{column} = {value!r}')} AS {prefix}_{value}" for value in values]
        # NULL (a session never read successfully) counts as other, as an unknown string does.
        other = _count(f"({column} IS NULL OR {column} NOT IN ({listed}))")
        return [*counts, f"{other} AS {prefix}_other"]

    counts = [
        f"{_count('1 = 1')} AS sessions",
        *known("s.current_phase", "phase", KNOWN_PHASES),
        *known("s.status", "status", KNOWN_STATUSES),
        f"{_count('s.invalid')} AS invalid",
    ]
    columns = ",\n       ".join(counts)
    return f"""
CREATE VIEW project_summary AS
SELECT p.id AS project_id, p.working_dir AS project, p.name AS project_name, p.host,
       {columns},
       MAX(s.synced_at) AS last_change_at,
       p.last_reconciled_at
FROM projects p
LEFT JOIN sessions s ON s.project_id = p.id
GROUP BY p.id, p.working_dir, p.name, p.host, p.last_reconciled_at
"""


# -- session_phases ----------------------------------------------------------------------------------
# entries: one row per <phase>_started_at / <phase>_completed_at key of a live session, with the text
# split into fields by position (the shape is checked first); times: the fields made a UTC time;
# then one row per session and phase that has a started or a completed time.

_SQLITE_PHASES = """
CREATE VIEW session_phases AS
WITH raw AS (
    SELECT s.id AS session_id, s.project_id, p.working_dir AS project, s.slug, e.key,
           CASE WHEN e.type = 'text' THEN e.value END AS t
    FROM sessions s
    JOIN projects p ON p.id = s.project_id,
         json_each(CASE WHEN json_type(s.phase_history) = 'object' THEN s.phase_history ELSE '{}' END) e
    WHERE s.deleted_at IS NULL
      AND (e.key GLOB '?*_started_at' OR e.key GLOB '?*_completed_at')
), split AS (
    SELECT session_id, project_id, project, slug, key, t,
           CASE WHEN t GLOB '*Z' THEN 'Z'
                WHEN t GLOB '*[+-][0-9][0-9]:[0-9][0-9]' THEN substr(t, -6)
                ELSE '' END AS tz
    FROM raw
), fields AS (
    SELECT session_id, project_id, project, slug, key, tz,
           substr(t, 1, length(t) - length(tz)) AS body
    FROM split
), checked AS (
    SELECT session_id, project_id, project, slug, key, tz, body,
           CAST(substr(body, 1, 4) AS INTEGER) AS y, CAST(substr(body, 6, 2) AS INTEGER) AS mo,
           CAST(substr(body, 9, 2) AS INTEGER) AS d, CAST(substr(body, 12, 2) AS INTEGER) AS h,
           CAST(substr(body, 15, 2) AS INTEGER) AS mi, CAST(substr(body, 18, 2) AS INTEGER) AS sec,
           CAST(substr(substr(body, 21) || '000000', 1, 6) AS INTEGER) AS us,
           CASE WHEN tz IN ('', 'Z') THEN 0
                ELSE (CASE WHEN substr(tz, 1, 1) = '-' THEN -1 ELSE 1 END)
                     * (CAST(substr(tz, 2, 2) AS INTEGER) * 60 + CAST(substr(tz, 5, 2) AS INTEGER)) END
               AS offset_min,
           (body GLOB '{DATETIME}'
            OR (body GLOB '{DATETIME}.[0-9]*'
                AND length(body) BETWEEN 21 AND 26
                AND ltrim(substr(body, 21), '0123456789') = ''))
           AND (tz IN ('', 'Z') OR (CAST(substr(tz, 2, 2) AS INTEGER) < 24
                                    AND CAST(substr(tz, 5, 2) AS INTEGER) < 60)) AS shaped
    FROM fields
), times AS (
    SELECT session_id, project_id, project, slug,
           substr(key, 1, length(key) - length(CASE WHEN key GLOB '*_started_at' THEN '_started_at'
                                                    ELSE '_completed_at' END)) AS phase,
           key GLOB '*_started_at' AS is_start,
           CAST(strftime('%s', printf('%04d-%02d-%02d %02d:%02d:%02d', y, mo, d, h, mi, sec)) AS INTEGER)
               - offset_min * 60 AS epoch,
           us
    FROM checked
    WHERE shaped AND y >= 1 AND mo BETWEEN 1 AND 12 AND d >= 1
      AND d <= CAST(strftime('%d', printf('%04d-%02d-01', y, mo), '+1 month', '-1 day') AS INTEGER)
      AND h < 24 AND mi < 60 AND sec < 60
), phases AS (
    SELECT session_id, project_id, project, slug, phase,
           MAX(CASE WHEN is_start THEN epoch END) AS s_epoch, MAX(CASE WHEN is_start THEN us END) AS s_us,
           MAX(CASE WHEN NOT is_start THEN epoch END) AS c_epoch,
           MAX(CASE WHEN NOT is_start THEN us END) AS c_us
    FROM times
    GROUP BY session_id, project_id, project, slug, phase
)
SELECT session_id, project_id, project, slug, phase,
       strftime('%Y-%m-%d %H:%M:%S', s_epoch, 'unixepoch') || printf('.%06d', s_us) AS started_at,
       strftime('%Y-%m-%d %H:%M:%S', c_epoch, 'unixepoch') || printf('.%06d', c_us) AS completed_at,
       ((c_epoch - s_epoch) * 1000000 + (c_us - s_us)) / 1000000.0 AS duration_s
FROM phases
""".replace("{DATETIME}", "[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9][T ][0-9][0-9]:[0-9][0-9]:[0-9][0-9]")

# Shape and field ranges are checked in the regular expression; nested CASEs keep make_timestamp
# away from a day past the month's end (CASE is the one construct with a guaranteed order).
_PG_TIME = (
    r"^(\d{4})-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])[T ]([01]\d|2[0-3]):([0-5]\d):([0-5]\d)"
    r"(?:\.(\d{1,6}))?(?:(Z)|([+-])([01]\d|2[0-3]):([0-5]\d))?$"
)

_PG_PHASES = f"""
CREATE VIEW session_phases AS
WITH raw AS (
    SELECT s.id AS session_id, s.project_id, p.working_dir AS project, s.slug, e.key,
           regexp_match(CASE WHEN jsonb_typeof(e.value) = 'string' THEN e.value #>> '{{}}' END,
                        '{_PG_TIME}') AS m
    FROM sessions s
    JOIN projects p ON p.id = s.project_id
    CROSS JOIN LATERAL jsonb_each(CASE WHEN jsonb_typeof(s.phase_history) = 'object'
                                       THEN s.phase_history ELSE '{{}}'::jsonb END) e
    WHERE s.deleted_at IS NULL
      AND e.key ~ '^.+_(started|completed)_at$'
), times AS (
    SELECT session_id, project_id, project, slug,
           substring(key FROM '^(.+)_(started|completed)_at$') AS phase,
           key LIKE '%\\_started\\_at' AS is_start,
           CASE WHEN m IS NULL OR m[1]::int < 1 THEN NULL
                WHEN m[3]::int > EXTRACT(DAY FROM make_date(m[1]::int, m[2]::int, 1)
                                                  + interval '1 month' - interval '1 day') THEN NULL
                ELSE make_timestamptz(m[1]::int, m[2]::int, m[3]::int, m[4]::int, m[5]::int,
                                      m[6]::int, 'UTC')
                     + (COALESCE(rpad(m[7], 6, '0'), '0')::bigint) * interval '1 microsecond'
                     - (CASE WHEN m[9] = '-' THEN -1 ELSE 1 END)
                       * (COALESCE(m[10]::int, 0) * interval '1 hour'
                          + COALESCE(m[11]::int, 0) * interval '1 minute')
           END AS at
    FROM raw
), phases AS (
    SELECT session_id, project_id, project, slug, phase,
           MAX(CASE WHEN is_start THEN at END) AS started_at,
           MAX(CASE WHEN NOT is_start THEN at END) AS completed_at
    FROM times
    GROUP BY session_id, project_id, project, slug, phase
)
SELECT session_id, project_id, project, slug, phase, started_at, completed_at,
       CAST(EXTRACT(EPOCH FROM completed_at - started_at) AS double precision) AS duration_s
FROM phases
WHERE started_at IS NOT NULL OR completed_at IS NOT NULL
"""


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    op.execute(LIVE_SESSIONS)
    op.execute(_PG_PHASES if dialect == "postgresql" else _SQLITE_PHASES)
    op.execute(_project_summary())


def downgrade() -> None:
    for view in VIEWS:
        op.execute(f"DROP VIEW IF EXISTS {view}")
