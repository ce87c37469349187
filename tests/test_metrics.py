"""Metrics: scraped over real HTTP from the real daemon while sessions are written, printed by
`sessionsync metrics`, written to a node_exporter textfile; the listener's loopback rule."""

from __future__ import annotations

import os
import re
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from sessionsync.daemon.metrics import Latency, write_atomically
from sessionsync.daemon.metrics_text import histogram
from tests.support.runner import Daemon
from tests.support.sessions import fixture_doc, write_state
from tests.support.waiting import wait_for


def _samples(text: str) -> dict[str, float]:
    """Every sample by name and labels, e.g. 'sessionsync_rows_written_total{source="live"}'."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def _scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=5) as reply:
        return _samples(reply.read().decode())


def _listening_url(daemon: Daemon) -> str:
    found = wait_for(lambda: re.search(r"metrics: serving (http://\S+/metrics)", daemon.log()), timeout=15)
    return found.group(1)


def test_scrape_while_sessions_are_written_moves_the_counters_by_the_right_amounts(
    tmp_path: Path, db_url: str, project: Path
) -> None:
    write_state(project, "old", fixture_doc("v2-spec"))
    with Daemon(tmp_path, db_url, projects=[project], debounce_ms=50, listen="127.0.0.1:0") as daemon:
        daemon.wait_started()
        url = _listening_url(daemon)
        before = _scrape(url)
        assert before[f'sessionsync_live_sessions{{project="{project}"}}'] == 1
        assert before["sessionsync_database_up"] == 1
        assert before["sessionsync_database_size_bytes"] > 0
        assert before['sessionsync_rows_written_total{source="reconcile"}'] == 1
        for n in range(3):
            write_state(project, f"s{n}", fixture_doc("v2-build"))

        def moved() -> dict[str, float] | None:
            now = _scrape(url)
            return now if now['sessionsync_rows_written_total{source="live"}'] >= 3 else None

        after = wait_for(moved, timeout=15)
        assert daemon.wait_idle()
        after = _scrape(url)
        live = 'sessionsync_rows_written_total{source="live"}'
        assert after[live] - before[live] == 3
        assert (
            after["sessionsync_write_to_row_seconds_count"] - before["sessionsync_write_to_row_seconds_count"]
            == 3
        )
        assert after["sessionsync_write_to_row_seconds_sum"] < 10
        assert after[f'sessionsync_live_sessions{{project="{project}"}}'] == 4
        assert after["sessionsync_fs_events_total"] > before["sessionsync_fs_events_total"]
        assert after["sessionsync_keys_debounced_total"] - before["sessionsync_keys_debounced_total"] >= 3
        assert after['sessionsync_projects{watch="live"}'] == 1
        assert after["sessionsync_queue_depth"] == 0
        # An invalid file counts once, on the live path.
        write_state(project, "bad", "{not json")
        wait_for(lambda: _scrape(url)['sessionsync_sessions_invalid_total{source="live"}'] == 1, timeout=15)


def test_sessionsync_metrics_prints_the_exposition_from_the_running_daemon(
    tmp_path: Path, db_url: str, project: Path
) -> None:
    write_state(project, "one", fixture_doc("v2-spec"))
    with Daemon(tmp_path, db_url, projects=[project]) as daemon:
        daemon.wait_started()
        out = daemon.cli("metrics")
        assert out.returncode == 0, out.stdout
        samples = _samples(out.stdout)  # nothing but the exposition: it parses whole
        assert samples[f'sessionsync_live_sessions{{project="{project}"}}'] == 1
        assert "# TYPE sessionsync_write_to_row_seconds histogram" in out.stdout
        daemon.stop()
        down = daemon.cli("metrics")
        assert down.returncode == 1
        assert "not running" in down.stdout


def test_a_non_loopback_listener_is_refused_unless_allowed(tmp_path: Path, db_url: str) -> None:
    daemon = Daemon(tmp_path, db_url, listen="0.0.0.0:9464")
    try:
        checked = daemon.cli("check-config")
        assert checked.returncode == 2
        assert "listen = '0.0.0.0:9464' is not a loopback address" in checked.stdout
        assert "allow_remote = true" in checked.stdout
        daemon.start()
        assert daemon.wait_exit() == 2
        assert "is not a loopback address" in daemon.log()
    finally:
        daemon.close()
    for n, (listen, remote) in enumerate(
        (("[::1]:0", False), ("localhost:9464", False), ("0.0.0.0:1", True))
    ):
        (tmp_path / str(n)).mkdir()
        good = Daemon(tmp_path / str(n), db_url, listen=listen, allow_remote=remote)
        assert good.cli("check-config").returncode == 0
    (tmp_path / "bad").mkdir()
    bad = Daemon(tmp_path / "bad", db_url, listen="9464").cli("check-config")
    assert bad.returncode == 2
    assert "must be HOST:PORT" in bad.stdout


def test_the_textfile_is_written_atomically_and_parses(tmp_path: Path, db_url: str, project: Path) -> None:
    out = tmp_path / "textfile"
    out.mkdir()
    target = out / "sessionsync.prom"
    write_state(project, "one", fixture_doc("v2-spec"))
    with Daemon(tmp_path, db_url, projects=[project], textfile=str(target), textfile_interval_s=1) as daemon:
        daemon.wait_started()
        first = wait_for(lambda: target.exists() and target.stat().st_ino, timeout=10)
        # Rewritten by renaming a new file over it (a new inode), never in place.
        wait_for(lambda: target.stat().st_ino != first, timeout=10)
        samples = _samples(target.read_text())
        assert samples[f'sessionsync_live_sessions{{project="{project}"}}'] == 1
        assert oct(target.stat().st_mode & 0o777) == oct(0o644 & ~_umask())
        assert [p.name for p in out.iterdir()] == ["sessionsync.prom"]  # no temp file left


def test_the_atomic_write_never_follows_a_planted_link(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep")
    target = tmp_path / "m.prom"
    (tmp_path / f".m.prom.{os.getpid()}.tmp").symlink_to(victim)
    write_atomically(str(target), b"x 1\n")
    assert victim.read_text() == "keep"
    assert target.read_bytes() == b"x 1\n"
    assert not target.is_symlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_the_latency_histogram_counts_each_write_in_the_first_bucket_that_holds_it() -> None:
    latency = Latency()
    for seconds in (0.005, 0.0051, 2.0, 400.0):
        latency.observe(seconds)
    samples = {(s.name, s.labels.get("le")): s.value for s in histogram(latency).samples}
    assert samples[("sessionsync_write_to_row_seconds_bucket", "0.005")] == 1  # a bound is inclusive
    assert samples[("sessionsync_write_to_row_seconds_bucket", "0.01")] == 2
    assert samples[("sessionsync_write_to_row_seconds_bucket", "1.0")] == 2
    assert samples[("sessionsync_write_to_row_seconds_bucket", "2.5")] == 3
    assert samples[("sessionsync_write_to_row_seconds_bucket", "300.0")] == 3
    assert samples[("sessionsync_write_to_row_seconds_bucket", "+Inf")] == 4
    assert samples[("sessionsync_write_to_row_seconds_count", None)] == 4
    assert samples[("sessionsync_write_to_row_seconds_sum", None)] == 0.005 + 0.0051 + 2.0 + 400.0
