"""The Prometheus side of metrics.py: the collectors and the text exposition. Imported on the
first scrape, `metrics` command or configured outlet, never by a daemon nobody asks: with it
come prometheus_client and the HTTP server, urllib and email modules it imports (1.9 MiB)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from sessionsync.daemon.metrics import (
    LATENCY,
    LATENCY_BUCKETS,
    LIVE_SESSIONS,
    PREFIX,
    Latency,
    MetricsSource,
    Tally,
)


def registry(source: MetricsSource, tally: Tally, latency: Latency) -> CollectorRegistry:
    """A private registry (never prometheus_client's global one, so two services in one process,
    as in tests, do not share numbers) that reads every value when scraped."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_ServiceCollector(source, tally, latency))
    return reg


def render(reg: CollectorRegistry, keep: int | None = None) -> str:
    """The exposition; with `keep`, the per-project series cut to the `keep` largest projects."""
    return generate_latest(reg if keep is None else _Trimmed(reg, keep)).decode("utf-8")


def histogram(latency: Latency) -> HistogramMetricFamily:
    """The write -> row latency histogram, from its counts (cumulative, as Prometheus has them)."""
    counts, total = latency.snapshot()
    cumulative, buckets = 0, []
    for bound, count in zip((*map(str, LATENCY_BUCKETS), "+Inf"), counts, strict=True):
        cumulative += count
        buckets.append((bound, float(cumulative)))
    return HistogramMetricFamily(PREFIX + LATENCY, Latency.DOC, buckets=buckets, sum_value=total)


def _counter(
    name: str, doc: str, value: float | None = None, labels: Sequence[str] = ()
) -> CounterMetricFamily:
    return CounterMetricFamily(PREFIX + name, doc, value=value, labels=labels or None)


def _gauge(name: str, doc: str, value: float | None = None, labels: Sequence[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, doc, value=value, labels=labels or None)


class _ServiceCollector(Collector):
    """Every value, read from the service (and the histogram's counts) when scraped."""

    def __init__(self, source: MetricsSource, tally: Tally, latency: Latency) -> None:
        self._source = source
        self._tally = tally
        self._latency = latency

    def collect(self) -> Iterator[Metric]:
        yield histogram(self._latency)
        status = self._source.status()
        c: Mapping[str, int] = status["counters"]
        extras = self._source.metric_extras()
        outcomes = self._tally.snapshot()

        yield _counter("fs_events", "Filesystem events received from inotify, kept or not.", c["events"])
        yield _counter(
            "keys_debounced",
            "Session keys handed on by the debouncer to the work queue.",
            extras["keys_debounced"],
        )
        yield _counter("debounce_floods", "Times the debouncer entered flood mode.", c["floods"])
        batches = _counter("batches", "Batches committed, by write path.", labels=["source"])
        rows = _counter(
            "rows_written", "Session rows written or tombstoned, by write path.", labels=["source"]
        )
        unchanged = _counter(
            "sessions_unchanged",
            "Sessions looked at and skipped as unchanged, by write path.",
            labels=["source"],
        )
        invalid = _counter(
            "sessions_invalid",
            "Sessions written as invalid (state.json unreadable), by write path.",
            labels=["source"],
        )
        for src, o in outcomes.items():
            # The workers' own counters are status's; the other paths have only the tally.
            batches.add_metric([src], c["batches"] if src == "live" else o.batches)
            rows.add_metric([src], c["rows_written"] if src == "live" else o.rows)
            unchanged.add_metric([src], o.unchanged)
            invalid.add_metric([src], o.invalid)
        yield from (batches, rows, unchanged, invalid)
        yield _counter("batch_failures", "Worker batches that failed and were retried.", c["batch_failures"])
        yield _gauge("database_up", "1 while the database is reachable.", int(status["database_ok"]))
        yield _counter("database_outages", "Database outages since start.", c["database_outages"])
        yield _counter(
            "database_outage_seconds",
            "Seconds the database was unreachable since start, the current outage included.",
            extras["database_outage_seconds"],
        )
        yield _counter(
            "inotify_overflows", "inotify queue overflows (events lost, projects resynced).", c["overflows"]
        )
        yield _counter(
            "inotify_fallbacks",
            "Projects entering fallback (periodic scans, no inotify watch).",
            c["fallbacks"],
        )
        yield _counter(
            "inotify_observer_restarts", "Restarts of the inotify observer.", c["observer_restarts"]
        )
        watch = _gauge(
            "projects", "Mirrored projects by watch state (live, fallback, missing).", labels=["watch"]
        )
        states = [w["state"] for w in status["watch"]]
        for state in ("live", "fallback", "missing"):
            watch.add_metric([state], states.count(state))
        yield watch
        yield _gauge(
            "queue_depth", "Sessions waiting to be synced (queued or debouncing).", status["pending"]
        )
        yield _gauge("in_flight", "Sessions being synced right now.", status["in_flight"])
        yield _gauge("paused", "1 while writes are held by `sessionsync pause`.", int(status["paused"]))
        passes = _counter(
            "reconciles", "Finished reconcile passes: full, or of some projects.", labels=["scope"]
        )
        passes.add_metric(["full"], c["reconciles"])
        passes.add_metric(["projects"], c["resyncs"])
        yield passes
        yield _counter(
            "reconcile_failures", "Reconcile passes that failed and were retried.", c["reconcile_failures"]
        )
        yield _counter("events_published", "Change events handed to subscribers.", c["events_published"])
        yield _gauge("subscribers", "Connected event-stream subscribers.", c["subscribers"])
        yield _gauge("uptime_seconds", "Seconds since the daemon started.", status["uptime_s"])
        facts = self._source.database_facts()
        if facts is not None:
            live = _gauge(
                "live_sessions",
                "Live (not tombstoned) sessions in the database, per project.",
                labels=["project"],
            )
            for project, count in sorted(facts.live_by_project.items()):
                live.add_metric([project], count)
            yield live
            yield _gauge(
                "database_size_bytes",
                "Size of the database (SQLite file pages, or PostgreSQL's).",
                facts.size_bytes,
            )


class _Trimmed(Collector):
    """The registry with the per-project series cut to the `keep` largest projects."""

    def __init__(self, registry: CollectorRegistry, keep: int) -> None:
        self._registry = registry
        self._keep = keep

    def collect(self) -> Iterable[Metric]:
        for metric in self._registry.collect():
            if metric.name == LIVE_SESSIONS:
                metric.samples = sorted(metric.samples, key=lambda s: -s.value)[: self._keep]
            yield metric
