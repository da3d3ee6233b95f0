"""Prometheus metrics, on one registry per app (never the process-wide default registry, so that
several apps in one process, as in the tests, do not collide).

Per-request figures (requests, latency, inputs, tokens) are counted as requests end, by
``api/middleware.py``. Per-model figures (batch sizes, queue waits, queue depth, load times) are
read from the model manager and its batchers when /metrics is scraped, so the batcher stays free
of any metrics library and the hot path pays nothing for them. A model that is unloaded takes its
batcher's histograms with it; Prometheus reads the drop as a counter reset.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from emb_model_provider.encoders.base import PrecisionReport
from emb_model_provider.scheduler import Histogram as BatcherHistogram
from emb_model_provider.services.cache import MemoryBackend, ResultCache
from emb_model_provider.services.models import LoadedModel, ModelManager

PREFIX = "emb_provider"

#: Request latency buckets in seconds: a single short input takes milliseconds, 2048 inputs on a
#: CPU take many seconds.
LATENCY_BUCKETS_S = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0
)  # fmt: skip

#: Reads torch's memory figures for the serving device (``core.device.accelerator_memory``);
#: returns None where there is no accelerator to report.
MemoryReader = Callable[[], dict[str, int] | None]


class Metrics:
    def __init__(self, models: ModelManager, *, accelerator_memory: MemoryReader | None) -> None:
        self.registry = CollectorRegistry()
        self._requests = Counter(
            f"{PREFIX}_requests",
            "HTTP requests answered, by route template, method, model and status code.",
            ["route", "method", "model", "status"],
            registry=self.registry,
        )
        self._latency = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "Time from the request's arrival to the end of its response, by route template.",
            ["route", "method"],
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self._inputs = Counter(
            f"{PREFIX}_inputs",
            "Inputs (texts, token arrays, images; a reranker's documents), by model and task.",
            ["model", "task"],
            registry=self.registry,
        )
        self._tokens = Counter(
            f"{PREFIX}_tokens",
            "Tokens (usage.prompt_tokens) processed, by model and task.",
            ["model", "task"],
            registry=self.registry,
        )
        ProcessCollector(registry=self.registry)
        self.registry.register(_ModelCollector(models, accelerator_memory))

    def observe_request(
        self,
        *,
        route: str,
        method: str,
        status: int,
        duration_s: float,
        model: str | None,
        inputs: int,
        tokens: int,
        task: str = "embed",
    ) -> None:
        self._requests.labels(route, method, model or "", str(status)).inc()
        self._latency.labels(route, method).observe(duration_s)
        if model:
            self._inputs.labels(model, task).inc(inputs)
            self._tokens.labels(model, task).inc(tokens)

    def watch_cache(self, cache: ResultCache) -> None:
        """Export the result cache's counters (read at scrape time)."""
        if cache.enabled:
            self.registry.register(_CacheCollector(cache))

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _histogram(
    name: str, documentation: str, per_model: list[tuple[str, BatcherHistogram]]
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=["model"])
    for model, histogram in per_model:
        counts = list(histogram.counts)  # the worker thread may add to it meanwhile
        buckets: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip(histogram.bounds, counts, strict=False):
            running += count
            buckets.append((_bound(bound), running))
        buckets.append(("+Inf", running + counts[-1]))
        family.add_metric([model], buckets, histogram.total)
    return family


def _bound(value: float) -> str:
    return str(float(value))


