"""Prometheus metrics of the service (BentoML's ``/metrics`` serves them beside its own).

Names are part of the service's contract: the Prometheus rules and the Grafana dashboard in
``deploy/`` query them.
"""

import bentoml

TOKENS = bentoml.metrics.Counter(
    name="refinery_tokens_total",
    documentation="Tokens in (prompt) and out (completion), by endpoint.",
    labelnames=["endpoint", "direction"],
)
CACHE = bentoml.metrics.Counter(
    name="refinery_cache_requests_total",
    documentation="Response cache lookups: hit, miss, or error (cache unavailable).",
    labelnames=["endpoint", "result"],
)
COST = bentoml.metrics.Counter(
    name="refinery_cost_usd_total",
    documentation="Estimated cost (compute seconds x REFINERY_PRICE_PER_HOUR / 3600).",
    labelnames=["endpoint"],
)
REQUEST_COST = bentoml.metrics.Histogram(
    name="refinery_request_cost_usd",
    documentation="Estimated cost per request.",
    labelnames=["endpoint"],
    buckets=(1e-7, 1e-6, 1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 1e-2),
)
GUARD_BLOCKS = bentoml.metrics.Counter(
    name="refinery_guard_blocks_total",
    documentation="Requests blocked by the prompt-injection guard, by reason.",
    labelnames=["endpoint", "reason"],
)
TRAFFIC_DROPPED = bentoml.metrics.Counter(
    name="refinery_traffic_log_dropped_total",
    documentation="Traffic log rows dropped (queue full, database unavailable); requests are unaffected",
    labelnames=["reason"],
)
REJECTED = bentoml.metrics.Counter(
    name="refinery_rejected_requests_total",
    documentation="Requests refused before any model ran, by reason.",
    labelnames=["reason"],
)
