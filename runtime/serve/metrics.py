"""Prometheus metrics of one server (`GET /metrics`), in a registry of its own (no process-global state)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TPS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


class ServeMetrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("qvl_requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.queue_depth = Gauge("qvl_queue_depth", "requests waiting for a slot", registry=r)
        self.running = Gauge("qvl_running_requests", "generations in progress", registry=r)
        self.slots = Gauge("qvl_slots", "KV slots (conversations kept / sequences decoded together)", registry=r)
        self.ttft = Histogram("qvl_time_to_first_token_seconds",
                              "request received -> first token (queueing, vision, prefill)", buckets=_TTFT_BUCKETS,
                              registry=r)
        self.decode_tps = Histogram("qvl_decode_tokens_per_second", "decode rate of each finished generation",
                                    buckets=_TPS_BUCKETS, registry=r)
        self.prompt_tokens = Counter("qvl_prompt_tokens", "prompt tokens of finished generations", registry=r)
        self.generated_tokens = Counter("qvl_generated_tokens", "tokens generated", registry=r)
        self.prefix_reused_tokens = Counter("qvl_prefix_cache_reused_tokens",
                                            "prompt tokens whose KV came from the prefix cache", registry=r)
        self.prefix_hits = Counter("qvl_prefix_cache_hits", "generations that reused a cached prefix", registry=r)
        self.image_cache_hits = Counter("qvl_image_cache_hits", "images taken from the vision-feature cache",
                                        registry=r)
        self.images_encoded = Counter("qvl_images_encoded", "images run through the vision encoder", registry=r)
        self.cancelled = Counter("qvl_cancelled_generations", "generations stopped because the client left",
                                 registry=r)
        self.batch_size = Histogram("qvl_decode_batch_size", "sequences in each batched decoder step",
                                    buckets=_BATCH_BUCKETS, registry=r)

    def finished(self, stats) -> None:
        """Count one finished generation's `GenerationStats`."""
        self.prompt_tokens.inc(stats.prompt_tokens)
        self.generated_tokens.inc(stats.generated_tokens)
        self.prefix_reused_tokens.inc(stats.reused_tokens)
        if stats.reused_tokens:
            self.prefix_hits.inc()
        self.image_cache_hits.inc(stats.image_cache_hits)
        self.images_encoded.inc(stats.images_encoded)
        if stats.generated_tokens > 1 and stats.decode_seconds > 0:
            self.decode_tps.observe(stats.decode_tokens_per_second)

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
