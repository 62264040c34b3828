"""Prometheus metrics of one node.

Each ``Node`` owns its own ``CollectorRegistry`` (not the process-global one),
so several nodes in one test process never share or clash on counters.

The pipeline reports per-stage latency through ``observe_stage(stage, s)``;
everything else is counted by the listener, scheduler and worker pool.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

STAGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200)


class NodeMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.associations = Counter(
            "cag_associations", "Association requests by result and reject reason",
            ["result", "reason"], registry=r)
        self.active_associations = Gauge("cag_active_associations", "Associations now open", registry=r)
        self.instances = Counter(
            "cag_instances_received", "Instances stored and journaled", ["processable"], registry=r)
        self.bytes = Counter("cag_bytes_received", "Bytes of instances stored (file size)", registry=r)
        self.store_failures = Counter(
            "cag_store_failures", "C-STORE requests answered with a failure, by status", ["status"], registry=r)
        self.store_seconds = Histogram(
            "cag_store_seconds", "C-STORE handler time (write, fsync, journal)",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5), registry=r)
        self.studies_completed = Counter(
            "cag_studies_completed", "Studies declared complete after the quiet period", registry=r)
        self.jobs = Counter("cag_jobs", "Processing jobs by outcome", ["outcome"], registry=r)
        self.draft_disagreements = Counter(
            "cag_draft_language_disagreements", "Studies whose English and Japanese drafts disagree", registry=r)
        self.stage_seconds = Histogram(
            "cag_stage_seconds", "Pipeline stage latency", ["stage"], buckets=STAGE_BUCKETS, registry=r)

    # -- the API other areas use ------------------------------------------
    def observe_stage(self, stage: str, seconds: float) -> None:
        """Record how long one pipeline stage took for one study."""
        self.stage_seconds.labels(stage=stage).observe(max(0.0, float(seconds)))

    # -- used inside dicom_node -------------------------------------------
    def association(self, accepted: bool, reason: str = "") -> None:
        self.associations.labels(result="accepted" if accepted else "rejected", reason=reason).inc()

    def stored(self, size: int, processable: bool) -> None:
        self.instances.labels(processable=str(bool(processable)).lower()).inc()
        self.bytes.inc(size)

    def store_failed(self, status: int) -> None:
        self.store_failures.labels(status=f"0x{status:04X}").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
