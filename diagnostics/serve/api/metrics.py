"""Prometheus metrics: request and upload counters in this process, and the figures read from
the database at scrape time (queue depth, studies by status, QC refusals, population shares),
which count the work of every worker process. Served by `/metrics` (admin key)."""

from __future__ import annotations

from typing import Any

from diagnostics.serve.config import MonitorSection
from diagnostics.serve.monitor import daily
from diagnostics.serve.runner import ScoreResult
from diagnostics.serve.store import Store


class Metrics:
    def __init__(self, store: Store, monitor_cfg: MonitorSection | None = None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        self.registry = CollectorRegistry()
        self.requests = Counter(
            "diagnostics_http_requests",
            "HTTP requests by route and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.ack = Histogram(
            "diagnostics_upload_ack_seconds",
            "Time from request to 202 for accepted uploads",
            registry=self.registry,
        )
        self.refusals = Counter(
            "diagnostics_upload_refusals",
            "Uploads refused before a study was made (4xx/5xx), by code, in this process",
            ["code"],
            registry=self.registry,
        )
        self.scoring = Histogram(
            "diagnostics_scoring_seconds",
            "Per-study scoring time in this process (decode + QC + preprocess + model)",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )

        class FromStore:
            """Queue depth, studies by status and QC refusals by code, read from the database
            at scrape time, so they count the work of every worker process."""

            def collect(self) -> Any:
                depth = GaugeMetricFamily("diagnostics_queue_depth", "Jobs queued or running")
                depth.add_metric([], store.queue_depth())
                yield depth
                studies = GaugeMetricFamily(
                    "diagnostics_studies", "Studies by status", labels=["status"]
                )
                for k, v in store.status_counts().items():
                    studies.add_metric([k], v)
                yield studies
                refusals = CounterMetricFamily(
                    "diagnostics_qc_refusals", "Studies refused by QC, by code", labels=["code"]
                )
                for k, v in store.qc_refusal_counts().items():
                    refusals.add_metric([k], v)
                yield refusals
                yield from population_gauges()

        mcfg = monitor_cfg or MonitorSection()

        def population_gauges() -> Any:
            """Today's (UTC) shares per site: outside the population or the training
            distribution (refused or flagged), AI-positive calls, and the alert."""
            today = daily(store, None, mcfg.model_copy(update={"days": 1}))
            gauges = {
                "outside_share": GaugeMetricFamily(
                    "diagnostics_outside_population_share",
                    "Share of today's studies refused or flagged as outside the model's "
                    "intended population or training distribution, per site (UTC day)",
                    labels=["clinic", "day"],
                ),
                "positive_share": GaugeMetricFamily(
                    "diagnostics_positive_share",
                    "Share of today's studies with a call that the AI called positive, per site",
                    labels=["clinic", "day"],
                ),
                "alert": GaugeMetricFamily(
                    "diagnostics_population_alert",
                    "1 when today's outside share reached monitor.alert_share (with at least "
                    "monitor.min_studies studies), per site",
                    labels=["clinic", "day"],
                ),
            }
            outcomes = GaugeMetricFamily(
                "diagnostics_studies_today",
                "Today's finished studies per site by population outcome",
                labels=["clinic", "day", "outcome"],
            )
            for r in today:
                key = [r["clinic"], r["day"]]
                gauges["outside_share"].add_metric(key, r["outside_share"])
                if r["positive_share"] is not None:
                    gauges["positive_share"].add_metric(key, r["positive_share"])
                gauges["alert"].add_metric(key, 1.0 if r["alert"] else 0.0)
                for outcome in ("refused_population", "flagged_population", "refused_ood"):
                    outcomes.add_metric([*key, outcome], r[outcome])
                outcomes.add_metric([*key, "all"], r["studies"])
            yield from gauges.values()
            yield outcomes

        self.registry.register(FromStore())

    def observe_result(self, result: ScoreResult) -> None:
        self.scoring.observe(result.timing_ms.get("total", 0.0) / 1000.0)
