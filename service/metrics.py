"""Every Prometheus metric of the service, defined once, in base units (seconds, tokens).

Each app owns its own ``CollectorRegistry`` (tests build many apps in one process). ``keep_rate``
labels are bucketed to 0.05 so a client sending arbitrary rates cannot blow up cardinality. One unit per
metric: a name ends in its unit (``_seconds``, ``_seconds_per_gmac``) or is a count or ratio. ``asgi_app``
serves them with prometheus_client's ASGI app (gzip on ``Accept-Encoding``, OpenMetrics on ``Accept``).
"""

from __future__ import annotations

import math
import platform
from importlib.metadata import PackageNotFoundError, version

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
    make_asgi_app,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

KEEP_RATE_STEP = 0.05
NO_RATE = "none"  # label for requests rejected before a keep rate was known
NO_MODEL = "none"  # label for requests naming no hosted model (unbounded names never become labels)

# From a GPU batch of a small ViT (~1 ms) to a large CPU batch under load (tens of seconds).
LATENCY_BUCKETS = (
    0.001, 0.002, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.35, 0.5, 0.75,
    1.0, 1.5, 2.5, 5.0, 10.0, 30.0,
)
QUEUE_BUCKETS = (0.0001, 0.0005, *LATENCY_BUCKETS)
BATCH_SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024)
KEEP_RATE_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 21))  # 0.05, 0.10, ..., 1.00


def rate_label(keep_rate: float | None) -> str:
    """``0.62 -> "0.60"``; never below the first bucket; ``None`` (rate unknown) -> ``"none"``."""
    if keep_rate is None or not math.isfinite(keep_rate):
        return NO_RATE
    steps = max(1, round(keep_rate / KEEP_RATE_STEP))
    return f"{steps * KEEP_RATE_STEP:.2f}"


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        for collector in (ProcessCollector, PlatformCollector, GCCollector):
            collector(registry=r)
        self.requests = Counter(
            "evit_requests", "Requests answered, by model, keep rate (bucketed) and HTTP status code.",
            ["model", "keep_rate", "code"], registry=r,
        )
        self.request_duration = Histogram(
            "evit_request_duration_seconds", "Time from request arrival to answer, every answer (code: HTTP status).",
            ["model", "keep_rate", "code"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.decode_duration = Histogram(
            "evit_decode_seconds", "Image validation, decoding and preprocessing time.",
            ["model"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.queue_wait = Histogram(
            "evit_queue_wait_seconds", "Time a request waited in the batching queue before its batch ran.",
            ["model"], buckets=QUEUE_BUCKETS, registry=r,
        )
        self.batch_size = Histogram(
            "evit_batch_size", "Samples per forward pass.", ["model"], buckets=BATCH_SIZE_BUCKETS, registry=r,
        )
        self.batch_inference = Histogram(
            "evit_batch_inference_seconds", "Time of one forward pass (host-to-device copy and results included).",
            ["model"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.tokens = Counter(
            "evit_tokens_processed", "Tokens the transformer blocks computed, summed over blocks.",
            ["model", "keep_rate"], registry=r,
        )
        self.queue_depth = Gauge(
            "evit_queue_depth", "Requests waiting in the batching queue.", ["model"], registry=r,
        )
        self.admitted = Gauge(
            "evit_admitted_requests", "Requests admitted and not yet batched (decoding or queued); capped "
            "by the queue size.", ["model"], registry=r,
        )
        # latency-aware scheduling (service/scheduler.py, service/latency.py)
        self.auto_keep_rate = Histogram(
            "evit_auto_keep_rate", "Keep rates that keep_rate=auto requests ran at.",
            ["model", "priority"], buckets=KEEP_RATE_BUCKETS, registry=r,
        )
        self.batch_predicted = Histogram(
            "evit_batch_predicted_seconds", "A batch's time (all its passes) as the latency model predicted "
            "it when the batch was formed.", ["model"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.batch_measured = Histogram(
            "evit_batch_measured_seconds", "A batch's time (all its passes) as measured; compare with "
            "evit_batch_predicted_seconds.", ["model"], buckets=LATENCY_BUCKETS, registry=r,
        )
        # the latency model's current fit: pass time = overhead + seconds_per_gmac * GMACs
        self.latency_overhead = Gauge(
            "evit_latency_model_overhead_seconds", "The latency model's fixed time per forward pass.",
            ["model"], registry=r,
        )
        self.latency_slope = Gauge(
            "evit_latency_model_seconds_per_gmac", "The latency model's time per GMAC of a forward pass.",
            ["model"], registry=r,
        )
        self.latency_error = Gauge(
            "evit_latency_model_relative_error", "RMS relative error of the latency model's recent predictions "
            "(a ratio).", ["model"], registry=r,
        )
        self.deadline_refused = Counter(
            "evit_deadline_refused", "Requests refused because they would finish past their deadline: at "
            "admission or when their batch was formed (stage).", ["model", "priority", "stage"], registry=r,
        )
        self.build_info = Info("evit_build", "Versions this server runs (value always 1).", registry=r)
        self.ready = Gauge(
            "evit_ready", "1 when the service is ready to take requests (loaded, warmed up, not draining).",
            registry=r,
        )

    def init_model(self, model: str) -> None:
        """Export zero-valued series for a model at start-up, so dashboards see it before traffic."""
        for m in (self.queue_wait, self.batch_size, self.batch_inference, self.decode_duration,
                  self.batch_predicted, self.batch_measured):
            m.labels(model=model)
        self.queue_depth.labels(model=model).set(0)
        self.admitted.labels(model=model).set(0)

    def count_request(self, model: str, keep_rate: float | None, code: int, seconds: float) -> None:
        rate = rate_label(keep_rate)
        self.requests.labels(model=model, keep_rate=rate, code=str(code)).inc()
        self.request_duration.labels(model=model, keep_rate=rate, code=str(code)).observe(seconds)

    def set_latency_model(self, model: str, overhead_s: float, seconds_per_gmac: float, error: float) -> None:
        self.latency_overhead.labels(model=model).set(overhead_s)
        self.latency_slope.labels(model=model).set(seconds_per_gmac)
        self.latency_error.labels(model=model).set(error)

    def set_build_info(self, backend: str) -> None:
        """``evit_build_info{version, torch, timm, python, backend} 1`` (backend: the hosted models', comma-joined)."""
        import timm
        import torch

        self.build_info.info({"version": _version("evit-serve"), "torch": torch.__version__, "timm": timm.__version__,
                              "python": platform.python_version(), "backend": backend})

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def asgi_app(self) -> MetricsApp:
        return MetricsApp(self.registry)


class MetricsApp:
    """prometheus_client's ASGI app as an object, so a Starlette ``Route`` hands it the raw ASGI call."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.app = make_asgi_app(registry)

    async def __call__(self, scope: dict, receive: object, send: object) -> None:
        await self.app(scope, receive, send)


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"
