"""Prometheus metrics for /metrics, named after SGLang's (``sglang:`` → ``sgljax:``).

Each server gets its own registry, so several apps can live in one process
(tests) without clashing. Gauges read the engine thread's latest snapshot at
scrape time; counters and histograms are updated by the engine thread.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
                   1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServerMetrics:
    def __init__(self, model_name: str, stats: Callable[[], object]):
        """``stats`` returns the engine thread's latest ``EngineStats``."""
        self.registry = reg = CollectorRegistry()
        labels = {"model_name": model_name}

        def gauge(name: str, doc: str, read: Callable[[object], float]) -> None:
            g = Gauge(name, doc, list(labels), registry=reg).labels(**labels)
            g.set_function(lambda: float(read(stats())))

        gauge("sgljax:num_running_reqs", "Sequences being decoded or prefilled.",
              lambda s: s.num_running)
        gauge("sgljax:num_queue_reqs", "Sequences waiting to be scheduled.",
              lambda s: s.num_waiting)
        gauge("sgljax:token_usage", "Fraction of KV cache pages in use (requests + prefix cache).",
              lambda s: s.kv_usage)
        gauge("sgljax:kv_pages_used", "KV cache pages in use.", lambda s: s.kv_pages_used)
        gauge("sgljax:kv_pages_total", "KV cache pages in the pool.", lambda s: s.kv_pages_total)
        gauge("sgljax:kv_pages_held_by_requests", "KV pages owned by running sequences.",
              lambda s: s.kv_pages_held_by_requests)
        gauge("sgljax:compiles_after_warmup", "Executables compiled while serving (should be 0).",
              lambda s: s.compiles_after_warmup)
        gauge("sgljax:cache_hit_rate", "Prompt tokens served from the prefix cache / all.",
              lambda s: s.cache_hit_rate)
        gauge("sgljax:audio_clips_encoded", "Audio clips run through the speech encoder.",
              lambda s: s.audio_clips_encoded)
        gauge("sgljax:audio_encoder_calls", "Speech encoder calls (fewer than clips: batched).",
              lambda s: s.audio_encoder_calls)
        gauge("sgljax:unwarmed_audio_shapes",
              "Speech encoder shapes compiled while serving (0 after warmup-asr).",
              lambda s: s.unwarmed_audio_shapes)

        gauge("sgljax:spec_accept_length",
              "Speculative decoding: tokens a decode row with drafts emits on average.",
              lambda s: s.spec_accept_length)
        gauge("sgljax:spec_verify_rows", "Speculative decoding: decode rows that verified "
              "drafts.", lambda s: s.spec_verify_rows)
        gauge("sgljax:spec_draft_tokens", "Speculative decoding: draft tokens proposed.",
              lambda s: s.spec_draft_tokens)
        gauge("sgljax:spec_accepted_tokens", "Speculative decoding: draft tokens the target kept.",
              lambda s: s.spec_accepted_tokens)
        gauge("sgljax:spec_draft_seconds", "Speculative decoding: seconds proposing drafts "
              "(NGRAM: host lookups; EAGLE: waiting for the draft head after each step).",
              lambda s: s.spec_draft_seconds)
        gauge("sgljax:spec_verify_seconds", "Speculative decoding: seconds of the steps that "
              "verified drafts.", lambda s: s.spec_verify_seconds)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, list(labels), registry=reg).labels(**labels)

        self.prompt_tokens = counter("sgljax:prompt_tokens", "Prompt tokens received.")
        self.generation_tokens = counter("sgljax:generation_tokens", "Tokens generated.")
        self._finished = Counter("sgljax:num_requests", "Sequences ended, by finish reason.",
                                 [*labels, "finish_reason"], registry=reg)
        self._labels = labels

        def histogram(name: str, doc: str, buckets) -> Histogram:
            return Histogram(name, doc, list(labels), buckets=buckets,
                             registry=reg).labels(**labels)

        self.ttft = histogram("sgljax:time_to_first_token_seconds",
                              "Request arrival to its first token.", LATENCY_BUCKETS)
        self.itl = histogram("sgljax:inter_token_latency_seconds",
                             "Time between consecutive tokens of a sequence.", LATENCY_BUCKETS)
        self.e2e = histogram("sgljax:e2e_request_latency_seconds",
                             "Request arrival to its last token.", E2E_BUCKETS)

    def request_finished(self, reason: str) -> None:
        self._finished.labels(**self._labels, finish_reason=reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