class _ModelCollector(Collector):
    """Per-model figures, read from the manager at scrape time."""

    def __init__(self, models: ModelManager, accelerator_memory: MemoryReader | None) -> None:
        self._models = models
        self._accelerator_memory = accelerator_memory

    def collect(self) -> Iterator[Metric]:
        loaded = self._models.loaded_models()
        yield GaugeMetricFamily(
            f"{PREFIX}_models_loaded", "Models loaded and serving.", value=len(loaded)
        )
        load_time = GaugeMetricFamily(
            f"{PREFIX}_model_load_seconds",
            "Seconds the model took to load and warm up.",
            labels=["model"],
        )
        queued = GaugeMetricFamily(
            f"{PREFIX}_queue_inputs", "Inputs waiting in the model's queue.", labels=["model"]
        )
        batches = CounterMetricFamily(
            f"{PREFIX}_batches", "Forward passes that succeeded.", labels=["model"]
        )
        skipped = CounterMetricFamily(
            f"{PREFIX}_skipped_inputs",
            "Queued inputs dropped before they ran (client gone or request timed out).",
            labels=["model"],
        )
        failed = CounterMetricFamily(
            f"{PREFIX}_failed_inputs", "Inputs the model failed on.", labels=["model"]
        )
        sizes: list[tuple[str, BatcherHistogram]] = []
        waits: list[tuple[str, BatcherHistogram]] = []
        for model in loaded:
            name = model.spec.name
            stats = model.batcher.stats
            load_time.add_metric([name], model.load_time_s)
            queued.add_metric([name], model.batcher.queued_inputs)
            batches.add_metric([name], stats.batches)
            skipped.add_metric([name], stats.skipped_inputs)
            failed.add_metric([name], stats.failed_inputs)
            sizes.append((name, stats.batch_sizes))
            waits.append((name, stats.queue_wait_s))
        yield from (load_time, queued, batches, skipped, failed)
        yield _precision(loaded)
        yield _histogram(f"{PREFIX}_batch_size", "Inputs per forward pass.", sizes)
        yield _histogram(
            f"{PREFIX}_queue_wait_seconds",
            "Seconds from an input's arrival in the queue to the start of its batch.",
            waits,
        )
        memory = self._accelerator_memory() if self._accelerator_memory else None
        if memory is not None:
            gauge = GaugeMetricFamily(
                f"{PREFIX}_accelerator_memory_bytes",
                "Device memory by kind (torch.cuda: allocated, reserved, total).",
                labels=["kind"],
            )
            for kind, value in memory.items():
                gauge.add_metric([kind.removesuffix("_bytes")], value)
            yield gauge


def _precision(loaded: list[LoadedModel]) -> GaugeMetricFamily:
    """The accuracy gate's figures (``precision: fast``): least and mean cosine to float32 of
    the path that serves, with the precision asked for and the path chosen as labels."""
    gauge = GaugeMetricFamily(
        f"{PREFIX}_precision_cosine",
        "Cosine to float32 over the calibration texts measured at load (stat: min, mean), by "
        "model, precision asked for and path serving (torch-float32 when fast was refused).",
        labels=["model", "requested", "path", "stat"],
    )
    for model in loaded:
        report = getattr(model.encoder, "precision", None)
        if not isinstance(report, PrecisionReport) or report.requested != "fast":
            continue
        serving_fast = report.reason is None
        for stat, value in (("min", report.min_cosine), ("mean", report.mean_cosine)):
            if value is None:
                continue
            # A refused path's figures are not what serves: float32 serves, at cosine 1.
            figure = value if serving_fast else 1.0
            gauge.add_metric([model.spec.name, report.requested, report.path, stat], figure)
        if not serving_fast and report.min_cosine is None:
            for stat in ("min", "mean"):
                gauge.add_metric([model.spec.name, report.requested, report.path, stat], 1.0)
    return gauge


class _CacheCollector(Collector):
    """The result cache's counters (``services/cache.py``), read at scrape time."""

    def __init__(self, cache: ResultCache) -> None:
        self._cache = cache

    def collect(self) -> Iterator[Metric]:
        cache = self._cache
        backend = cache.backend.name if cache.backend is not None else "off"
        stats = cache.backend_stats()
        for name, documentation, value in (
            ("cache_hits", "Inputs answered from the result cache.", cache.stats.hits),
            ("cache_misses", "Inputs the model computed for the cache.", cache.stats.misses),
            (
                "cache_coalesced",
                "Inputs answered by a computation of the same input under way.",
                cache.stats.coalesced,
            ),
            ("cache_evictions", "Entries the memory cache dropped for room.", stats.evictions),
            ("cache_backend_errors", "Cache backend calls that failed or timed out.", stats.errors),
            (
                "cache_backend_skipped",
                "Cache backend calls skipped while it was down (back-off).",
                stats.skipped,
            ),
        ):
            family = CounterMetricFamily(f"{PREFIX}_{name}", documentation, labels=["backend"])
            family.add_metric([backend], value)
            yield family
        if isinstance(cache.backend, MemoryBackend):
            held = GaugeMetricFamily(
                f"{PREFIX}_cache_bytes",
                "Bytes the memory cache holds: vectors, keys and per-entry overhead.",
                labels=["backend"],
            )
            held.add_metric([backend], cache.backend.bytes_held)
            yield held
            entries = GaugeMetricFamily(
                f"{PREFIX}_cache_entries", "Entries the memory cache holds.", labels=["backend"]
            )
            entries.add_metric([backend], cache.backend.entries)
            yield entries
