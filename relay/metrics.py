"""Prometheus metrics, in a registry of the app's own (so tests can run several apps).

With several worker processes (`workers` > 1) the supervisor gives them one directory in
PROMETHEUS_MULTIPROC_DIR: each process writes its values there, and whichever worker answers
/metrics adds up the counters and histograms of all of them, the dead ones included. The gauges
are read from the database at each scrape, so the most recent value is the right one.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.webhooks = Counter(
            "relay_webhooks",
            "Webhooks received, by source and outcome.",
            ["source", "outcome"],
            registry=r,
        )
        self.events = Counter(
            "relay_events",
            "Provider events, by source and outcome (mapped, ignored, failed, duplicate).",
            ["source", "outcome"],
            registry=r,
        )
        self.fitted = Counter(
            "relay_events_fitted",
            "Track events that had to be cut or trimmed to fit the track API.",
            ["source"],
            registry=r,
        )
        self.forwarded = Counter(
            "relay_events_forwarded",
            "Track events the track API accepted.",
            ["destination"],
            registry=r,
        )
        self.batches = Counter(
            "relay_batches",
            "Batch requests sent, by destination and status.",
            ["destination", "status"],
            registry=r,
        )
        self.dead_letters = Counter(
            "relay_dead_letters_added",
            "Events put in the dead-letter queue.",
            ["destination"],
            registry=r,
        )
        self.rate_limit_waits = Counter(
            "relay_rate_limit_waits",
            "Times a batch waited for the API key's rate-limit window.",
            ["destination"],
            registry=r,
        )
        self.latency = Histogram(
            "relay_forward_latency_seconds",
            "Time for one batch request to the track API.",
            ["destination"],
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.commit_seconds = Histogram(
            "relay_store_commit_seconds",
            "Time to commit one group of writes to disk (the fsync every answer waits for).",
            registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.outbox_depth = Gauge(
            "relay_outbox_depth",
            "Events waiting to be forwarded.",
            ["destination"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.outbox_oldest = Gauge(
            "relay_outbox_oldest_age_seconds",
            "Age of the oldest waiting event.",
            ["destination"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.dead_letter_depth = Gauge(
            "relay_dead_letters",
            "Events in the dead-letter queue.",
            ["destination"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.paused = Gauge(
            "relay_destination_paused",
            "1 while the track API refuses this destination.",
            ["destination"],
            registry=r,
            multiprocess_mode="mostrecent",
        )

    def render(self) -> bytes:
        directory = os.environ.get(MULTIPROCESS_DIR)
        if directory:
            every_worker = CollectorRegistry()
            MultiProcessCollector(every_worker, directory)  # type: ignore[no-untyped-call]
            return generate_latest(every_worker)
        return generate_latest(self.registry)
