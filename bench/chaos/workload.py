"""The chaos run's workload: seeded operations on session folders as agents and people make
them (writes of every kind, bad input, sessions moved, linked and removed, projects appearing),
and the model of what exists that the operations draw from.

Every choice comes from the run's one `random.Random`, shared with the faults in the order the run
makes them: a seed replays the same operations.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

SESSIONS = Path("agents") / "sessions"
MAX_STATE_BYTES = 16_384  # the daemon's max_state_bytes in the run; "oversized" writes pass it
PHASES = ("spec", "plan", "build", "docs", "retro")  # retro: unknown, stored as it is
STATUSES = ("active", "complete", "failed", "blocked")
# Slugs are drawn from a small pool, so deleted sessions come back (restored rows) and moved
# ones often keep their name in the other project.
SLUG_POOL = (
    *(f"s{i:02d}" for i in range(36)),
    "with space",
    "ünïcødé-slug",
    "UPPER-case",
    "long-" + "x" * 90,
)


class Workload:
    """The session tree of one run under `work`: projects found under `root` by discovery, one
    named in the config (`explicit`), and a staging folder outside every project to move
    sessions in from and out to."""

    def __init__(self, rng: random.Random, work: Path) -> None:
        self.rng = rng
        self.work = work
        self.root = work / "root"
        self.explicit = work / "explicit"
        self.present: dict[Path, bool] = {}  # project -> its sessions folder exists
        self.sessions: dict[Path, set[str]] = {}  # project -> session folders
        self.all_projects: set[Path] = set()
        self.links: dict[Path, set[str]] = {}  # project -> symbolic links where sessions would be
        self.new_projects = 0
        self.staged = 0  # folders prepared outside every project, to move in or link to
        self.writes = 0

    def populate(self) -> None:
        """Projects with sessions before the daemon starts, plus folders that are not projects."""
        for project in (self.root / "alpha", self.root / "team" / "beta", self.root / "team" / "gamma"):
            self._add_project(project, self.rng.randint(6, 12))
        self._add_project(self.explicit, self.rng.randint(6, 12))
        (self.work / "staging").mkdir()  # outside every project: sessions are moved out and in
        for _ in range(3):
            self._op_decoy()

    def _add_project(self, project: Path, sessions: int) -> None:
        (project / SESSIONS).mkdir(parents=True, exist_ok=True)
        self.present[project] = True
        self.sessions[project] = set()
        self.links[project] = set()
        self.all_projects.add(project)
        for _ in range(sessions):
            self._create_in(project)

    def _op_weights(self) -> dict[str, float]:
        total = sum(len(s) for s in self.sessions.values())
        have = total > 0
        absent = any(not p for p in self.present.values())
        return {
            "atomic": 30 if have else 0,
            "in_place": 12 if have else 0,
            "slow": 2 if have else 0,
            "invalid": 6 if have else 0,
            "burst": 1.5 if have else 0,
            "artifact": 6 if have else 0,
            "create": 8 if total < 70 else 1,
            "folder_only": 1,
            "delete": 4 if total > 20 else 0.5,
            "delete_state": 2 if have else 0,
            "rename": 4 if have else 0,
            "move": 3 if have and sum(self.present.values()) > 1 else 0,
            "remove_sessions": 0.06 if sum(self.present.values()) > 2 else 0,
            "recreate_sessions": 0.3 if absent else 0,  # gone for a few seconds, often more
            "new_project": 0.04 if self.new_projects < 3 else 0,
            "decoy": 0.2,
            "link": 1.5 if have else 0,
            "move_in": 1,
            "move_out": 1 if have else 0,
        }

    def one_op(self) -> None:
        weights = self._op_weights()
        name = self.rng.choices(list(weights), list(weights.values()))[0]
        getattr(self, f"_op_{name}")()

    def _pick(self) -> tuple[Path, str]:
        choices = [(p, s) for p in sorted(self.sessions) for s in sorted(self.sessions[p])]
        return self.rng.choice(choices)

    def live_projects(self) -> list[Path]:
        return sorted(p for p, here in self.present.items() if here)

    def _free_slug(self, project: Path) -> str:
        taken = self.sessions[project] | self.links[project]
        free = [s for s in SLUG_POOL if s not in taken]
        return self.rng.choice(free) if free else f"extra-{self.rng.getrandbits(32):08x}"

    def _folder(self, project: Path, slug: str) -> Path:
        return project / SESSIONS / slug

    def _doc(self, slug: str) -> dict[str, Any]:
        """A v2 (or, one time in five, v1) state.json; now and then with a field of the wrong type."""
        rng = self.rng
        self.writes += 1
        total = rng.randint(0, 6)
        done = sorted(rng.sample(range(1, total + 1), rng.randint(0, total)))
        topic: Any = rng.choice((f"{slug} write {self.writes}", f"ünïcødé {self.writes} ✓", None))
        stamp = f"2025-0{rng.randint(1, 9)}-1{rng.randint(0, 9)}T0{rng.randint(0, 9)}:00:00Z"
        commits = [{"sha": f"{rng.getrandbits(40):010x}", "message": f"cp {c}"} for c in done]
        if rng.random() < 0.2:
            progress: Any = {"checkpoints_total": total, "checkpoints_completed": done}
            doc: dict[str, Any] = {
                "session_id": slug,
                "topic": topic,
                "current_phase": rng.choice(PHASES),
                "granularity": "full",
                "phases": {"spec": {"started_at": stamp}},
                "plan_state": progress,
                "commits": [{**c, "checkpoint_id": n} for c, n in zip(commits, done, strict=True)],
                "created_at": stamp,
            }
        else:
            progress = {"checkpoints_total": total, "checkpoints_completed": done, "current_checkpoint": 1}
            doc = {
                "session_id": slug,
                "topic": topic,
                "description": "chaos",
                "session_type": "full",
                "status": rng.choice(STATUSES),
                "current_phase": rng.choice(PHASES),
                "phase_history": {"spec_started_at": stamp},
                "build_progress": progress,
                "git": {"branch": f"feat/{slug}", "base_branch": "main"},
                "commits": [{**c, "checkpoint": n} for c, n in zip(commits, done, strict=True)],
                "created_at": stamp,
                "updated_at": stamp,
            }
        if rng.random() < 0.08:
            # A field of the wrong type: that column NULL (or its default), the rest still mirrored.
            section = "build_progress" if "build_progress" in doc else "plan_state"
            bad: dict[str, Any] = rng.choice(
                (
                    {"topic": 42},
                    {"current_phase": ["build"]},
                    {section: {**progress, "checkpoints_total": "lots"}},
                    {section: {**progress, "checkpoints_completed": {"1": True}}},
                    {section: [1, 2]},
                )
            )
            doc.update(bad)
        return doc

    def _encode(self, doc: dict[str, Any]) -> bytes:
        indent = self.rng.choice((None, 2))
        data = json.dumps(doc, ensure_ascii=self.rng.random() < 0.5, indent=indent).encode()
        return b"\xef\xbb\xbf" + data if self.rng.random() < 0.05 else data  # a BOM is accepted

    def _bad_bytes(self, slug: str) -> bytes:
        kind = self.rng.choice(("cut", "garbage", "list", "empty", "oversized", "nul", "utf8"))
        if kind == "cut":
            data = self._encode(self._doc(slug))
            return data[: self.rng.randint(1, len(data) - 1)]
        if kind == "oversized":
            return json.dumps({**self._doc(slug), "padding": "x" * (MAX_STATE_BYTES + 100)}).encode()
        return {
            "garbage": b"{not json at all",
            "list": b"[1, 2, 3]",
            "empty": b"",
            "nul": b'{"topic": "a\x00b"}',
            "utf8": b'{"topic": "\xff\xfe"}',
        }[kind]

    def _write(self, folder: Path, data: bytes, how: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / "state.json"
        if how == "atomic":
            tmp = folder / "state.json.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, target)
        elif how == "slow":
            with target.open("wb") as f:
                f.write(data[: len(data) // 2])
                f.flush()
                time.sleep(self.rng.uniform(0.05, 0.4))  # a writer pausing mid-file is the scenario
                f.write(data[len(data) // 2 :])
        else:
            target.write_bytes(data)

    def _create_in(self, project: Path) -> None:
        slug = self._free_slug(project)
        self._write(self._folder(project, slug), self._encode(self._doc(slug)), "atomic")
        self.sessions[project].add(slug)

    def _op_atomic(self) -> None:
        project, slug = self._pick()
        self._write(self._folder(project, slug), self._encode(self._doc(slug)), "atomic")

    def _op_in_place(self) -> None:
        project, slug = self._pick()
        self._write(self._folder(project, slug), self._encode(self._doc(slug)), "in_place")

    def _op_slow(self) -> None:
        project, slug = self._pick()
        self._write(self._folder(project, slug), self._encode(self._doc(slug)), "slow")

    def _op_invalid(self) -> None:
        project, slug = self._pick()
        how = self.rng.choice(("atomic", "in_place"))
        self._write(self._folder(project, slug), self._bad_bytes(slug), how)

    def _op_burst(self) -> None:
        self.burst()

    def burst(self, on_half: Callable[[], None] | None = None) -> None:
        """Many writes at full speed over a few sessions; `on_half` runs halfway (SIGTERM)."""
        picked = [self._pick() for _ in range(self.rng.randint(2, 8))]
        writes = self.rng.randint(20, 100)
        for i in range(writes):
            if i == writes // 2 and on_half is not None:
                on_half()
            project, slug = picked[i % len(picked)]
            self._write(self._folder(project, slug), self._encode(self._doc(slug)), "atomic")

    def _op_artifact(self) -> None:
        project, slug = self._pick()
        path = self._folder(project, slug) / self.rng.choice(("spec.md", "plan.json"))
        if path.exists():
            path.unlink()
        else:
            path.write_text("# spec\n" if path.suffix == ".md" else "{}")

    def _op_create(self) -> None:
        self._create_in(self.rng.choice(self.live_projects()))

    def _op_folder_only(self) -> None:
        project = self.rng.choice(self.live_projects())
        slug = self._free_slug(project)
        (self._folder(project, slug) / "research").mkdir(parents=True, exist_ok=True)
        self.sessions[project].add(slug)

    def _op_delete(self) -> None:
        project, slug = self._pick()
        shutil.rmtree(self._folder(project, slug))
        self.sessions[project].discard(slug)

    def _op_delete_state(self) -> None:
        project, slug = self._pick()
        (self._folder(project, slug) / "state.json").unlink(missing_ok=True)

    def _op_rename(self) -> None:
        project, slug = self._pick()
        self.sessions[project].discard(slug)
        if self.rng.random() < 0.3:
            # Renamed to a hidden name: no longer a session (trash folders, editors' backups).
            new = f".trash-{self.rng.getrandbits(32):08x}"
        else:
            new = self._free_slug(project)
            self.sessions[project].add(new)
        os.rename(self._folder(project, slug), self._folder(project, new))

    def _op_move(self) -> None:
        project, slug = self._pick()
        others = [p for p in self.live_projects() if p != project]
        if not others:
            return
        dest = self.rng.choice(others)
        new = slug if slug not in self.sessions[dest] | self.links[dest] else self._free_slug(dest)
        os.rename(self._folder(project, slug), self._folder(dest, new))
        self.sessions[project].discard(slug)
        self.sessions[dest].add(new)

    def _op_remove_sessions(self) -> None:
        """The sessions folder removed, or its parent too (a branch without agents/ checked out)."""
        project = self.rng.choice(self.live_projects())
        shutil.rmtree(project / (SESSIONS if self.rng.random() < 0.5 else SESSIONS.parent))
        self.present[project] = False
        self.sessions[project] = set()
        self.links[project] = set()

    def _op_recreate_sessions(self) -> None:
        project = self.rng.choice(sorted(p for p, here in self.present.items() if not here))
        (project / SESSIONS).mkdir(parents=True)
        self.present[project] = True
        for _ in range(self.rng.randint(0, 4)):
            self._create_in(project)

    def _staged_session(self) -> Path:
        """A session folder prepared outside every project (as a tool would, before moving it in)."""
        self.staged += 1
        folder = self.work / "staging" / f"st{self.staged}"
        self._write(folder, self._encode(self._doc(folder.name)), "atomic")
        return folder

    def _op_move_in(self) -> None:
        project = self.rng.choice(self.live_projects())
        slug = self._free_slug(project)
        os.rename(self._staged_session(), self._folder(project, slug))
        self.sessions[project].add(slug)

    def _op_move_out(self) -> None:
        project, slug = self._pick()
        self.staged += 1
        os.rename(self._folder(project, slug), self.work / "staging" / f"out{self.staged}")
        self.sessions[project].discard(slug)

    def _op_link(self) -> None:
        """A symbolic link where a session folder would be (to another session, or outside every
        project) or in place of a state.json: invalid, as links are not followed. Or one removed.
        Links only ever lead inside the run's folder: later writes may go through them."""
        project = self.rng.choice(self.live_projects())
        links = self.links[project]
        if links and self.rng.random() < 0.4:
            name = self.rng.choice(sorted(links))
            (project / SESSIONS / name).unlink()
            links.discard(name)
        elif self.rng.random() < 0.6:
            name = self._free_slug(project)
            target = self._folder(*self._pick()) if self.rng.random() < 0.5 else self._staged_session()
            os.symlink(target, project / SESSIONS / name)
            links.add(name)
        else:
            state = self._folder(*self._pick()) / "state.json"
            link = state.with_name("state.json.link")
            os.symlink(self._staged_session() / "state.json", link)
            os.replace(link, state)

    def _op_new_project(self) -> None:
        self.new_projects += 1
        parent = self.root / "team" if self.rng.random() < 0.5 else self.root
        self._add_project(parent / f"new{self.new_projects}", self.rng.randint(1, 5))

    def _op_decoy(self) -> None:
        """A state.json where no session is: in skipped or hidden folders, below the discovery
        depth, beside the sessions folder, under a hidden slug, nested in a session; or a file
        where a session folder would be."""
        kind = self.rng.choice(("skipped", "deep", "beside", "hidden_slug", "nested", "stray_file"))
        live = self.live_projects()
        project = self.rng.choice(live)
        sessions = project / SESSIONS
        doc = self._encode(self._doc("decoy"))
        if kind == "skipped":
            where = self.rng.choice(("node_modules/pkg", ".hidden/app", "app/.venv/lib"))
            self._write(self.root / where / SESSIONS / "d1", doc, "atomic")
        elif kind == "deep":
            self._write(self.root / "a" / "b" / "c" / "deep" / SESSIONS / "d1", doc, "atomic")
        elif kind == "beside":
            self._write(project / "agents" / "not-sessions" / "d1", doc, "atomic")
        elif kind == "hidden_slug":
            self._write(sessions / f".hidden-{self.rng.randint(0, 3)}", doc, "atomic")
        elif kind == "nested" and self.sessions[project]:
            slug = self.rng.choice(sorted(self.sessions[project]))
            self._write(sessions / slug / "research", doc, "atomic")
        elif kind == "stray_file":
            (sessions / f"stray-{self.rng.randint(0, 3)}.txt").write_text("not a session")
