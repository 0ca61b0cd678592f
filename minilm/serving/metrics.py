"""GET /metrics: the server's state in Prometheus' text format, under vLLM's names with a
`minilm:` prefix (a dashboard built for vLLM reads it after a rename), labelled model_name.

    minilm:num_requests_running            gauge      requests with rows in the batch (filling or decoding)
    minilm:num_requests_waiting            gauge      requests waiting for rows (--max_waiting caps them)
    minilm:kv_cache_usage_perc             gauge      the batch's KV cache columns in use, 0 .. 1
    minilm:prefix_cache_usage_perc         gauge      the prefix cache's blocks in use, 0 .. 1 (minilm's)
    minilm:prefix_cache_queries_total      counter    prompt tokens looked up
    minilm:prefix_cache_hits_total         counter    of them, tokens reused rather than computed
    minilm:prompt_tokens_total             counter    prompt tokens of finished requests
    minilm:generation_tokens_total         counter    tokens generated
    minilm:time_to_first_token_seconds     histogram  request received -> its first token
    minilm:e2e_request_latency_seconds     histogram  request received -> its last token

The gauges and the prefix-cache counters are read from the engine when scraped (a collector);
the rest is recorded per request when it ends. Each app has its own registry (tests run several).
"""

from __future__ import annotations

from typing import Callable, Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

PREFIX = "minilm:"
# vLLM's buckets (seconds)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
# Engine.stats() key -> (metric, help); the counters' names get prometheus' _total
GAUGES = {
    "running_requests": ("num_requests_running", "Requests with rows in the batch."),
    "waiting_requests": ("num_requests_waiting", "Requests waiting for rows."),
    "kv_cache_usage": ("kv_cache_usage_perc", "Fraction of the batch's KV cache in use (1 = 100%)."),
    "prefix_cache_usage": ("prefix_cache_usage_perc",
                           "Fraction of the prefix cache's blocks in use (1 = 100%)."),
}
COUNTERS = {
    "prefix_cache_queries": ("prefix_cache_queries", "Prompt tokens looked up for reuse."),
    "prefix_cache_hits": ("prefix_cache_hits", "Prompt tokens reused instead of computed."),
}


class _EngineCollector(Collector):
    """The engine's numbers at scrape time."""

    def __init__(self, stats: Callable[[], dict], model_name: str):
        self.stats, self.model_name = stats, model_name

    def collect(self) -> Iterator[Metric]:
        stats = self.stats()
        for families, kind in ((GAUGES, GaugeMetricFamily), (COUNTERS, CounterMetricFamily)):
            for key, (name, help_text) in families.items():
                family = kind(PREFIX + name, help_text, labels=["model_name"])
                family.add_metric([self.model_name], stats[key])
                yield family


class Metrics:
    """The registry of one app, and what a finished request records in it."""

    def __init__(self, stats: Callable[[], dict], model_name: str):
        self.registry = CollectorRegistry()
        self.model_name = model_name
        self.registry.register(_EngineCollector(stats, model_name))

        def labelled(kind, name: str, help_text: str, **kwargs):
            return kind(PREFIX + name, help_text, ["model_name"], registry=self.registry,
                        **kwargs).labels(model_name)

        self.prompt_tokens = labelled(Counter, "prompt_tokens", "Prompt tokens of requests.")
        self.generation_tokens = labelled(Counter, "generation_tokens", "Tokens generated.")
        self.ttft = labelled(Histogram, "time_to_first_token_seconds",
                             "Time from a request's arrival to its first token.",
                             buckets=TTFT_BUCKETS)
        self.e2e = labelled(Histogram, "e2e_request_latency_seconds",
                            "Time from a request's arrival to its end.", buckets=E2E_BUCKETS)

    def record(self, prompt_tokens: int, generation_tokens: int, ttft: float | None,
               e2e: float) -> None:
        """A request ended (finished, failed or cancelled): its tokens and times (s)."""
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(generation_tokens)
        if ttft is not None:
            self.ttft.observe(ttft)
        self.e2e.observe(e2e)

    def render(self) -> tuple[bytes, str]:
        """The text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
