"""``GET /metrics``: Prometheus text format (prometheus-client), with vLLM's metric names under a ``pyvl:``
prefix so that existing dashboards work, each labelled ``model_name``.

  pyvl:time_to_first_token_seconds, pyvl:inter_token_latency_seconds (each gap between two tokens as they reach the
      response), pyvl:request_time_per_output_token_seconds (a choice's decode time over its tokens after the
      first), pyvl:e2e_request_latency_seconds, pyvl:request_queue_time_seconds       histograms, per request
  pyvl:request_prompt_tokens, pyvl:request_generation_tokens                          histograms, per request
  pyvl:prompt_tokens, pyvl:generation_tokens, pyvl:prompt_tokens_cached, pyvl:prefix_cache_queries,
      pyvl:prefix_cache_hits (tokens), pyvl:num_preemptions                           counters (``_total``)
  pyvl:request_success{finished_reason}  counter of finished choices by reason (stop, length, abort, error)
  pyvl:num_requests_running, pyvl:num_requests_waiting, pyvl:kv_cache_usage_perc (0..1)  gauges, read from the
      engine at scrape time
  pyvl:image_cache_usage_perc (0..1), pyvl:image_cache_queries, pyvl:image_cache_hits  the image-feature cache
      (vLLM's multimodal cache counters are ``mm_cache_*``; pyvl's cache holds ViT features by image digest)

A request's figures are recorded once its response is over (``record``), on the event loop. The registry is the
app's own, so several apps in one process never share counters.
"""

from __future__ import annotations

from ..errors import PyvlError

__all__ = ["Metrics"]

TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0)
REASONS = {"stop": "stop", "length": "length", "cancelled": "abort", "error": "error"}


def _token_buckets(max_len: int) -> list[int]:
    """vLLM's 1-2-5 series up to the context."""
    buckets, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_len:
                return buckets
            buckets.append(m * scale)
        scale *= 10


class Metrics:
    def __init__(self, model, model_name: str):
        try:
            import prometheus_client as prom
        except ImportError:
            raise PyvlError("/metrics needs prometheus-client: pip install 'pyvl[serve]'") from None
        self._prom = prom
        self.registry = registry = prom.CollectorRegistry()
        label = {"model_name": model_name}

        def histogram(name, doc, buckets):
            return prom.Histogram(name, doc, ["model_name"], buckets=buckets, registry=registry).labels(
                **label
            )

        def counter(name, doc):
            return prom.Counter(name, doc, ["model_name"], registry=registry).labels(**label)

        def gauge(name, doc, read):
            prom.Gauge(name, doc, ["model_name"], registry=registry).labels(**label).set_function(read)

        tokens = _token_buckets(model.max_context)
        self.ttft = histogram("pyvl:time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS)
        self.itl = histogram("pyvl:inter_token_latency_seconds", "Time between two tokens.", ITL_BUCKETS)
        self.tpot = histogram(
            "pyvl:request_time_per_output_token_seconds",
            "Decode time per output token after the first, per choice.",
            ITL_BUCKETS,
        )
        self.e2e = histogram(
            "pyvl:e2e_request_latency_seconds", "End-to-end request latency.", LATENCY_BUCKETS
        )
        self.queue = histogram(
            "pyvl:request_queue_time_seconds", "Time waiting for admission.", LATENCY_BUCKETS
        )
        self.request_prompt = histogram("pyvl:request_prompt_tokens", "Prompt tokens per request.", tokens)
        self.request_generation = histogram(
            "pyvl:request_generation_tokens", "Generated tokens per request (all choices).", tokens
        )
        self.prompt_tokens = counter("pyvl:prompt_tokens", "Prompt tokens of finished requests.")
        self.generation_tokens = counter("pyvl:generation_tokens", "Generated tokens.")
        self.cached_tokens = counter("pyvl:prompt_tokens_cached", "Prompt tokens served by the prefix cache.")
        self.prefix_queries = counter(
            "pyvl:prefix_cache_queries", "Prompt tokens looked up in the prefix cache."
        )
        self.prefix_hits = counter("pyvl:prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.preemptions = counter("pyvl:num_preemptions", "Preemptions of finished requests.")
        self.success = prom.Counter(
            "pyvl:request_success",
            "Finished choices by reason.",
            ["model_name", "finished_reason"],
            registry=registry,
        )
        self._label = label
        engine = model.engine
        gauge("pyvl:num_requests_running", "Requests being prefilled or decoded.", lambda: engine.num_running)
        gauge("pyvl:num_requests_waiting", "Requests waiting for admission.", lambda: engine.num_waiting)
        gauge(
            "pyvl:kv_cache_usage_perc",
            "Fraction of KV-cache blocks in use (1 = full).",
            lambda: engine.pool.num_in_use / engine.pool.num_blocks,
        )
        features = engine.features
        gauge(
            "pyvl:image_cache_usage_perc",
            "Fraction of the image-feature cache's bytes in use (1 = full).",
            lambda: features.nbytes / features.max_bytes if features.max_bytes else 0.0,
        )
        registry.register(_ImageCacheCounters(features, model_name))

    def record(self, call) -> None:
        """A finished response's figures (a :class:`~pyvl.serve.generation.Call`)."""
        first = call.generations[0].stats
        if first.new_tokens:
            self.ttft.observe(first.time_to_first_token_s)
        self.e2e.observe(max(g.stats.total_s for g in call.generations))
        self.queue.observe(first.queue_s)
        self.request_prompt.observe(call.prompt_tokens)
        self.request_generation.observe(call.completion_tokens)
        self.prompt_tokens.inc(call.prompt_tokens)
        self.generation_tokens.inc(call.completion_tokens)
        self.cached_tokens.inc(call.cached_tokens)
        self.prefix_queries.inc(call.prompt_tokens)
        self.prefix_hits.inc(call.cached_tokens)
        for g in call.generations:
            for gap in g.token_gaps:
                self.itl.observe(gap)
            s = g.stats
            if s.new_tokens > 1:
                self.tpot.observe((s.total_s - s.time_to_first_token_s) / (s.new_tokens - 1))
            self.preemptions.inc(g.stats.preemptions)
            reason = REASONS.get(g.stats.finish_reason, "error")
            self.success.labels(finished_reason=reason, **self._label).inc()

    def render(self) -> tuple[bytes, str]:
        return self._prom.generate_latest(self.registry), self._prom.CONTENT_TYPE_LATEST


class _ImageCacheCounters:
    """The image-feature cache's lookup counters, read at scrape time (the cache counts them itself)."""

    def __init__(self, features, model_name: str):
        self.features, self.model_name = features, model_name

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        f = self.features
        for name, doc, value in (
            ("pyvl:image_cache_queries", "Image-feature cache lookups.", f.hits + f.misses),
            ("pyvl:image_cache_hits", "Image-feature cache hits.", f.hits),
        ):
            family = CounterMetricFamily(name, doc, labels=["model_name"])
            family.add_metric([self.model_name], value)
            yield family
